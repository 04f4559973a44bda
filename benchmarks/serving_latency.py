"""Serving latency and throughput: REST vs gRPC vs an in-process call, same model, same run.

Starts ``visiontune serve`` (the built-in server, or real TF Serving when
``tensorflow_model_server`` is on PATH) as a separate process on loopback,
loads the same version in this process, and measures, interleaving the three
paths round by round so machine noise hits them alike:

* one-image latency p50 / p99 (client side: encode, send, answer decoded);
* throughput in images/s for batches of 1, 8 and 32 (one client, sequential).

Appends a row to BENCHMARKS.md.  Any pushed model works; ``make demo`` makes
one (MobileNetV2-0.35, 32 px)::

    .venv/bin/python benchmarks/serving_latency.py --model-base-path outputs/demo/serving/digits
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import _perf_common as common  # noqa: E402
from _serving_clients import client_loop, free_port, images, start_server, wait_ready  # noqa: E402

MARKER = "<!-- serving_latency rows -->"
SECTION = f"""
## Serving latency (issue: TF Serving predictions, REST and gRPC)

The same pushed version called three ways in one run: in process
(`tf.saved_model.load(...).signatures["serving_default"]`), over REST and over
gRPC through `serving.client` against `visiontune serve` in its own process on
loopback.  Latency is one PNG image per request, client side (base64/JSON or
TensorProto encoding included); throughput is images/s with one client sending
batches back to back.  The three paths are interleaved round by round.
Target: REST single-image p50 <= 1.5x the in-process call.

    .venv/bin/python benchmarks/serving_latency.py --model-base-path outputs/demo/serving/digits

| date | command | machine | server | model | p50 / p99 ms: in-process | REST | gRPC | REST p50 / in-process | img/s in-process b1 / b8 / b32 | REST b1 / b8 / b32 | gRPC b1 / b8 / b32 |
|---|---|---|---|---|---|---|---|---|---|---|---|
{MARKER}
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-base-path", required=True, help="SERVING_DIR/MODEL_NAME")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--requests", type=int, default=30, help="single-image requests per path per round")
    parser.add_argument("--seconds", type=float, default=0.5, help="per batch size, path and round (throughput)")
    parser.add_argument("--note", default="", help="what changed, for the table")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from visiontune.components import model_versions
    from visiontune.serving.client import GrpcClient, RestClient

    base = os.path.abspath(args.model_base_path)
    latest = model_versions.latest_version(os.listdir(base))   # ASCII digits only, as the server counts
    if latest is None:
        parser.error(f"{base}: no version folders")
    version_dir = os.path.join(base, latest)
    name = os.path.basename(base)
    with open(os.path.join(version_dir, "assets.extra", "visiontune.json")) as f:
        import json
        meta = json.load(f)
    size = meta.get("image_size", 224)

    rest_port, grpc_port = free_port(), free_port()
    server, banner = start_server(base, "--rest-port", str(rest_port), "--grpc-port", str(grpc_port),
                                  "--num-versions", "1")
    try:
        kind = "TF Serving" if banner.startswith("running TF Serving") else "built-in"
        signature = tf.saved_model.load(version_dir).signatures["serving_default"]
        rest = RestClient(f"http://127.0.0.1:{rest_port}", name)
        grpc_client = GrpcClient(f"127.0.0.1:{grpc_port}", name)
        wait_ready(rest)
        wait_ready(grpc_client)

        paths = {
            "in-process": lambda batch: signature(image_bytes=tf.constant(batch))["probabilities"].numpy(),
            "REST": lambda batch: rest.predict_images(batch)["probabilities"],
            "gRPC": lambda batch: grpc_client.predict_images(batch)["probabilities"],
        }
        pool = images(size, 64)
        for fn in paths.values():  # warm up every path and check they agree
            for _ in range(10):
                fn(pool[:1])
        reference = paths["in-process"](pool[:8])
        for label in ("REST", "gRPC"):
            np.testing.assert_allclose(np.asarray(paths[label](pool[:8]), np.float32), reference, rtol=1e-5)

        latency = {k: [] for k in paths}
        throughput = {(k, b): [0, 0.0] for k in paths for b in (1, 8, 32)}
        for r in range(args.rounds):
            for label, fn in paths.items():
                done = client_loop(fn, pool, start=r * args.requests, count=args.requests)
                if done.errors:
                    raise SystemExit(f"{label}: {done.errors[0]}")
                latency[label] += done.latencies
            for batch in (1, 8, 32):
                for label, fn in paths.items():
                    start = time.perf_counter()
                    n = 0
                    while time.perf_counter() - start < args.seconds:
                        fn(pool[(n * batch) % 32:(n * batch) % 32 + batch])
                        n += 1
                    throughput[(label, batch)][0] += n * batch
                    throughput[(label, batch)][1] += time.perf_counter() - start
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def pct(label, q):
        return float(np.percentile(latency[label], q)) * 1e3

    lat = {k: f"{pct(k, 50):.2f} / {pct(k, 99):.2f}" for k in paths}
    ratio = pct("REST", 50) / pct("in-process", 50)
    tput = {k: " / ".join(f"{throughput[(k, b)][0] / throughput[(k, b)][1]:.0f}" for b in (1, 8, 32))
            for k in paths}
    command = "benchmarks/serving_latency.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    model = f"{meta.get('backbone')} a{meta.get('alpha')} {size}px, {len(meta.get('classes', []))} classes"
    row = (f"| {datetime.date.today()} | `{command}`{' ' + args.note if args.note else ''} | {common.machine()} | {kind} "
           f"| {model} | {lat['in-process']} | {lat['REST']} | {lat['gRPC']} | {ratio:.2f}x "
           f"| {tput['in-process']} | {tput['REST']} | {tput['gRPC']} |")
    print(row)
    print(f"REST p50 / in-process p50 = {ratio:.2f} (target <= 1.5)")
    if not args.no_write:
        path = os.path.join(REPO, "BENCHMARKS.md")
        with open(path) as f:
            text = f.read()
        if MARKER not in text:
            text = text.rstrip("\n") + "\n" + SECTION
        text = text.replace(MARKER, row + "\n" + MARKER)
        with open(path, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
