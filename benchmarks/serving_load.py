"""Serving under load: 8 concurrent REST clients for 60 s, a hot swap and a version deletion in the middle.

Starts ``visiontune serve --builtin`` in its own process on loopback, on a
fresh base folder holding a copy of the newest version of
``--model-base-path``, and runs ``--clients`` threads that each send
one-image predict requests back to back on their own keep-alive connection.
Meanwhile:

* at 1/6 of the run, a new version is pushed the way the Pusher pushes it
  (:func:`components.model_versions.push_version`: copied under a temporary
  name, then renamed); a monitor polls the version status every 50 ms and
  records when the server first shows the new version (LOADING: it has seen
  it) and when it is AVAILABLE (the latest: every request after that goes
  to it);
* at 3/4, that new version's folder is deleted while it serves: the server
  unloads it and falls back to the previous one, with no failed request;
* the server's RSS (``/proc/PID/status`` VmRSS) is sampled every second.

Before the load, one request of ``--big-request`` (1,000) 224 px images
measures what a big request costs in memory.  Reports requests/s, errors, latency p50/p99 (client side), RSS idle after
loading / after the first load period / peak / at the end, and the swap and
fallback delays in poll intervals.  Targets: 0 errors, RSS flat after the
first load, the swap visible within two poll intervals.

    .venv/bin/python benchmarks/serving_load.py --model-base-path outputs/demo/serving/digits

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
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
import _perf_common as common  # noqa: E402
from _serving_clients import concurrent_clients, free_port, images, start_server  # noqa: E402

MARKER = "<!-- serving_load rows -->"
PUSH_AT, DELETE_AT = 1 / 6, 3 / 4   # of the run: after the first load period; once the new version serves
SECTION = f"""
## Serving under load (issue 14 item 5)

`visiontune serve --builtin` in its own process on loopback; 8 client threads
send one-image REST predict requests back to back for 60 s.  A new
version is pushed at 10 s the way the Pusher pushes (copy aside, rename); at
45 s that version's folder is deleted while it serves (the server falls back
to the previous one).  Targets: 0 errors, RSS flat after the first load, the swap
visible within two poll intervals.

    .venv/bin/python benchmarks/serving_load.py --model-base-path outputs/demo/serving/digits

