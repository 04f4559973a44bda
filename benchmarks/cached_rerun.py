"""Whole pipeline: wall time per component, and the fixed cost of a run where every component is cached.

Runs ``visiontune run --config CONFIG [--set ...]`` as a user does (a fresh
process each time).  The first run makes sure the pipeline has finished once
with these settings (a full run when nothing is cached yet; its per-component
times are recorded).  Then ``--repeats`` identical runs, each of which must
find every component cached, are timed; the row splits their median wall time
into: Python + TFX/TensorFlow imports (timed alone in a fresh process), the
components as ML Metadata records them (cache lookups), and the rest
(pipeline compilation, LocalDagRunner and metadata set-up, the run summary;
the run report is kept, not rebuilt, when the outcome is unchanged).

    .venv/bin/python benchmarks/cached_rerun.py [--config configs/gtsrb.yaml] [--set k=v ...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402

TITLE = "Whole pipeline: per component, and a fully cached re-run"
INTRO = """
`visiontune run` in a fresh process, as a user runs it.  First run: whatever
was not cached yet (its per-component times).  Then identical runs, every
component cached: median wall time, split into imports (Python + TFX +
TensorFlow, timed alone), the components' own times from ML Metadata and the
rest (pipeline compilation, LocalDagRunner and ML Metadata set-up, run
summary; an unchanged run keeps its report).

    .venv/bin/python benchmarks/cached_rerun.py
"""
HEADER = ("| date | command | machine | load 1/5 min | first run s (per component) | cached re-run s "
          "(median) | imports s | components s (all CACHED) | rest s |")
VISIONTUNE = os.path.join(os.path.dirname(sys.executable), "visiontune")


def timed(cmd) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def newest_run(config):
    from visiontune.pipeline import local_runner, run_metadata

    return run_metadata.component_timings(local_runner.metadata_path(config))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(common.REPO, "configs", "gtsrb.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from visiontune import configs

    config = configs.load_config(args.config, args.overrides)
    run = [VISIONTUNE, "run", "--config", args.config] + [a for o in args.overrides for a in ("--set", o)]
    first = timed(run)
    first_parts = ", ".join(f"{t['component']} {t['seconds']:.0f}s" for t in newest_run(config)
                            if t["seconds"] >= 0.5) or "all cached"
    walls, component_sums = [], []
    for _ in range(args.repeats):
        walls.append(timed(run))
        timings = newest_run(config)
        not_cached = [t["component"] for t in timings
                      if t["state"] != "CACHED" and t["component"] not in ("Resolver",)]
        if not_cached:
            raise SystemExit(f"not a cached re-run: {', '.join(not_cached)} ran again")
        component_sums.append(sum(t["seconds"] for t in timings))
    imports = common.median([timed([sys.executable, "-c", "import visiontune; "
                                    "import tfx.v1, tensorflow, tensorflow_model_analysis"])
                             for _ in range(args.repeats)])
    wall, components = common.median(walls), common.median(component_sums)
    rest = wall - imports - components
    row = (f"| {common.today()} | `{common.command()}` | {common.machine()} | {common.load()} | "
           f"{first:.0f} ({first_parts}) | {wall:.1f} | {imports:.1f} | {components:.1f} | "
           f"{rest:.1f} |")
    print(row)
    if not args.no_write:
        common.append_rows(TITLE, INTRO, HEADER, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
