"""One real ``visiontune run`` stopped twice, then finished: shared by test_errors_run.py and test_resume.py.

The same command three times, in one output dir, on tiny shapes:

1. Ctrl-C (SIGINT to the process group, as a terminal sends it) while the
   Trainer starts: the run must stop with one line, status 130;
2. the same command again (ExampleGen to Transform cached), SIGKILLed as its
   Trainer starts the last epoch: its resume state must hold the finished epochs;
3. the same command again: the Trainer resumes at the epoch that was running
   and the run ends as one that was never stopped, its model pushed.

Each test file asserts its own part; one sequence costs one ingest, one
Transform and one Evaluator instead of two of each.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

import pytest

from tests.conftest import MOBILENET_V2_035, write_shape_tree

VISIONTUNE = [sys.executable, "-m", "visiontune.cli"]
MODEL_NAME = "shapes"
KILL_AT = "Epoch 3/3"  # epochs 1 (warm-up) and 2 finished, 3 running


@dataclasses.dataclass
class StoppedRun:
    """What the three runs left: their exit statuses and output, and the folders."""

    out: str  # pipeline.output_dir of runs 2 and 3
    serving: str  # their pipeline.serving_dir
    interrupted_out: str  # run 1's (the same folder unless the Ctrl-C did not stop it)
    interrupted: subprocess.CompletedProcess  # 1: Ctrl-C while the Trainer starts (stderr only)
    serving_after_interrupt: List[str]  # what the serving dir held after run 1
    killed: subprocess.CompletedProcess  # 2: SIGKILLed at KILL_AT (stdout and stderr together)
    states_after_kill: List[Dict[str, Any]]  # the resume states (state.json) run 2 left
    finished: subprocess.CompletedProcess  # 3: the same command again, to the end


def settings(tmp_path) -> List[str]:
    source = write_shape_tree(str(tmp_path / "images"), per_class=10, size=32)
    weights = MOBILENET_V2_035 if os.path.exists(MOBILENET_V2_035) else "none"
    return [
        f"data.source={source}", "data.eval_fraction=0.3", "data.workers=1", "data.num_shards=1",
        "model.backbone=mobilenet_v2", "model.alpha=0.35", f"model.weights={weights}", "model.image_size=32",
        "model.head.dense_units=[8]", "training.batch_size=8", "training.warmup.epochs=1",
        "training.fine_tune.epochs=2", "training.fine_tune.backbone=all",
        # Epochs of 1-2 s (the split is 21 images), so the kill lands inside the epoch it targets.
        "training.steps_per_epoch=30", "training.early_stopping_patience=0",
        "evaluation.min_accuracy=0", "evaluation.max_regression=1", "export.tflite=[]",
        f"pipeline.output_dir={tmp_path / 'run'}", f"pipeline.serving_dir={tmp_path / 'serving'}",
        f"pipeline.model_name={MODEL_NAME}", "pipeline.name=stopped",
    ]


def _ctrl_c_as_the_trainer_starts(command, tmp_path, env) -> subprocess.CompletedProcess:
    log = tmp_path / "interrupted.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, cwd=str(tmp_path), env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "] Trainer ..." not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail("the run ended before its Trainer started:\n" + log.read_text()[-3000:])
        time.sleep(2)  # into the Trainer: building the model, tracing its first step
        os.killpg(proc.pid, signal.SIGINT)
        # A hang guard, not a speed check: on busy shared cores stopping took over 60 s.
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when the sequence fails
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, proc.returncode, "", log.read_text())


def _sigkill_at(command, tmp_path, env, line_start: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(tmp_path), start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(line_start):
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when the sequence fails
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, "".join(seen), "")


def run_stopped_twice(tmp_path) -> StoppedRun:
    import glob
    import json

    def command_in(folder):  # writes its images: once a folder (new mtimes would miss the cache)
        return VISIONTUNE + ["run", "--json"] + [a for s in settings(folder) for a in ("--set", s)]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = tmp_path
    interrupted = _ctrl_c_as_the_trainer_starts(command_in(first), first, env)
    serving_after = sorted(os.listdir(first / "serving")) if (first / "serving").exists() else []
    if interrupted.returncode != 130:
        # Not stopped (test_errors_run.py fails and says why): the run went on to the end, and a
        # kill would find its Trainer cached.  The kill and the resume get a folder of their own.
        tmp_path = first / "again"
        tmp_path.mkdir()
        command = command_in(tmp_path)
    else:
        command = interrupted.args
    serving = tmp_path / "serving"
    killed = _sigkill_at(command, tmp_path, env, KILL_AT)
    states = [json.load(open(p)) for p in
              glob.glob(str(tmp_path / "run" / "**" / "trainer_state" / "*" / "state.json"), recursive=True)]

    finished = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    return StoppedRun(str(tmp_path / "run"), str(serving), str(first / "run"), interrupted, serving_after,
                      killed, states, finished)
