"""Ingest on Beam (ImageExampleGen) against ``visiontune prepare``: images/s at 1 and 2 workers.

For each dataset (flowers: 3,452 JPEGs kept as they are; GTSRB: 1,720 train +
2,000 test PPMs converted to PNG), in one session, alternating the four
variants each repeat:

* ``prepare`` with ``data.workers`` 1 and 2, as ``visiontune prepare`` runs it
  in a child interpreter (until 15b53d8 its own process pool, forked, without
  TensorFlow; since then the same Beam code on the DirectRunner, outside TFX);
* ``ImageExampleGen`` alone in a LocalDagRunner pipeline (SQLite ML
  Metadata, cache off), Beam's DirectRunner ``in_memory`` with 1 worker and
  ``multi_processing`` with 2, as ``visiontune run`` runs it with
  ``data.workers`` 1 and 2.

Wall time is the ``prepare_dataset`` call, or the ``LocalDagRunner.run`` call
(the driver's fingerprint of the sources, listing, Beam with its worker
start-up, the artifacts and ML Metadata); each child's interpreter start and
imports are outside it.  images/s = images written / wall time, median of the
repeats.  Target: Beam >= 0.8x prepare's images/s at equal workers.

    .venv/bin/python benchmarks/image_example_gen.py [--repeats 3] [--datasets flowers,gtsrb] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402

TITLE = "Ingest on Beam: ImageExampleGen vs visiontune prepare"
INTRO = """
Images/s of ImageExampleGen (a LocalDagRunner pipeline of it alone, cache
off; DirectRunner in_memory with 1 worker, multi_processing with 2) and of
`prepare_dataset` (as `visiontune prepare` runs: the rows of 2026-12-03 are of
its process pool, 1 worker in process and 2 forked, before it moved to Beam in
15b53d8), alternated in one session, each timed
in its own child process, median of the repeats.  Beam's wall time includes
the driver's fingerprint of the sources, its worker processes' start-up and
the ML Metadata writes.  Target: Beam >= 0.8x prepare at equal workers.

    .venv/bin/python benchmarks/image_example_gen.py --repeats 3
"""
HEADER = ("| date | command | machine | dataset (images) | load 1/5 min | prepare 1w img/s | Beam 1w img/s | "
          "ratio 1w | prepare 2w img/s | Beam 2w img/s | ratio 2w | target >= 0.8x |")

_CHILD = r"""
import json, os, shutil, sys, time
sys.path[:0] = {paths!r}
kind, workers, out = {kind!r}, {workers!r}, {out!r}
from visiontune import configs
import image_example_gen as bench
data = bench.data_configs()[{dataset!r}]
data.workers = workers
if kind == "prepare":
    from visiontune.components import prepare
    start = time.perf_counter()
    result = prepare.prepare_dataset(data, output_dir=out, progress=False)
    wall = time.perf_counter() - start
    images = sum(result.totals.values()) or sum(sum(c.values()) for c in result.counts.values())
else:
    from tfx import v1 as tfx
    from visiontune.components.image_example_gen import ImageExampleGen
    from visiontune.pipeline import local_runner
    gen = ImageExampleGen(data=configs.to_dict(data))
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="ingest-bench", pipeline_root=out, components=[gen], enable_cache=False,
        beam_pipeline_args=local_runner.beam_args(workers),
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            os.path.join(out, "metadata.sqlite")))
    start = time.perf_counter()
    tfx.orchestration.LocalDagRunner().run(pipeline)
    wall = time.perf_counter() - start
    import glob
    summary = glob.glob(os.path.join(out, "ImageExampleGen", "report", "*", "summary.json"))[0]
    images = sum(json.load(open(summary))["totals"].values())
shutil.rmtree(out)
print("RESULT", json.dumps({{"images": images, "wall": wall}}))
"""


def data_configs():
    from visiontune import configs

    gtsrb = configs.load_config(os.path.join(common.REPO, "configs", "gtsrb.yaml")).data
    flowers = configs.DataConfig(source=common.FLOWERS, eval_fraction=0.3, num_shards=4)
    return {"flowers": flowers, "gtsrb": gtsrb}


def one_run(kind: str, dataset: str, workers: int, tmp: str):
    """(images written, wall seconds) of one run in a child interpreter."""
    code = _CHILD.format(paths=[common.REPO, HERE], kind=kind, workers=workers, dataset=dataset,
                         out=os.path.join(tmp, f"{kind}-{workers}"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=common.REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{kind} {workers}w on {dataset} failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    return result["images"], result["wall"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--datasets", default="flowers,gtsrb")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    common.require(common.FLOWERS)
    common.require(common.GTSRB)
    variants = [("prepare", 1), ("beam", 1), ("prepare", 2), ("beam", 2)]
    rows, report = [], {}
    with tempfile.TemporaryDirectory(prefix="vt-ieg-") as tmp:
        for name in args.datasets.split(","):
            rates = {v: [] for v in variants}
            images = 0
            for r in range(args.repeats):
                for kind, workers in (variants if r % 2 == 0 else variants[::-1]):
                    images, wall = one_run(kind, name, workers, tmp)
                    rates[kind, workers].append(images / wall)
                print(f"{name} repeat {r}: " + ", ".join(f"{k} {w}w {rates[k, w][-1]:.0f} img/s"
                                                        for k, w in variants), flush=True)
            med = {v: common.median(rates[v]) for v in variants}
            ratio = {w: med["beam", w] / med["prepare", w] for w in (1, 2)}
            report[name] = {"images": images, **{f"{k}_{w}w": rates[k, w] for k, w in variants},
                            "ratio_1w": ratio[1], "ratio_2w": ratio[2]}
            rows.append(f"| {common.today()} | `{common.command()}` | {common.machine()} | {name} ({images}) | "
                        f"{common.load()} | {med['prepare', 1]:.0f} | {med['beam', 1]:.0f} | {ratio[1]:.2f}x | "
                        f"{med['prepare', 2]:.0f} | {med['beam', 2]:.0f} | {ratio[2]:.2f}x | "
                        f"{'met' if min(ratio.values()) >= 0.8 else 'missed'} |")
    common.publish(TITLE, INTRO, HEADER, rows, report, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
