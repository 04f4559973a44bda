"""Ctrl-C during ``visiontune run``: one line, status 130, and what finished stays usable.

A terminal's Ctrl-C reaches the whole process group while the Trainer
starts (where AutoGraph once swallowed it and the run went on to push a
model).  The same command again must reuse every component that finished
(cached) and end as a run that was never stopped.  The run is the shared
``stopped_run`` (conftest.py, ``tests/stopped_run.py``): tiny shapes, and its
second run is SIGKILLed in turn (test_resume.py checks that part).
"""

from __future__ import annotations

import os
import re
import sys

import pytest

from tests.stopped_run import MODEL_NAME

BEFORE_TRAINER = ("ImageExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Transform")


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_ctrl_c_during_run_stops_with_one_line_and_the_next_run_reuses_what_finished(stopped_run):
    stderr = stopped_run.interrupted.stderr
    assert stopped_run.interrupted.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.splitlines()[-1]
    assert last == (f"visiontune run: stopped (Ctrl-C): the components that finished are kept in "
                    f"{stopped_run.interrupted_out}: the same command again reuses them (cached)"), stderr[-3000:]
    assert MODEL_NAME not in stopped_run.serving_after_interrupt  # nothing pushed

    # The same command again: everything before the Trainer is reused.
    again = stopped_run.killed.stdout  # stdout and stderr, up to its own SIGKILL
    for component in BEFORE_TRAINER:
        assert re.search(rf"^\[\d+/\d+\] {component} done in \d+\.\d s \(cached\)$", again, re.M), again[-3000:]
    # And in the end the run is one that was never stopped: trained, evaluated, pushed.
    finished = stopped_run.finished
    assert finished.returncode == 0, finished.stderr[-3000:]
    for component in BEFORE_TRAINER:
        assert re.search(rf"^\[\d+/\d+\] {component} done in \d+\.\d s \(cached\)$", finished.stderr, re.M), \
            finished.stderr[-3000:]
    assert re.search(r"^\[\d+/\d+\] Trainer done in \d+\.\d s$", finished.stderr, re.M)
    assert re.search(r"^\[\d+/\d+\] Pusher done in", finished.stderr, re.M)
    assert os.listdir(os.path.join(stopped_run.serving, MODEL_NAME))  # pushed
