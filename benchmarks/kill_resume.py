"""Kill and resume: SIGKILL the demo's Trainer at several epochs, run it again, compare.

One uninterrupted ``visiontune demo`` gives the reference accuracy.  Then, for
each ``--kill-epochs`` epoch k (1-based), a fresh demo is started, killed with
SIGKILL (its whole process group) a quarter into epoch k, and run again
into the same output folder.  Recorded per kill: the epochs the resume state
held after the kill, the epoch the rerun resumed at (target: the next
unfinished one, normally k), whether ``history.json`` holds every epoch once, and the
final accuracy (target: within 1 point of the uninterrupted run).

    .venv/bin/python benchmarks/kill_resume.py [--kill-epochs 3 8 11] [--work-dir DIR]

Prints a Markdown table (BENCHMARKS.md's lead merges it; nothing is written there).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402

VISIONTUNE = os.path.join(common.REPO, ".venv", "bin", "visiontune")
EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+)")
RESUME_LINE = re.compile(r"resuming training at epoch (\d+)/(\d+)")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _freeze_code(dest: str) -> None:
    """Runs the demos on a copy of the code, laid out as the installed package.

    The pipeline fingerprints its code (``code_version``): an edit in the working
    tree between a kill and its rerun would re-run Transform and start a new
    Trainer state, which is right for a user but not what this measures.
    """
    ignore = shutil.ignore_patterns("__pycache__")
    package = os.path.join(dest, "visiontune")
    shutil.copytree(os.path.join(common.REPO, "visiontune"), package, ignore=ignore)
    for sub in ("components", "pipeline", "serving"):
        shutil.copytree(os.path.join(common.REPO, sub), os.path.join(package, sub), ignore=ignore)
    # The editable install's finder maps visiontune.* to the working tree ahead of
    # PYTHONPATH; the copy's sitecustomize (run at start-up) takes it out.
    with open(os.path.join(dest, "sitecustomize.py"), "w") as f:
        f.write("import sys\n"
                "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n")
    ENV["PYTHONPATH"] = dest + os.pathsep + ENV.get("PYTHONPATH", "")


def _demo(output_dir: str) -> subprocess.Popen:
    return subprocess.Popen([VISIONTUNE, "demo", "--output-dir", output_dir, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, log_path: str) -> dict:
    """Waits for a demo; returns its JSON summary, the epoch it resumed at and its wall time."""
    start = time.monotonic()
    out = proc.communicate()[0]
    with open(log_path, "a") as f:
        f.write(out)
    if proc.returncode != 0:
        raise RuntimeError(f"demo exited {proc.returncode}; see {log_path}")
    resumed = RESUME_LINE.search(out)
    first_epoch = next((int(m.group(1)) for m in map(EPOCH_LINE.match, out.splitlines()) if m), None)
    summary = json.loads(out[out.rindex("\n{") + 1:])
    metrics = summary["metrics"]
    summary["accuracy"] = metrics.get("accuracy", metrics.get("sparse_categorical_accuracy"))
    return {"summary": summary, "resumed_at": int(resumed.group(1)) if resumed else None,
            "first_epoch_line": first_epoch, "seconds": time.monotonic() - start}


def _history(output_dir: str) -> dict:
    paths = sorted(glob.glob(os.path.join(output_dir, "run", "**", "history.json"), recursive=True),
                   key=os.path.getmtime)
    with open(paths[-1]) as f:
        return json.load(f)


def _finished_epochs(output_dir: str) -> int:
    paths = glob.glob(os.path.join(output_dir, "run", "**", "trainer_state", "*", "state.json"),
                      recursive=True)
    if not paths:
        return 0
    with open(paths[0]) as f:
        return int(json.load(f)["epochs_done"])


def _kill_during(output_dir: str, epoch: int, log_path: str) -> float:
    """Starts a demo, SIGKILLs it halfway through ``epoch``; returns when in the epoch it died (s)."""
    proc = _demo(output_dir)
    last_begin, length = None, None
    with open(log_path, "w") as log:
        for line in proc.stdout:
            log.write(line)
            m = EPOCH_LINE.match(line)
            if not m:
                continue
            now = time.monotonic()
            if last_begin is not None:
                length = now - last_begin
            last_begin = now
            if int(m.group(1)) == epoch:
                wait = (length or 2.0) / 4  # an epoch's time includes its validation
                time.sleep(wait)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return wait
    raise RuntimeError(f"the demo ended before epoch {epoch}; see {log_path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kill-epochs", type=int, nargs="+", default=[3, 8, 11])
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "visiontune-kill"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    os.makedirs(args.work_dir)
    _freeze_code(os.path.join(args.work_dir, "code"))

    ref_dir = os.path.join(args.work_dir, "uninterrupted")
    ref = _finish(_demo(ref_dir), os.path.join(args.work_dir, "uninterrupted.log"))
    ref_acc = ref["summary"]["accuracy"]
    epochs = len(_history(ref_dir)["history"])
    print(f"uninterrupted: accuracy {ref_acc:.4f}, {epochs} epochs, {ref['seconds']:.0f} s", flush=True)

    rows = []
    for k in args.kill_epochs:
        out_dir = os.path.join(args.work_dir, f"kill-{k}")
        log_path = os.path.join(args.work_dir, f"kill-{k}.log")
        into = _kill_during(out_dir, k, log_path)
        held = _finished_epochs(out_dir)
        rerun = _finish(_demo(out_dir), log_path)
        history = _history(out_dir)
        numbers = [r["epoch"] for r in history["history"]]
        acc = rerun["summary"]["accuracy"]
        row = {"kill_epoch": k, "seconds_into_epoch": into, "epochs_held": held,
               "resumed_at": rerun["resumed_at"], "first_epoch_line": rerun["first_epoch_line"],
               "history_epochs_once": numbers == list(range(1, epochs + 1)),
               "resumed_after_epochs": history.get("resumed_after_epochs"),
               "accuracy": acc, "delta_points": (acc - ref_acc) * 100, "rerun_seconds": rerun["seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    print(f"| date | command | machine | load 1/5 min | killed in epoch (s into it) | epochs held | "
          f"resumed at (target: next unfinished) | history.json: every epoch once | accuracy (uninterrupted "
          f"{ref_acc:.4f}) | Δ points (target within 1) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        # The next unfinished epoch: the kill can land just after an epoch ended.
        ok = r["resumed_at"] == r["epochs_held"] + 1 and abs(r["delta_points"]) <= 1
        print(f"| {common.today()} | `{common.command()}` | {common.machine()} | {common.load()} | "
              f"{r['kill_epoch']} ({r['seconds_into_epoch']:.1f} s) | {r['epochs_held']} | "
              f"{r['resumed_at']} ({r['epochs_held'] + 1}) | {'yes' if r['history_epochs_once'] else 'NO'} | "
              f"{r['accuracy']:.4f} | {r['delta_points']:+.2f} ({'met' if ok else 'missed'}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
