"""Peak memory (RSS) of a whole ``visiontune run``, per component (issue 17, "training that fits a small board").

Runs the pipeline in this process exactly as ``visiontune run`` does
(``local_runner.run``: ingest when the dataset is not prepared yet, every
component through ``ProgressLocalDagRunner``, the run summary and the HTML
report), on a config (default ``configs/gtsrb.yaml`` with 1 warm-up + 3
fine-tuning epochs), into its own output folder, emptied first so that
nothing is cached (``--prepared DIR`` reuses an already-prepared dataset
instead of ingesting again).

Each phase of the run -- ``imports`` (from interpreter start until the
pipeline's modules are imported), ``prepare`` (ingest), every TFX component,
``report`` and the rest -- gets:

* ``peak``: the process's exact peak RSS during the phase (the kernel's
  ``VmHWM``, reset at every phase boundary through ``/proc/self/clear_refs``;
  a sampling thread could miss a short spike);
* ``start``/``end``/``growth``: RSS when it began and ended, and what it left
  behind (RSS counts memory that earlier phases allocated and did not give
  back, so a component's peak is ``start + its own need``: ``peak - start``
  is what the component itself needed on top);
* ``children``: the summed RSS of child processes (ingest workers, Beam
  multi-processing workers, ``--isolate``d components), sampled every
  ``--interval`` seconds, and ``total``: this process plus its children;
* ``malloc_free``: bytes glibc holds free in its arenas at the end of the
  phase (``mallinfo2``): RSS that the program freed but the allocator did not
  return to the system (fragmentation; ``malloc_trim`` or ``MALLOC_*`` knobs).

The whole run's peak is the largest phase peak; ``ru_maxrss`` (what
``/usr/bin/time -v`` reports) is read before each reset and agrees with it.
A separate fresh interpreter measures what the imports alone cost, one
library at a time.  Appends a row to the "Peak memory" section of
BENCHMARKS.md, prints a JSON summary and writes the sampled series
(``memory.json``) into the output folder.

    .venv/bin/python benchmarks/memory.py [--config configs/gtsrb.yaml] [--set k=v ...] [--note TEXT]
    MALLOC_ARENA_MAX=8 .venv/bin/python benchmarks/memory.py --note "8 malloc arenas"
    .venv/bin/python benchmarks/memory.py --isolate Trainer,Evaluator   # each in its own process
    .venv/bin/python benchmarks/memory.py --patch trainer-file-cache    # a what-if change
    .venv/bin/python benchmarks/memory.py --imports-only    # only the import costs (seconds)

Like ``visiontune run``, it applies the CLI's allocator settings first
(``visiontune.cli.allocator``; a ``MALLOC_*`` or ``TF_ONEDNN_USE_SYSTEM_ALLOCATOR``
variable you set wins, and is recorded with the row, as are the other
variables that change memory behaviour: ``TF_*``, ``OMP_NUM_THREADS``).  What
the product does between components (``gc.collect`` + ``malloc_trim``) it
does here too, since it runs the product's ``ProgressLocalDagRunner``.
``--isolate`` and ``--patch`` change how this script runs the components (a
component launched in a spawned child process; a what-if change to product
code), to measure what such a change would buy before making it.  Linux only
(``/proc``); glibc's ``mallinfo2`` needs glibc 2.33+ (the column is left
empty otherwise).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import traceback
import types
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402

MIB = 1024 * 1024
DEFAULT_OVERRIDES = ["training.warmup.epochs=1", "training.fine_tune.epochs=3"]
DEFAULT_OUTPUT = os.path.join("/tmp", "visiontune-memory")
OWN_MARKER = ".visiontune-memory"  # only a folder holding this file is emptied
# Environment variables that change memory behaviour, recorded with each row.
ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS", "TF_NUM_", "TF_ENABLE_ONEDNN",
                "TF_ONEDNN_", "TF_MKL_", "TF_GPU_ALLOCATOR", "TF_CPU_")

SECTION = "## Peak memory (issue 17)"
TITLE = "Whole run and per component"
INTRO = """
Peak resident memory (RSS) of one `visiontune run` in one process, measured by
`benchmarks/memory.py`: the whole run, each phase's exact peak (the kernel's
`VmHWM`, reset at every phase boundary) and what each phase left behind
(growth of RSS from its start to its end).  RSS includes what earlier phases
allocated and did not give back, so a component's peak is "RSS when it
started + its own need".  "imports" is the interpreter with TensorFlow, TFX,
TFMA and Beam imported (`visiontune.pipeline.local_runner`), before any
component ran; "malloc free" is what glibc held free in its arenas at the end
of the run (`mallinfo2`).  MiB; 1+3 epochs unless the command says otherwise.
"""
HEADER = ("| date | command | note | machine | load 1/5 min | whole run peak MiB (ru_maxrss) | imports | "
          "prepare | per component: peak (growth) | Trainer peak (own need) | report | after run | "
          "malloc free at end | wall s |")


# --------------------------------------------------------------------------- reading memory

def _status(pid: Any = "self") -> Dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of a process in bytes (``{}`` if it is gone).

    ``RssFile`` is mapped files (shared libraries: TensorFlow's are ~500 MiB),
    which the kernel can drop and re-read under pressure; ``RssAnon`` is the
    program's own data, which it cannot (no swap).
    """
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def rss(pid: Any = "self") -> int:
    return _status(pid).get("VmRSS", 0)


