"""The ``visiontune`` command line, run as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_shape_tree

VISIONTUNE = [sys.executable, "-m", "visiontune.cli"]


def _run(*args, **kw):
    return subprocess.run(VISIONTUNE + list(args), capture_output=True, text=True, timeout=900, **kw)


def test_prepare_prints_a_summary_and_lists_rejects(tmp_path):
    source = write_shape_tree(str(tmp_path / "images"), per_class=4)
    (tmp_path / "images" / "2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = _run("prepare", "--source", source, "--output", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "3 classes" in result.stdout and "Rejected files: 1" in result.stdout
    assert "broken.png" in (tmp_path / "out" / "rejects.csv").read_text()


def test_errors_are_one_clear_line(tmp_path):
    result = _run("prepare", "--source", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "error:" in result.stderr and str(tmp_path / "missing") in result.stderr
    assert "Traceback" not in result.stderr
    result = _run("run", "--set", "training.epochz=1")
    assert result.returncode == 2 and "unknown setting(s) epochz" in result.stderr


@pytest.mark.e2e
def test_demo_runs_the_whole_pipeline_offline(tmp_path):
    """`visiontune demo` needs neither ../shared nor the network."""
    env = dict(os.environ, VISIONTUNE_SHARED=str(tmp_path / "no-shared"))
    result = _run("demo", "--output-dir", str(tmp_path / "demo"), "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["pushed"], summary
    assert summary["pushed_dir"].startswith(str(tmp_path / "demo" / "serving" / "digits"))
    assert summary["metrics"]["sparse_categorical_accuracy"] >= 0.5
    assert [c["name"] for c in summary["per_class"]] == [str(d) for d in range(10)]
