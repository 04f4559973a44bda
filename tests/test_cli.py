"""The ``visiontune`` command line, run as a user runs it."""

import json
import logging
import os
import re
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
    # Quiet by default: every component's start and end with its wall time,
    # Keras's epoch lines, our own messages (the report) and the summary.
    assert_quiet(result.stderr)
    starts, ends = progress_lines(result.stderr)
    assert len(starts) == len(ends) == int(starts[0][1]) >= 8
    assert {"ImageExampleGen", "Transform", "Trainer", "Evaluator", "Pusher"} <= {s[2] for s in starts}
    assert not any(how for *_, how in ends)  # a first run: nothing cached
    assert len(EPOCH_LINE.findall(result.stdout)) == 12  # the demo's fine_tune.epochs
    assert re.search(r"^report: .*index\.html$", result.stderr, re.M)


# --- What a run prints ------------------------------------------------------
# By default: one line per component as it starts and ends, Keras's epoch
# lines, our own messages and the summary; no library chatter.  --verbose
# brings the libraries' logs back.

EPOCH_LINE = re.compile(r"^\d+/\d+ - \d+s - loss: ", re.M)
START_LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+) \.\.\.$", re.M)
END_LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+) (?:done in \d+\.\d s(?: \((cached|skipped)\))?"
                      r"|FAILED after \d+\.\d s.*)$", re.M)


def assert_quiet(stderr: str) -> None:
    assert "FutureWarning" not in stderr
    assert "Unable to register" not in stderr  # TensorFlow's C++ start-up (cuFFT/cuDNN/cuBLAS)
    assert not re.search(r"^(WARNING|INFO) (absl|tensorflow|apache_beam)", stderr, re.M), stderr[-3000:]
    assert not re.search(r"^[WI]\d{4} ", stderr, re.M)  # absl's own handler format


def progress_lines(stderr: str):
    """(start lines, end lines), each as [(number, total, component, ...)], checked for order."""
    starts, ends = START_LINE.findall(stderr), END_LINE.findall(stderr)
    assert starts, stderr[-3000:]
    total = int(starts[0][1])
    assert [int(n) for n, *_ in starts] == list(range(1, len(starts) + 1))
    assert [(n, name) for n, _, name, *_ in ends][:len(starts)] == [(n, name) for n, _, name in starts]
    assert all(int(t) == total for _, t, *_ in starts + ends)
    return starts, ends


def _shape_run_args(tmp_path, prepared_dir):
    """``visiontune run`` on the shapes (conftest), whose TFRecords are gone: ImportExampleGen fails at once."""
    import shutil

    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_dir, prepared)
    for path in prepared.rglob("*"):
        if path.is_file() and ".tfrecord" in path.name:
            path.unlink()
    return ["run", "--prepared-dir", str(prepared), "--output-dir", str(tmp_path / "run"),
            "--serving-dir", str(tmp_path / "serving"), "--set", "model.weights=none",
            "--set", "data.example_gen=tfrecords"]


def test_a_failing_component_says_so_and_verbose_brings_the_library_logs_back(tmp_path, shapes_prepared):
    args = _shape_run_args(tmp_path, shapes_prepared.output_dir)
    quiet = _run(*args)
    assert quiet.returncode != 0
    assert_quiet(quiet.stderr)
    starts, ends = progress_lines(quiet.stderr)
    assert starts[0][2] == "ImportExampleGen" and len(starts) == 1
    assert re.search(r"^\[1/\d+\] ImportExampleGen FAILED after \d+\.\d s: \w+", quiet.stderr, re.M)
    assert "Traceback" in quiet.stderr  # the error itself still shows

    verbose = _run(*args, "-v")  # also after the command ("-v" is absl's --verbosity too)
    assert verbose.returncode != 0
    assert re.search(r"\[1/\d+\] ImportExampleGen FAILED after \d+\.\d s: \w+", verbose.stderr)
    assert "INFO absl: [ImportExampleGen] Resolved inputs" in verbose.stderr  # TFX's own logs


def Produce(text, fail):
    """A component (see _tiny_components): writes a text artifact, or raises."""
    if fail:
        raise RuntimeError("no luck")
    text.value = "hello"


def Consume(text):
    """A component (see _tiny_components): reads Produce's artifact."""
    assert text.value == "hello"


def _tiny_components():
    """``Produce`` and ``Consume`` as TFX components.

    TFX's decorator takes module-level functions only (it puts each executor
    class on their module, where the launcher finds it by name); they get
    their annotations here so that this module loads without TFX.
    """
    from tfx import v1 as tfx
    from tfx.types.standard_artifacts import String

    Produce.__annotations__ = {"text": tfx.dsl.components.OutputArtifact[String],
                               "fail": tfx.dsl.components.Parameter[int]}
    Consume.__annotations__ = {"text": tfx.dsl.components.InputArtifact[String]}
    return tfx.dsl.components.component(Produce), tfx.dsl.components.component(Consume)


def test_progress_lines_report_runs_cache_hits_and_failures(tmp_path):
    from tfx import v1 as tfx

    from visiontune.pipeline import progress

    produce_component, consume_component = _tiny_components()

    def pipeline(fail: int):
        produce = produce_component(fail=fail)
        return tfx.dsl.Pipeline(
            pipeline_name="progress", pipeline_root=str(tmp_path / "root"), enable_cache=True,
            components=[produce, consume_component(text=produce.outputs["text"])],
            metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
                str(tmp_path / "metadata.sqlite")))

    runs = []
    for fail in (0, 0, 1):
        lines = []
        runs.append(lines)
        try:
            progress.ProgressLocalDagRunner(report=lines.append).run(pipeline(fail))
        except RuntimeError as e:
            assert str(e) == "no luck" and fail
    first, again, failed = ("\n".join(lines) for lines in runs)
    assert START_LINE.findall(first) == [("1", "2", "Produce"), ("2", "2", "Consume")]
    assert [(n, name, how) for n, _, name, how in END_LINE.findall(first)] == [
        ("1", "Produce", ""), ("2", "Consume", "")]
    assert [how for *_, how in END_LINE.findall(again)] == ["cached", "cached"]
    assert re.search(r"^pipeline progress: 2 components in \d+\.\d s \(2 cached\)$", again, re.M)
    assert re.fullmatch(r"\[1/2\] Produce \.\.\.\n\[1/2\] Produce FAILED after \d+\.\d s: "
                        r"RuntimeError: no luck", failed)


def test_quiet_output_keeps_our_messages_and_errors():
    from visiontune import cli

    def passes(name, level):
        return cli._quiet_filter(logging.LogRecord(name, level, __file__, 1, "m", None, None))

    assert passes("visiontune.progress", logging.INFO) and passes("visiontune", logging.WARNING)
    assert passes("absl", logging.ERROR) and passes("root", logging.ERROR)
    assert not passes("absl", logging.WARNING) and not passes("tensorflow", logging.WARNING)
    assert not passes("root", logging.WARNING)  # Beam relays its workers' logs there
    assert not passes("visiontunex", logging.INFO) and not passes("apache_beam.io", logging.INFO)
    formatter = cli._QuietFormatter("%(levelname)s %(name)s: %(message)s")
    assert formatter.format(logging.LogRecord("visiontune.report", logging.INFO, "", 1,
                                              "report: %s", ("x.html",), None)) == "report: x.html"
    assert formatter.format(logging.LogRecord("visiontune.report", logging.WARNING, "", 1,
                                              "gone", None, None)) == "WARNING visiontune.report: gone"