| date | command | machine | model | requests/s | errors | p50 / p99 ms | RSS MiB idle / after first load / peak / end | new version seen / serving after push | fallback after deletion | one big request: RSS |
|---|---|---|---|---|---|---|---|---|---|---|
{MARKER}
"""  # noqa: E501


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-base-path", required=True, help="SERVING_DIR/MODEL_NAME (its newest version is used)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load (default 60)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="the server's --poll-seconds (default 1)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the PNGs sent (default 64)")
    parser.add_argument("--big-request", type=int, default=1000,
                        help="before the load: one request of this many 224 px images, RSS before/after (0: none)")
    parser.add_argument("--inference-batch-size", type=int, default=32,
                        help="the server's --inference-batch-size (default 32; 1024: one model call per request, "
                             "as before it existed)")
    parser.add_argument("--note", default="", help="what changed, for the table")
    parser.add_argument("--write", action="store_true", help="append the row to BENCHMARKS.md")
    args = parser.parse_args(argv)

    import numpy as np

    from visiontune.components import model_versions
    from visiontune.pipeline import machine as machine_lib
    from visiontune.serving.client import RestClient

    source = os.path.abspath(args.model_base_path)
    latest = model_versions.latest_version(os.listdir(source))
    if latest is None:
        parser.error(f"{source}: no version folders")
    name = os.path.basename(source.rstrip(os.sep))
    model_dir = os.path.join(source, latest)
    try:
        with open(os.path.join(model_dir, "assets.extra", "visiontune.json")) as f:
            meta = json.load(f)
        model = f"{meta.get('backbone')} a{meta.get('alpha')} {meta.get('image_size')}px"
    except (OSError, ValueError):
        model = name

    work = tempfile.mkdtemp(prefix="visiontune-serving-load-")
    base = os.path.join(work, name)
    first_version, _ = model_versions.push_version(model_dir, base)
    port = free_port()
    server, banner = start_server(base, "--builtin", "--rest-port", str(port), "--grpc-port", "0",
                                  "--num-versions", "2", "--poll-seconds", str(args.poll_seconds),
                                  "--inference-batch-size", str(args.inference_batch_size))
    pool = images(args.image_size, 64)
    done, load = threading.Event(), {}
    rss, statuses = [], []
    try:
        if "built-in model server" not in banner:
            raise SystemExit(f"server did not start: {banner!r}")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:   # loaded and answering (a busy machine may take longer than the server waits)
            try:
                RestClient(url, name).predict_images(pool[:1])
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        time.sleep(2)
        idle_rss = rss_mib(server.pid)
        big = {}
        if args.big_request:
            # The case: 1,000 images in one request took the server from 1.0 to 6.8 GB for good.
            batch = (images(224, 50, seed=1) * (args.big_request // 50 + 1))[:args.big_request]
            t = time.perf_counter()
            out = RestClient(url, name, timeout=600).predict_images(batch)
            big = {"images": len(out["probabilities"]), "seconds": time.perf_counter() - t,
                   "rss_before": idle_rss, "rss_after": rss_mib(server.pid)}
            time.sleep(2)
            idle_rss = rss_mib(server.pid)
            big["rss_2s_later"] = idle_rss

        def clients() -> None:
            load["results"] = concurrent_clients(lambda i: RestClient(url, name, timeout=60).predict_images, pool,
                                                 args.clients, stop=done,
                                                 check=lambda out: out["probabilities"].shape[0] == 1)

        def monitor(start: float) -> None:
            rest = RestClient(url, name, timeout=60)
            while not done.is_set():
                try:
                    states = {int(s["version"]): s["state"] for s in rest.status()["model_version_status"]}
                except Exception:  # noqa: BLE001 - a failed status call shows as no versions
                    states = {}
                statuses.append((time.monotonic() - start, states))
                time.sleep(0.05)

        def sample(start: float) -> None:
            while not done.is_set():
                rss.append((time.monotonic() - start, rss_mib(server.pid)))
                time.sleep(1.0)

        start = time.monotonic()
        threads = [threading.Thread(target=clients), threading.Thread(target=monitor, args=(start,)),
                   threading.Thread(target=sample, args=(start,))]
        for t in threads:
            t.start()
        time.sleep(args.seconds * PUSH_AT)
        pushed, _ = model_versions.push_version(model_dir, base)
        pushed_at = time.monotonic() - start
        print(f"{pushed_at:.1f} s: pushed version {pushed}", file=sys.stderr)
        time.sleep(max(0.0, args.seconds * DELETE_AT - (time.monotonic() - start)))
        shutil.rmtree(os.path.join(base, pushed))
        deleted_at = time.monotonic() - start
        print(f"{deleted_at:.1f} s: deleted version {pushed}", file=sys.stderr)
        time.sleep(max(0.0, args.seconds - (time.monotonic() - start)))
        done.set()
        for t in threads:
            t.join()
        duration = time.monotonic() - start
        end_rss = rss_mib(server.pid)
        latencies, errors = load["results"].latencies, load["results"].errors
    finally:
        done.set()
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    def first(after: float, test) -> float:
        return next((t for t, v in statuses if t >= after and test(v)), float("nan"))

    new, old = int(pushed), int(first_version)
    seen = first(pushed_at, lambda v: new in v) - pushed_at   # LOADING (or already AVAILABLE)
    swap = first(pushed_at, lambda v: v.get(new) == "AVAILABLE") - pushed_at
    fallback = first(deleted_at, lambda v: v.get(new) != "AVAILABLE" and v.get(old) == "AVAILABLE") - deleted_at
    after_first_load = next((m for t, m in rss if t >= args.seconds * PUSH_AT - 1), float("nan"))
    lat = np.array(latencies) * 1e3
    result = {
        "requests_per_s": len(latencies) / duration, "requests": len(latencies), "errors": len(errors),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "rss_idle": idle_rss, "rss_after_first_load": after_first_load,
        "rss_peak": max(m for _, m in rss), "rss_end": end_rss,
        "big_request": big, "seen_s": seen, "swap_s": swap, "fallback_s": fallback, "poll_s": args.poll_seconds,
    }
    print(json.dumps(result, indent=2))
    if errors:
        print("first errors:", *errors[:5], sep="\n  ", file=sys.stderr)
    command = "benchmarks/serving_load.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    big_text = (f"{big['images']} images in {big['seconds']:.1f} s: {big['rss_before']:.0f} -> "
                f"{big['rss_after']:.0f} MiB" if big else "-")
    polls = f"seen {seen:.1f} s ({seen / args.poll_seconds:.1f} polls), serving {swap:.1f} s"
    row = (f"| {datetime.date.today()} | `{command}`{' ' + args.note if args.note else ''} | "
           f"{machine_lib.describe()} | {model} | {result['requests_per_s']:.1f} | {len(errors)} | "
           f"{result['p50_ms']:.1f} / {result['p99_ms']:.1f} | {idle_rss:.0f} / {after_first_load:.0f} / "
           f"{result['rss_peak']:.0f} / {end_rss:.0f} | {polls} | {fallback:.1f} s | {big_text} |")
    print(row)
    if args.write:
        common.insert_row(MARKER, row, SECTION)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
