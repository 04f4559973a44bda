"""Server-side batching: 8 concurrent clients sending one image each, batched against unbatched.

Starts ``visiontune serve --builtin`` in its own process on loopback, on a fresh base folder holding a
copy of the newest version of ``--model-base-path``, twice per round: plain, and with
``--enable_batching --batching_parameters_file`` (``max_batch_size`` = ``--max-batch-size``,
``batch_timeout_micros``, ``num_batch_threads``), both with ``--workers`` equal to the number of clients
so that every client's request can be in the server at once (TF Serving's guide: about twice as many
client threads as ``max_batch_size``).  In each, ``--clients`` threads send one-image predict requests
back to back on their own keep-alive connections for ``--seconds`` (after a warm-up); rounds alternate
unbatched / batched so machine noise hits both alike.

Reports requests/s, latency p50 / p99 (client side), errors, and the batched server's own account of
merging: the mean processed batch size from its metrics page
(``:tensorflow:serving:batching_session:processed_batch_size``).  Target: at least 2x the requests/s at
a p99 no worse than 2x the unbatched one.  Use a model for which a batch matters, e.g. the GTSRB
config's MobileNetV2-0.35 at 192 px::

    .venv/bin/python benchmarks/serving_batching.py --model-base-path outputs/gtsrb/serving/gtsrb

Prints a BENCHMARKS.md row (``--write`` appends it there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
import _perf_common as common  # noqa: E402
from _serving_clients import Results, concurrent_clients, free_port, images, start_server, wait_ready  # noqa: E402

MARKER = "<!-- serving_batching rows -->"
SECTION = f"""
## Server-side batching (issue 15 item 5)