def reset_peak() -> bool:
    """Resets this process's ``VmHWM`` (and ``ru_maxrss``) to its current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def children_rss() -> Dict[int, int]:
    """RSS of every descendant process (ingest and Beam workers, isolated components)."""
    out = {}
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            pending = [int(p) for p in f.read().split()]
    except OSError:
        return out
    while pending:
        pid = pending.pop()
        value = rss(pid)
        if value:
            out[pid] = value
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pending.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _Mallinfo2


def malloc_info() -> Dict[str, int]:
    """glibc's view of the heap: ``in_use`` (allocated, including mmapped blocks), ``free`` (held, unused)."""
    if _MALLINFO2 is None:
        return {}
    m = _MALLINFO2()
    return {"heap": m.arena, "mmapped": m.hblkhd, "in_use": m.uordblks + m.hblkhd, "free": m.fordblks}


# --------------------------------------------------------------------------- per-phase meter

class Meter:
    """Attributes memory to the phase running now; a thread samples RSS of this process and its children."""

    def __init__(self, interval: float):
        self.interval = interval
        self.t0 = time.monotonic()
        self.phases: Dict[str, Dict[str, Any]] = {}
        self.order: List[str] = []
        self.series: List[List[Any]] = []
        self.events: List[List[Any]] = []
        self.maxrss = 0
        self.exact = True
        self._lock = threading.Lock()
        self._current: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="memory-sampler", daemon=True)

    # The phase "imports" covers interpreter start-up until start(): VmHWM has not been reset before.
    def start(self, first_phase: str = "imports") -> None:
        self._open(first_phase, start_rss=None)
        self._thread.start()

    def _open(self, name: str, start_rss: Optional[int]) -> None:
        while name in self.phases:  # the same node twice (should not happen) keeps both
            name += "'"
        with self._lock:
            self._current = name
            self.order.append(name)
            self.phases[name] = {"start": start_rss, "t_start": time.monotonic() - self.t0,
                                 "sampled_peak": 0, "children_peak": 0, "total_peak": 0}

    def _close(self) -> Dict[str, Any]:
        name = self._current
        phase = self.phases[name]
        status = _status()
        phase["peak"] = status.get("VmHWM", 0)
        phase["end"] = status.get("VmRSS", 0)
        phase["end_anon"] = status.get("RssAnon", 0)
        phase["seconds"] = time.monotonic() - self.t0 - phase["t_start"]
        self.maxrss = max(self.maxrss, maxrss_self())
        info = malloc_info()
        phase["malloc_free"] = info.get("free")
        phase["malloc_in_use"] = info.get("in_use")
        return phase

    def enter(self, name: str) -> None:
        """Ends the current phase and starts ``name``."""
        with self._lock:
            self._close()
            self.exact = reset_peak() and self.exact
            self._current = None
        self._open(name, start_rss=rss())

    def note(self, text: str) -> None:
        self.events.append([round(time.monotonic() - self.t0, 2), rss() // MIB, text[:120]])

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._close()
            self._current = None

    def child_peak(self, peak: int) -> None:
        """An isolated component's own exact peak (its process's VmHWM)."""
        phase = self.phases[self._current]
        phase["child_exact_peak"] = max(phase.get("child_exact_peak", 0), peak)

    def _sample(self) -> None:
        last_kept = 0.0
        while not self._stop.wait(self.interval):
            own = rss()
            kids = sum(children_rss().values())
            now = time.monotonic() - self.t0
            with self._lock:
                if self._current is None:
                    continue
                phase = self.phases[self._current]
                phase["sampled_peak"] = max(phase["sampled_peak"], own)
                phase["children_peak"] = max(phase["children_peak"], kids)
                phase["total_peak"] = max(phase["total_peak"], own + kids)
                # The series for memory.json: about one point a second, every change of 32 MiB.
                if now - last_kept >= 1.0 or (self.series and abs(own - self.series[-1][2] * MIB) > 32 * MIB):
                    self.series.append([round(now, 2), self._current, own // MIB, kids // MIB])
                    last_kept = now

    def summary(self) -> Dict[str, Any]:
        phases = {}
        for name in self.order:
            p = self.phases[name]
            start = p["start"]
            row = {
                "seconds": round(p["seconds"], 1),
                "start_mib": None if start is None else round(start / MIB),
                "peak_mib": round(p["peak"] / MIB),
                "end_mib": round(p["end"] / MIB),
                "end_anon_mib": round(p["end_anon"] / MIB),
                "growth_mib": None if start is None else round((p["end"] - start) / MIB),
                "own_need_mib": None if start is None else round((p["peak"] - start) / MIB),
                "children_peak_mib": round(p["children_peak"] / MIB),
                "total_peak_mib": round(max(p["total_peak"], p["peak"]) / MIB),
            }
            if p.get("child_exact_peak"):
                row["isolated_process_peak_mib"] = round(p["child_exact_peak"] / MIB)
                row["total_peak_mib"] = max(row["total_peak_mib"],
                                            round((p["peak"] + p["child_exact_peak"]) / MIB))
            if p.get("malloc_free") is not None:
                row["malloc_free_end_mib"] = round(p["malloc_free"] / MIB)
                row["malloc_in_use_end_mib"] = round(p["malloc_in_use"] / MIB)
            phases[name] = row
        whole = max(r["peak_mib"] for r in phases.values())
        return {
            "whole_run_peak_mib": whole,
            "whole_run_peak_with_children_mib": max(r["total_peak_mib"] for r in phases.values()),
            "ru_maxrss_mib": round(self.maxrss / MIB),
            "exact_phase_peaks": self.exact,
            "phases": phases,
        }


# --------------------------------------------------------------------------- hooks into the run

class _StopRun(Exception):
    """``--stop-after``: the named component is done; the rest of the run is skipped."""


class _PhaseReport:
    """``ProgressLocalDagRunner``'s ``report``: its lines go to its logger, and mark component phases."""

    def __init__(self, meter: Meter, logger: logging.Logger, stop_after: str = ""):
        self.meter = meter
        self.logger = logger
        self.stop_after = stop_after

    def __call__(self, line: str) -> None:
        self.logger.info(line)
        if self.stop_after and line.startswith("[") and f"] {self.stop_after} done" in line:
            self.meter.enter("summary")
            raise _StopRun(line)
        # "[6/9] Transform ..." starts a component; "... done in", "FAILED" end it.
        if line.startswith("[") and line.endswith(" ..."):
            self.meter.enter(line.split("] ", 1)[1][:-4])
        elif line.startswith("[") or line.startswith("pipeline "):
            self.meter.note(line)
            if line.startswith("pipeline "):
                self.meter.enter("summary")


def _install_hooks(meter: Meter, isolate: List[str], patches: List[str], stop_after: str = "") -> None:
    """Marks phases around ``local_runner.run``'s steps, without changing what they do."""
    from visiontune.pipeline import local_runner, progress

    ensure_prepared = local_runner.ensure_prepared
    write_report = local_runner.write_report

    def ensure_prepared_measured(*args, **kwargs):
        meter.enter("prepare")
        try:
            return ensure_prepared(*args, **kwargs)
        finally:
            meter.enter("pipeline setup")

    def run_pipeline_measured(pipeline):
        progress.ProgressLocalDagRunner(report=_PhaseReport(meter, progress.logger, stop_after)).run(pipeline)

    def write_report_measured(*args, **kwargs):
        meter.enter("report")
        try:
            return write_report(*args, **kwargs)
        finally:
            meter.enter("after run")

    local_runner.ensure_prepared = ensure_prepared_measured
    local_runner.run_pipeline = run_pipeline_measured
    local_runner.write_report = write_report_measured
    if isolate:
        _isolate_nodes(meter, set(isolate), patches)

    class _Events(logging.Handler):
        def emit(self, record):
            meter.note(f"{record.name}: {record.getMessage()}")

    logging.getLogger("visiontune").addHandler(_Events(logging.INFO))


def _isolate_nodes(meter: Meter, node_ids: set, patches: List[str]) -> None:
    """Launches the named components in a spawned child process instead of this one.

    The experiment behind ``--isolate``: what running a component in its own
    process (a change to ``ProgressLocalDagRunner``) would do to the peaks.
    """
    from tfx.orchestration.portable import launcher

    init, launch = launcher.Launcher.__init__, launcher.Launcher.launch

    def init_keeping_arguments(self, **kwargs):
        self._memory_kwargs = kwargs
        init(self, **kwargs)

    def launch_maybe_isolated(self):
        node_id = self._pipeline_node.node_info.id
        if node_id not in node_ids:
            return launch(self)
        kwargs = dict(self._memory_kwargs)
        kwargs["mlmd_connection"] = kwargs["mlmd_connection"]._connection_config
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_launch_in_child, args=(kwargs, patches, send), name=node_id)
        child.start()
        send.close()
        try:
            result = receive.recv()
        except EOFError:
            result = {"error": f"the {node_id} process died (exit status {child.join() or child.exitcode})"}
        child.join()
        if result.get("peak"):
            meter.child_peak(result["peak"])
        if result.get("error"):
            raise RuntimeError(f"{node_id} (isolated): {result['error']}")
        return types.SimpleNamespace(execution_id=result["execution_id"]) if result["execution_id"] else None

    launcher.Launcher.__init__ = init_keeping_arguments
    launcher.Launcher.launch = launch_maybe_isolated


def _launch_in_child(kwargs: Dict[str, Any], patches: List[str], send) -> None:
    """Child process of ``--isolate``: launches one node, sends back its execution id and this process's peak."""
    del sys.argv[1:]  # TFX's Beam executors parse sys.argv as absl flags
    _configure_output()
    result: Dict[str, Any] = {"execution_id": None}
    try:
        _apply_patches(patches)
        from tfx.orchestration import metadata
        from tfx.orchestration.portable import launcher

        kwargs["mlmd_connection"] = metadata.Metadata(kwargs["mlmd_connection"])
        info = launcher.Launcher(**kwargs).launch()
        result["execution_id"] = info.execution_id if info is not None else None
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
    result["peak"] = _status().get("VmHWM", 0)
    send.send(result)
    send.close()


# --------------------------------------------------------------------------- what-if patches

def _patch_trainer_file_cache() -> None:
    """Trainer: decoded examples cached in a file (``ds.cache(filename)``) instead of memory.

    Same order of operations as ``trainer._decoded_records`` (read, decode,
    cache, shuffle), so the model sees what it sees today.
    """
    import tempfile

    from visiontune.components import trainer

    original = trainer._decoded_records
    folder = tempfile.mkdtemp(prefix="visiontune-cache-")
    count = [0]

    def decoded_records_file_cache(files, parse, *, training, seed, cache, shuffle_buffer):
        ds = original(files, parse, training=False, seed=seed, cache=False, shuffle_buffer=shuffle_buffer)
        count[0] += 1
        ds = ds.cache(os.path.join(folder, f"cache{count[0]}"))
        if training:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        return ds

    trainer._decoded_records = decoded_records_file_cache


# Changes measured here that became product code (commit after 71f9c61): the allocator settings
# (visiontune.cli.allocator), lazy tfx.v1.extensions (visiontune.pipeline), Transform's splits
# and statistics (pipeline.create_pipeline), gc + malloc_trim between components (pipeline.progress).
PATCHES = {"trainer-file-cache": _patch_trainer_file_cache}


def _apply_patches(names: List[str]) -> None:
    for name in names:
        PATCHES[name]()


# --------------------------------------------------------------------------- imports alone

IMPORT_STEPS = [
    ("python", ""),
    ("numpy", "import numpy"),
    ("tensorflow", "import tensorflow as tf; tf.constant(1.0) + 1"),
    ("tf_keras", "import tf_keras"),
    ("apache_beam", "import apache_beam"),
    ("tensorflow_transform", "import tensorflow_transform"),
    ("tensorflow_model_analysis", "import tensorflow_model_analysis"),
    ("tfx", "from tfx import v1"),
    ("visiontune pipeline", "from visiontune.pipeline import local_runner; "
                            "from visiontune.components import trainer, evaluation, transform"),
]


def _imports_child(patches: List[str]) -> None:
    """In a fresh interpreter: RSS after each import in turn (cumulative), printed as JSON."""
    _configure_output()  # as the CLI: allocator settings, then output (imports visiontune.pipeline's package)
    _apply_patches(patches)
    out = []
    for name, statement in IMPORT_STEPS:
        start = time.perf_counter()
        exec(statement, {})  # noqa: S102 - our own fixed statements
        status = _status()
        out.append({"step": name, "rss_mib": round(status["VmRSS"] / MIB),
                    "anon_mib": round(status.get("RssAnon", 0) / MIB),
                    "seconds": round(time.perf_counter() - start, 2)})
    out.append({"step": "peak (VmHWM)", "rss_mib": round(_status().get("VmHWM", 0) / MIB)})
    print(json.dumps(out))


def measure_imports(patches: List[str] = ()) -> List[Dict[str, Any]]:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--_imports-child"]
                          + [f"--patch={p}" for p in patches],
                          capture_output=True, text=True, check=True)
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    previous = 0
    for step in steps:
        if step["step"].startswith("peak"):
            continue
        step["adds_mib"] = step["rss_mib"] - previous
        previous = step["rss_mib"]
    return steps


# --------------------------------------------------------------------------- the run

def _configure_output() -> None:
    """What ``visiontune run`` does before the command: allocator settings, then its quiet output."""
    from visiontune import cli
    from visiontune.cli import allocator

    allocator.configure()
    cli._configure_output(verbose=False)


def _fresh_dir(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.exists(os.path.join(path, OWN_MARKER)):
            raise SystemExit(f"{path} exists and is not a folder this script made: pick another --output-dir")
        shutil.rmtree(path)
    os.makedirs(path)
    open(os.path.join(path, OWN_MARKER), "w").close()
    return path


def _memory_env() -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                    if k.startswith(ENV_PREFIXES))


def run_measured(args) -> Dict[str, Any]:
    meter = Meter(args.interval)
    meter.start("imports")
    _configure_output()
    _apply_patches(args.patch)
    from visiontune import configs
    from visiontune.pipeline import local_runner  # what `visiontune run` imports first

    out = _fresh_dir(args.output_dir)
    overrides = list(args.overrides)
    overrides += [f"pipeline.output_dir={os.path.join(out, 'run')}",
                  f"pipeline.serving_dir={os.path.join(out, 'serving')}",
                  f"data.prepared_dir={args.prepared or os.path.join(out, 'prepared')}"]
    config = configs.load_config(args.config, overrides)
    _install_hooks(meter, args.isolate, args.patch, args.stop_after)
    meter.enter("config")
    start = time.monotonic()
    summary = None
    try:
        summary = local_runner.run(config)
    except _StopRun:
        pass
    wall = time.monotonic() - start
    meter.finish()
    result = meter.summary()
    result.update(wall_seconds=round(wall, 1), output_dir=out)
    if summary is not None:
        result.update(pushed=bool(summary.pushed),
                      metrics={k: round(v, 4) for k, v in summary.metrics.items() if isinstance(v, float)})
    else:
        result["stopped_after"] = args.stop_after
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump({**result, "series": meter.series, "events": meter.events}, f, indent=1)
    return result


# --------------------------------------------------------------------------- BENCHMARKS.md

def _table_row(args, result: Dict[str, Any], imports: Optional[List[Dict[str, Any]]], load: str) -> str:
    phases = result["phases"]

    def cell(name: str, key: str = "peak_mib") -> str:
        return str(phases[name][key]) if name in phases else "-"

    components = [n for n in phases if n not in ("imports", "config", "prepare", "pipeline setup", "summary",
                                                  "report", "after run")]
    per_component = ", ".join(
        f"{n.replace('latest_blessed_model_resolver', 'Resolver')} {phases[n]['peak_mib']} "
        f"({phases[n]['growth_mib']:+d})" + (f" [own process {phases[n]['isolated_process_peak_mib']}]"
                                              if phases[n].get("isolated_process_peak_mib") else "")
        for n in components)
    trainer = phases.get("Trainer")
    trainer_cell = "-"
    if trainer:
        trainer_cell = (f"**{trainer.get('isolated_process_peak_mib') or trainer['peak_mib']}** "
                        f"({trainer['own_need_mib']:+d})")
        if trainer.get("isolated_process_peak_mib"):
            trainer_cell = f"**{trainer['isolated_process_peak_mib']}** (own process; parent {trainer['peak_mib']})"
    imports_cell = cell("imports")
    if imports:
        alone = next(s["rss_mib"] for s in imports if s["step"] == "visiontune pipeline")
        imports_cell += f" (alone: {alone})"
    prepare = cell("prepare")
    if "prepare" in phases and phases["prepare"]["children_peak_mib"]:
        prepare += f" + workers {phases['prepare']['children_peak_mib']}"
    whole = (f"**{result['whole_run_peak_mib']}** ({result['ru_maxrss_mib']})")
    if result["whole_run_peak_with_children_mib"] > result["whole_run_peak_mib"]:
        whole += f"; with children {result['whole_run_peak_with_children_mib']}"
    free = phases["after run"].get("malloc_free_end_mib", "-") if "after run" in phases else "-"
    note = "; ".join(x for x in (args.note, args.env,
                                 f"isolated: {', '.join(args.isolate)}" if args.isolate else "",
                                 f"patch: {', '.join(args.patch)}" if args.patch else "") if x) or "-"
    return (f"| {common.today()} | `{args.command}` | {note} | {common.machine()} | {load} | {whole} | "
            f"{imports_cell} | {prepare} | {per_component} | {trainer_cell} | {cell('report')} | "
            f"{cell('after run', 'end_mib')} | {free} | {result['wall_seconds']:.0f} |")


def append_row(row: str) -> None:
    """Adds ``row`` to the table of the "Peak memory" section (created with its intro if missing)."""
    path = os.path.join(common.REPO, "BENCHMARKS.md")
    marker = f"<!-- perf:{TITLE} rows -->"
    with open(path) as f:
        text = f.read()
    if marker not in text:
        if SECTION not in text:
            text = text.rstrip("\n") + "\n\n" + SECTION + "\n"
        ncols = HEADER.count("|") - 1
        text = (text.rstrip("\n") + f"\n\n### {TITLE}\n\n{INTRO.strip()}\n\n    .venv/bin/python "
                f"benchmarks/memory.py\n\n{HEADER}\n" + "|" + "---|" * ncols + "\n" + marker + "\n")
    text = text.replace(marker, row + "\n" + marker, 1)
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(common.REPO, "configs", "gtsrb.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help=f"a config override (repeatable); applied after {' '.join(DEFAULT_OVERRIDES)}")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT,
                        help="emptied first (only if this script made it); default %(default)s")
    parser.add_argument("--prepared", default="",
                        help="an already-prepared dataset to reuse (default: ingest into the output folder)")
    parser.add_argument("--interval", type=float, default=0.1, help="sampling interval, seconds")
    parser.add_argument("--isolate", default="", help="components to run in their own process, e.g. Trainer,Evaluator")
    parser.add_argument("--patch", action="append", default=[], choices=sorted(PATCHES),
                        help="a what-if change to product code, applied in this process only")
    parser.add_argument("--stop-after", default="", metavar="COMPONENT",
                        help="end the run when this component is done (quick experiments; nothing written)")
    parser.add_argument("--imports-only", action="store_true", help="measure the imports alone, nothing else")
    parser.add_argument("--no-imports", action="store_true", help="skip the separate import measurement")
    parser.add_argument("--note", default="", help="what this run changes, for the table")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--_imports-child", dest="imports_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.overrides = DEFAULT_OVERRIDES + args.overrides
    args.isolate = [n for n in args.isolate.split(",") if n]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = common.command() if argv is None else "benchmarks/memory.py " + " ".join(argv)
    args.env = _memory_env()  # as given, before a --patch sets any
    if args.imports_child:
        _imports_child(args.patch)
        return 0
    if argv is None:
        del sys.argv[1:]  # TFX's Beam executors parse sys.argv as absl flags
    load = common.load()
    if args.imports_only:
        print(json.dumps({"imports": measure_imports(args.patch)}, indent=2))
        return 0
    result = run_measured(args)
    imports = None if args.no_imports or args.stop_after else measure_imports(args.patch)
    result["imports_alone"] = imports
    result["load"] = f"{load} -> {common.load()}"
    print(json.dumps(result, indent=2))
    row = _table_row(args, result, imports, result["load"])
    print(row)
    if not args.no_write and not args.stop_after:
        append_row(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
