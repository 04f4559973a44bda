"""Ctrl-C during ``visiontune run``: one line, status 130, and what finished stays usable.

A terminal's Ctrl-C reaches the whole process group while the Trainer
starts (where AutoGraph once swallowed it and the run went on to push a
model).  The same command again must reuse every component that finished
(cached) and end as a run that was never stopped.  Tiny shapes, one epoch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import MOBILENET_V2_035, write_shape_tree

VISIONTUNE = [sys.executable, "-m", "visiontune.cli"]
BEFORE_TRAINER = ("ImageExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Transform")


def _run_args(tmp_path):
    source = write_shape_tree(str(tmp_path / "images"), per_class=6, size=24)
    weights = MOBILENET_V2_035 if os.path.exists(MOBILENET_V2_035) else "none"
    return ["run", "--source", source, "--output-dir", str(tmp_path / "run"),
            "--serving-dir", str(tmp_path / "serving"), "--weights", weights, "--image-size", "32",
            "--set", "model.alpha=0.35", "--set", "model.head.dense_units=[8]", "--set", "data.num_shards=1",
            "--set", "data.workers=1", "--set", "training.batch_size=8", "--set", "training.warmup.epochs=1",
            "--set", "training.fine_tune.epochs=0", "--set", "export.tflite=[]",
            "--set", "evaluation.min_accuracy=0"]


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_ctrl_c_during_run_stops_with_one_line_and_the_next_run_reuses_what_finished(tmp_path):
    args = _run_args(tmp_path)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(VISIONTUNE + args, stdout=subprocess.DEVNULL, stderr=err, cwd=str(tmp_path),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "] Trainer ..." not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(2)  # into the Trainer: building the model, tracing its first step
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when the test fails
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.splitlines()[-1]
    assert last == (f"visiontune run: stopped (Ctrl-C): the components that finished are kept in "
                    f"{tmp_path / 'run'}: the same command again reuses them (cached)"), stderr[-3000:]
    assert not os.path.exists(tmp_path / "serving" / "visiontune")  # nothing pushed

    again = subprocess.run(VISIONTUNE + args, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    for component in BEFORE_TRAINER:
        assert re.search(rf"^\[\d+/\d+\] {component} done in \d+\.\d s \(cached\)$", again.stderr, re.M), \
            again.stderr[-3000:]
    assert re.search(r"^\[\d+/\d+\] Trainer done in \d+\.\d s$", again.stderr, re.M)
    assert re.search(r"^\[\d+/\d+\] Pusher done in", again.stderr, re.M)
    assert os.listdir(tmp_path / "serving" / "visiontune")  # pushed
