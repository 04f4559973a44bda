"""First-request latency of a freshly loaded version: no warm-up, the synthetic image, the model's warm-up file.

Each measurement is a fresh Python process (TensorFlow's per-process caches
would otherwise warm every later load) that starts the built-in server
(``ModelManager`` + REST on loopback) on a copy of one pushed version, waits
until the version is AVAILABLE, then sends one-image ``:predict`` requests
over REST and times them client side.  Three ways to load, interleaved run by
run so machine noise hits them alike:

* ``none``: no warm-up (``ModelManager(warmup=False)``);
* ``synthetic``: the copy without ``assets.extra/tf_serving_warmup_requests``
  (the server's fallback: one 8x8 image through ``serving_default``, what every
  version got before the file existed);
* ``requests``: the model's own ``tf_serving_warmup_requests``, replayed
  (``serving/warmup.py``).

Reported per way: median load time (start to AVAILABLE, warm-up included),
median first-request latency, and the median of the next 20 requests (warm).
The image sent is a PNG of the model's input size unlike the warm-up ones.
Real TF Serving replays the same file; ``tensorflow_model_server`` is not
measured here.  Prints a Markdown row (``--no-write``) or appends it to
BENCHMARKS.md::

    .venv/bin/python benchmarks/serving_warmup.py --model-base-path outputs/demo/serving/digits
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import _perf_common as common  # noqa: E402

WAYS = ("none", "synthetic", "requests")
TITLE = "Serving warm-up: first-request latency (issue 15)"
INTRO = """
`benchmarks/serving_warmup.py`: a fresh process per measurement starts the
built-in server on one pushed version and times one-image REST `:predict`
requests, client side.  `none`: no warm-up; `synthetic`: one 8x8 image through
`serving_default` (the fallback for models without the file); `requests`: the
model's `assets.extra/tf_serving_warmup_requests` replayed before AVAILABLE.
Medians over the runs; load = start to AVAILABLE (warm-up included).
"""
HEADER = ("| date | command | machine | load 1/5 min | model | runs | load s: none / synthetic / requests "
          "| first request ms: none / synthetic / requests | next 20, median ms: none / synthetic / requests |")


def child(way: str, version_dir: str, requests: int) -> dict:
    """One measurement in this (fresh) process: load, then time ``1 + requests`` one-image requests."""
    import io

    from PIL import Image

    from visiontune.serving import warmup
    from visiontune.serving.client import RestClient
    from visiontune.serving.model_server import ModelManager
    from visiontune.serving.rest import RestServer

    with open(os.path.join(version_dir, "assets.extra", "visiontune.json")) as f:
        size = json.load(f).get("image_size", 224)
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "model")
        shutil.copytree(version_dir, os.path.join(base, "1"))   # copy2: old mtimes, loaded at the first scan
        if way != "requests":
            path = warmup.requests_path(os.path.join(base, "1"))
            if os.path.exists(path):
                os.remove(path)
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), (200, 40, 90)).save(buffer, format="PNG")
        png = buffer.getvalue()
        started = time.perf_counter()
        manager = ModelManager("model", base, num_versions=1, warmup=way != "none").start(wait_seconds=600)
        load = time.perf_counter() - started
        assert manager.versions() == [1], manager.status("model")
        server = RestServer(manager, port=0).start()
        try:
            client = RestClient(server.url, "model")
            times = []
            for _ in range(1 + requests):
                t = time.perf_counter()
                client.predict_images([png])
                times.append(time.perf_counter() - t)
        finally:
            server.stop()
            manager.stop()
    return {"load": load, "first": times[0], "next": statistics.median(times[1:])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-base-path", required=True, help="SERVING_DIR/MODEL_NAME (its latest version)")
    parser.add_argument("--runs", type=int, default=3, help="processes per way (default 3)")
    parser.add_argument("--requests", type=int, default=20, help="requests after the first (default 20)")
    parser.add_argument("--note", default="", help="what changed, for the table")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from visiontune.components import model_versions

    base = os.path.abspath(args.model_base_path)
    latest = model_versions.latest_version(os.listdir(base)) if os.path.isdir(base) else None
    if latest is None:
        parser.error(f"{base}: no version folders")
    version_dir = os.path.join(base, latest)
    if args.child:
        print(json.dumps(child(args.child, version_dir, args.requests)))
        return 0

    results = {way: [] for way in WAYS}
    load = common.load()
    for run in range(args.runs):
        for way in WAYS:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--model-base-path", base,
                                  "--requests", str(args.requests), "--child", way],
                                 capture_output=True, text=True, check=True)
            results[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {run + 1}/{args.runs} {way}: {results[way][-1]}", file=sys.stderr)

    def med(way, key, scale=1.0):
        return statistics.median(r[key] for r in results[way]) * scale

    with open(os.path.join(version_dir, "assets.extra", "visiontune.json")) as f:
        meta = json.load(f)
    model = (f"{meta.get('backbone')} a{meta.get('alpha')} {meta.get('image_size')}px, "
             f"{len(meta.get('classes', []))} classes")
    cells = [" / ".join(f"{med(w, key, scale):{fmt}}" for w in WAYS)
             for key, scale, fmt in (("load", 1.0, ".2f"), ("first", 1e3, ".1f"), ("next", 1e3, ".2f"))]
    row = (f"| {common.today()} | `{common.command()}`{' ' + args.note if args.note else ''} | {common.machine()} "
           f"| {load} | {model} | {args.runs} | {' | '.join(cells)} |")
    print(HEADER)
    common.publish(TITLE, INTRO, HEADER, [row], write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
