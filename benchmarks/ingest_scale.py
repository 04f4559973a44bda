"""Ingest at scale: ImageExampleGen over 10,000 / 30,000 / 100,000 generated images.

Generates small distinct PNGs (16x16, 100 class folders) under /tmp once,
then for each image count runs ImageExampleGen alone in a LocalDagRunner
pipeline (SQLite ML Metadata, cache off, DirectRunner in_memory with one
worker: the whole ingest in one process, so its peak RSS is the ingest's),
each in its own child interpreter.  A second child per count does the same
imports and only lists the sources (``ingest_plan.plan_ingest``): its peak RSS
is what the listing costs (the driver's fingerprint of the sources, the
plan, the shards' lists: what is known before Beam starts).  Streaming holds: ingest's peak minus the
listing's stays flat as the image count grows.

Reported: wall time of ``LocalDagRunner.run``, images/s per core (one
worker), peak RSS of the ingest and of the listing alone.

    .venv/bin/python benchmarks/ingest_scale.py [--counts 10000,30000,100000] [--root /tmp/vt-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402

TITLE = "Ingest at scale: memory and rate over 10k-100k images"
INTRO = """
ImageExampleGen alone (LocalDagRunner, cache off, DirectRunner in_memory,
1 worker) over generated 16x16 PNGs in 100 class folders, each count in its
own child process.  "listing MiB" is the peak RSS of a child that makes the
same imports and only lists the sources (the driver's fingerprint, the plan,
the shards' lists); "ingest - listing" is what encoding
and writing add on top, which must not grow with the image count.

    .venv/bin/python benchmarks/ingest_scale.py
"""
HEADER = ("| date | command | machine | load 1/5 min | images | wall s | images/s per core | "
          "peak RSS MiB | listing MiB | ingest - listing MiB |")
CLASSES = 100

_CHILD = r"""
import json, os, resource, sys, time
sys.path[:0] = {paths!r}
from visiontune import configs
from visiontune.components import ingest_plan
from tfx import v1 as tfx
from visiontune.components.image_example_gen import ImageExampleGen
from visiontune.pipeline import local_runner
kind, source, out = {kind!r}, {source!r}, {out!r}
data = configs.DataConfig(source=source, eval_fraction=0.2, num_shards=4, workers=1)
start = time.perf_counter()
if kind == "list":  # what the driver and the executor know before Beam starts
    from visiontune.components import image_example_gen, ingest_beam
    image_example_gen.sources_fingerprint(configs.to_dict(data))
    plan = ingest_plan.plan_ingest(data)
    tasks = ingest_beam.shard_tasks(plan.items, plan.splits, data.num_shards, lambda s, i, n: f"{{s}}-{{i}}")
    images = len(plan.items)
else:
    gen = ImageExampleGen(data=configs.to_dict(data))
    tfx.orchestration.LocalDagRunner().run(tfx.dsl.Pipeline(
        pipeline_name="ingest-scale", pipeline_root=out, components=[gen], enable_cache=False,
        beam_pipeline_args=local_runner.beam_args(1),
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            os.path.join(out, "metadata.sqlite"))))
    import glob
    summary = glob.glob(os.path.join(out, "ImageExampleGen", "report", "*", "summary.json"))[0]
    images = sum(json.load(open(summary))["totals"].values())
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT", json.dumps({{"images": images, "wall": wall, "peak_mib": peak}}))
"""


def generate(root: str, count: int) -> str:
    """``root/all``: ``count`` distinct 16x16 PNGs (written once; a marker file records the count)."""
    import numpy as np
    from PIL import Image

    folder = os.path.join(root, "all")
    marker = os.path.join(root, f"generated-{count}")
    if os.path.exists(marker):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        os.makedirs(os.path.join(folder, f"c{c:03d}"))
    for i in range(count):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"c{i % CLASSES:03d}", f"{i:06d}.png"))
    open(marker, "w").close()
    return folder


def subset(root: str, everything: str, count: int) -> str:
    """``root/n<count>``: hard links to the first ``count`` images (count/100 per class)."""
    folder = os.path.join(root, f"n{count}")
    if os.path.isdir(folder):
        return folder
    aside = folder + ".tmp"
    shutil.rmtree(aside, ignore_errors=True)
    for c in range(CLASSES):
        name = f"c{c:03d}"
        os.makedirs(os.path.join(aside, name))
        for image in sorted(os.listdir(os.path.join(everything, name)))[:count // CLASSES]:
            os.link(os.path.join(everything, name, image), os.path.join(aside, name, image))
    os.rename(aside, folder)
    return folder


def one_run(kind: str, source: str, tmp: str):
    out = os.path.join(tmp, f"{kind}-{os.path.basename(source)}")
    code = _CHILD.format(paths=[common.REPO, HERE], kind=kind, source=source, out=out)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore", TF_USE_LEGACY_KERAS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=common.REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{kind} on {source} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="10000,30000,100000")
    parser.add_argument("--root", default="/tmp/vt-scale", help="where the generated images stay between runs")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    os.makedirs(args.root, exist_ok=True)
    everything = generate(args.root, max(counts))
    rows, report = [], []
    with tempfile.TemporaryDirectory(prefix="vt-scale-") as tmp:
        for count in counts:
            source = subset(args.root, everything, count)
            listing = one_run("list", source, tmp)
            ingest = one_run("ingest", source, tmp)
            report.append({"count": count, "listing": listing, "ingest": ingest})
            print(json.dumps(report[-1]), flush=True)
            rows.append(f"| {common.today()} | `{common.command()}` | {common.machine()} | {common.load()} | "
                        f"{ingest['images']} | {ingest['wall']:.0f} | {ingest['images'] / ingest['wall']:.0f} | "
                        f"{ingest['peak_mib']:.0f} | {listing['peak_mib']:.0f} | "
                        f"{ingest['peak_mib'] - listing['peak_mib']:.0f} |")
    common.publish(TITLE, INTRO, HEADER, rows, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
