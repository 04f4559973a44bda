"""Ingest throughput (`visiontune prepare`): images/s with 1 and 2 workers, side by side.

Since ingest runs on Beam (``prepare`` uses ImageExampleGen's Beam code on the
DirectRunner) there is no pool of its own: the "pool start" column is empty,
and ``benchmarks/image_example_gen.py`` compares the Beam paths with the pool
this script measured before.

For each dataset (flowers: 3,452 JPEGs kept as they are; GTSRB: 1,720 train +
2,000 test PPMs converted to PNG) runs ``prepare_dataset`` into a temporary
folder with ``data.workers=1`` (encodes in this process) and ``workers=2``
(a process pool: forked, as ``visiontune prepare`` does when TensorFlow is not
loaded), alternating 1,2,2,1,... after one untimed warm-up of each.  Each
timed sample repeats the call back to back until it lasts ``--min-seconds``
(3 s; from 2026-11-25 21:30 on, single runs before), so that one scheduler
hiccup in a 0.4 s run cannot swing the ratio.  Wall time
is the whole ``prepare_dataset`` call: listing, pool start-up, encoding,
writing the shards.  The pool's start-up is also timed alone (start 2 workers
with the same start method, run an empty task on each) to show how much of
the run it is.  TensorFlow is not imported until the rows are written.
Target: 2 workers >= 1.7x the images/s of 1 worker.

    .venv/bin/python benchmarks/ingest.py [--repeats 3] [--datasets flowers,gtsrb] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402

TITLE = "Ingest: visiontune prepare, 1 vs 2 workers"
INTRO = """
`prepare_dataset` wall time (listing, pool start-up, decode/check/encode,
shard writing) per dataset, 1 worker (in process) and 2 workers (a process
pool; spawned before 2026-11-25 18:30, forked since: ingest no longer loads
TensorFlow), alternated in one process; images/s = images written / wall
time, median of the repeats.  "pool start" is starting 2 workers alone.
Target: scaling >= 1.7x.

    .venv/bin/python benchmarks/ingest.py --repeats 3
"""
HEADER = ("| date | command | machine | dataset (images) | load 1/5 min | 1 worker img/s | "
          "2 workers img/s | scaling | pool start s | target >= 1.7x |")


def data_configs():
    from visiontune import configs

    gtsrb = configs.load_config(os.path.join(common.REPO, "configs", "gtsrb.yaml")).data
    flowers = configs.DataConfig(source=common.FLOWERS, eval_fraction=0.3, num_shards=4)
    return {"flowers": flowers, "gtsrb": gtsrb}


def one_run(data, workers: int, tmp: str, runs: int = 1):
    """Images written per call and mean wall seconds of ``runs`` back-to-back ``prepare_dataset`` calls."""
    from visiontune.components import prepare

    out = os.path.join(tmp, f"prepared-{workers}")
    cfg = dataclasses.replace(data, workers=workers, prepared_dir=out)
    wall = 0.0
    for _ in range(runs):
        start = time.perf_counter()
        result = prepare.prepare_dataset(cfg, progress=False)
        wall += time.perf_counter() - start
        shutil.rmtree(out)
    return sum(sum(c.values()) for c in result.counts.values()), wall / runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per worker count")
    parser.add_argument("--datasets", default="flowers,gtsrb")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="each timed sample repeats prepare until it lasts about this long: "
                             "a single 0.4 s run is at the mercy of the scheduler")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    common.require(common.FLOWERS)
    common.require(common.GTSRB)
    configs_by_name = data_configs()
    rows, report = [], {}
    with tempfile.TemporaryDirectory(prefix="vt-ingest-") as tmp:
        for name in args.datasets.split(","):
            data = configs_by_name[name]
            for w in (1, 2):  # warm-up: page cache, lazy imports
                _, warm_wall = one_run(data, w, tmp)
            runs = max(1, math.ceil(args.min_seconds / warm_wall))
            rates = {1: [], 2: []}
            loads = []
            images = 0
            for r in range(args.repeats):
                order = (1, 2) if r % 2 == 0 else (2, 1)
                for w in order:
                    images, wall = one_run(data, w, tmp, runs)
                    rates[w].append(images / wall)
                loads.append(os.getloadavg()[0])
                print(f"{name} repeat {r}: 1w {rates[1][-1]:.0f} img/s, 2w {rates[2][-1]:.0f} img/s, "
                      f"load {loads[-1]:.1f}", flush=True)
            startup, method = float("nan"), "Beam"  # since prepare runs on Beam: no pool of its own
            one, two = common.median(rates[1]), common.median(rates[2])
            scaling = two / one
            report[name] = {"images": images, "runs_per_sample": runs, "img_per_s_1": rates[1], "img_per_s_2": rates[2],
                            "scaling": scaling, "pool_startup_s": startup, "load": loads}
            rows.append(f"| {common.today()} | `{common.command()}` | MACHINE | {name} ({images}) | "
                        f"{common.load()} | {one:.0f} | {two:.0f} | {scaling:.2f}x | {startup:.2f} ({method}) | "
                        f"{'met' if scaling >= 1.7 else 'missed'} |")
    # Only now: machine() imports TensorFlow, after which the pool would have to spawn.
    rows = [row.replace("MACHINE", common.machine(), 1) for row in rows]
    common.publish(TITLE, INTRO, HEADER, rows, report, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