`visiontune serve --builtin` in its own process on loopback, plain and with `--enable_batching`
(TF Serving's batching parameters file: max_batch_size, batch_timeout_micros, num_batch_threads),
both with `--workers` = clients; 8 client threads send one-image predict requests back to back.
Rounds alternate unbatched / batched.  "Mean batch" is the batched server's own
`processed_batch_size` (its metrics page); the in-process gain is what a full batch buys over single calls with no server at all
(one caller).  Target: >= 2x requests/s at a p99 <= 2x unbatched.

    .venv/bin/python benchmarks/serving_batching.py --model-base-path outputs/gtsrb/serving/gtsrb

| date | command | machine | model | API | batching parameters | requests/s unbatched / batched (x) | p50 ms unbatched / batched | p99 ms unbatched / batched (x) | mean batch | in-process gain of a full batch | errors |
|---|---|---|---|---|---|---|---|---|---|---|---|
{MARKER}
"""  # noqa: E501


def batch_totals(url: str) -> "tuple[float, float]":
    """(instances, model calls) so far: processed_batch_size's sum and count on the server's metrics page."""
    import http.client

    from prometheus_client.parser import text_string_to_metric_families

    host, port = url.split("//", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", "/monitoring/prometheus/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    totals = {"_sum": 0.0, "_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for suffix in totals:
                if sample.name == ":tensorflow:serving:batching_session:processed_batch_size" + suffix:
                    totals[suffix] += sample.value
    return totals["_sum"], totals["_count"]


def model_ceiling(model_dir: str, pool, batch: int, seconds: float = 5.0) -> float:
    """In process, no server: images/s of calls on ``batch`` images over calls on one, one caller.

    What merging can gain at most on this machine for this model (decode, resize and network all
    included), before any server or client cost.
    """
    import time

    import tensorflow as tf

    signature = tf.saved_model.load(model_dir).signatures["serving_default"]
    rates = []
    for size in (1, batch):
        x = tf.constant((list(pool) * batch)[:size])
        for _ in range(3):
            signature(image_bytes=x)
        n, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            signature(image_bytes=x)
            n += 1
        rates.append(n * size / (time.perf_counter() - began))
    return rates[1] / rates[0]


def measure(base: str, name: str, args, pool, flags) -> "tuple[Results, float]":
    """One server (``flags`` added), warmed up, then ``--clients`` clients for ``--seconds``."""
    from visiontune.serving.client import GrpcClient, RestClient

    rest_port, grpc_port = free_port(), free_port()
    server, banner = start_server(base, "--builtin", "--rest-port", str(rest_port), "--grpc-port", str(grpc_port),
                                  "--num-versions", "1", "--workers", str(args.clients), *flags)
    try:
        if "built-in model server" not in banner:
            raise SystemExit(f"server did not start: {banner!r}")
        url = f"http://127.0.0.1:{rest_port}"

        def make_send(_):
            client = (RestClient(url, name, timeout=120) if args.api == "rest"
                      else GrpcClient(f"127.0.0.1:{grpc_port}", name, timeout=120))
            return client.predict_images

        wait_ready(RestClient(url, name, timeout=120))
        concurrent_clients(make_send, pool, args.clients, seconds=args.warmup)   # graph tracing, caches
        before = batch_totals(url) if flags else (0.0, 0.0)
        results = concurrent_clients(make_send, pool, args.clients, seconds=args.seconds,
                                     check=lambda out: out["probabilities"].shape[0] == 1)
        after = batch_totals(url) if flags else (0.0, 0.0)
        calls = after[1] - before[1]
        return results, (after[0] - before[0]) / calls if calls else float("nan")   # the measured window
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-base-path", required=True, help="SERVING_DIR/MODEL_NAME (its newest version is used)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per server, round (default 20)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="unbatched/batched rounds (default 2)")
    parser.add_argument("--api", choices=["rest", "grpc"], default="rest")
    parser.add_argument("--image-size", type=int, help="side of the PNGs sent (default: the model's image_size)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="batching: max_batch_size (default 8)")
    parser.add_argument("--batch-timeout-micros", type=int, default=20000,
                        help="batching: batch_timeout_micros (default 20000: with 8 clients and max_batch_size 8, "
                             "batches fill up; 2000 ran batches of 4 here)")
    parser.add_argument("--num-batch-threads", type=int, default=1, help="batching: num_batch_threads (default 1)")
    parser.add_argument("--note", default="", help="what changed, for the table")
    parser.add_argument("--write", action="store_true", help="append the row to BENCHMARKS.md")
    args = parser.parse_args(argv)

    from visiontune.components import model_versions
    from visiontune.pipeline import machine as machine_lib

    source = os.path.abspath(args.model_base_path)
    latest = model_versions.latest_version(os.listdir(source)) if os.path.isdir(source) else None
    if latest is None:
        parser.error(f"{source}: no version folders")
    name = os.path.basename(source.rstrip(os.sep))
    model_dir = os.path.join(source, latest)
    try:
        with open(os.path.join(model_dir, "assets.extra", "visiontune.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    size = args.image_size or meta.get("image_size", 224)
    model = f"{meta.get('backbone')} a{meta.get('alpha')} {meta.get('image_size')}px" if meta else name

    work = tempfile.mkdtemp(prefix="visiontune-serving-batching-")
    try:
        base = os.path.join(work, name)
        model_versions.push_version(model_dir, base)
        params_file = os.path.join(work, "batching.config")
        with open(params_file, "w") as f:
            f.write(f"max_batch_size {{ value: {args.max_batch_size} }}\n"
                    f"batch_timeout_micros {{ value: {args.batch_timeout_micros} }}\n"
                    f"num_batch_threads {{ value: {args.num_batch_threads} }}\n")
        batched_flags = ["--enable_batching", "--batching_parameters_file", params_file,
                         "--inference-batch-size", str(max(32, args.max_batch_size))]
        pool = images(size, 64)
        plain, batched, batches = Results(), Results(), []
        for r in range(args.rounds):
            for label, flags, total in (("unbatched", [], plain), ("batched", batched_flags, batched)):
                results, mean = measure(base, name, args, pool, flags)
                total.merge(results)
                total.seconds += results.seconds
                if flags:
                    batches.append(mean)
                print(f"round {r + 1} {label}: {results.requests_per_s:.1f} requests/s, p50 "
                      f"{results.percentile_ms(50):.1f} ms, p99 {results.percentile_ms(99):.1f} ms, "
                      f"{len(results.errors)} errors" + (f", mean batch {mean:.2f}" if flags else ""),
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ceiling = model_ceiling(model_dir, pool, args.max_batch_size)
    print(f"in process, one caller: batch {args.max_batch_size} = {ceiling:.2f}x the images/s of batch 1",
          file=sys.stderr)
    speedup = batched.requests_per_s / plain.requests_per_s
    p99_ratio = batched.percentile_ms(99) / plain.percentile_ms(99)
    result = {"unbatched": {"requests_per_s": plain.requests_per_s, "p50_ms": plain.percentile_ms(50),
                            "p99_ms": plain.percentile_ms(99), "errors": len(plain.errors)},
              "batched": {"requests_per_s": batched.requests_per_s, "p50_ms": batched.percentile_ms(50),
                          "p99_ms": batched.percentile_ms(99), "errors": len(batched.errors),
                          "mean_batch": batches},
              "speedup": speedup, "p99_ratio": p99_ratio, "in_process_batch_gain": ceiling,
              "target_met": bool(speedup >= 2 and p99_ratio <= 2)}
    print(json.dumps(result, indent=2))
    for errors in (plain.errors, batched.errors):
        if errors:
            print("first errors:", *errors[:5], sep="\n  ", file=sys.stderr)
    command = "benchmarks/serving_batching.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    params = (f"max_batch_size {args.max_batch_size}, timeout {args.batch_timeout_micros} µs, "
              f"{args.num_batch_threads} thread(s)")
    row = (f"| {datetime.date.today()} | `{command}`{' ' + args.note if args.note else ''} | "
           f"{machine_lib.describe()} | {model}, {size} px PNGs | {args.api.upper()} | {params} | "
           f"{plain.requests_per_s:.1f} / {batched.requests_per_s:.1f} ({speedup:.2f}x) | "
           f"{plain.percentile_ms(50):.1f} / {batched.percentile_ms(50):.1f} | "
           f"{plain.percentile_ms(99):.1f} / {batched.percentile_ms(99):.1f} ({p99_ratio:.2f}x) | "
           f"{' / '.join(f'{b:.2f}' for b in batches)} | {ceiling:.2f}x | {len(plain.errors) + len(batched.errors)} |")
    print(row)
    if args.write:
        common.insert_row(MARKER, row, SECTION)
    return 0 if not (plain.errors or batched.errors) else 1


if __name__ == "__main__":
    sys.exit(main())
