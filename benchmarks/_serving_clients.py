"""The client side of the serving benchmarks (serving_latency, serving_load, serving_batching), in one place.

* :func:`client_loop`: one client sending one-image requests back to back, timing each (client side:
  encode, send, answer decoded), for a number of requests or until told to stop;
* :func:`concurrent_clients`: N such clients on their own connections at once, their numbers merged;
* :func:`images`, :func:`free_port`, :func:`wait_ready`, :func:`start_server`: the test images, ports, and
  a ``visiontune serve`` process on loopback that answers before the clock starts.
"""

from __future__ import annotations

import dataclasses
import io
import random
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(size: int, n: int, seed: int = 0) -> List[bytes]:
    """Encoded PNGs of simple shapes (real images compress like photos of signs do, not like noise)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(0, 256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            box = sorted(rng.randrange(size) for _ in range(2)), sorted(rng.randrange(size) for _ in range(2))
            draw.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]],
                         fill=tuple(rng.randrange(0, 256) for _ in range(3)))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def wait_ready(client, timeout: float = 300) -> None:
    """Until the server answers a prediction (a busy machine may take longer than the server waits)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.predict_images(images(8, 1))
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def start_server(base: str, *flags: str) -> "tuple[subprocess.Popen, str]":
    """``visiontune serve --model-base-path base FLAGS`` in its own process; (process, its banner line)."""
    server = subprocess.Popen([sys.executable, "-m", "visiontune.cli", "serve", "--model-base-path", base, *flags],
                              stdout=subprocess.PIPE, text=True)
    banner = server.stdout.readline().strip()
    if not banner:
        server.wait(timeout=60)
        raise SystemExit(f"the server did not start (exit status {server.returncode})")
    return server, banner


@dataclasses.dataclass
class Results:
    latencies: List[float] = dataclasses.field(default_factory=list)   # seconds, answered requests
    errors: List[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0                                               # wall time of the whole run

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else float("nan")

    def percentile_ms(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else float("nan")

    def merge(self, other: "Results") -> None:
        self.latencies += other.latencies
        self.errors += other.errors


def client_loop(send: Callable[[Sequence[bytes]], object], pool: Sequence[bytes], *, start: int = 0,
                count: Optional[int] = None, stop: Optional[threading.Event] = None,
                check: Optional[Callable[[object], bool]] = None) -> Results:
    """One client: ``send([image])`` back to back over ``pool`` from ``start``, ``count`` times or until ``stop``.

    A request that raises, or whose answer ``check`` refuses, is an error (its text kept), not a latency.
    """
    results, n = Results(), 0
    began = time.perf_counter()
    while (count is None or n < count) and not (stop is not None and stop.is_set()):
        image = pool[(start + n) % len(pool)]
        n += 1
        t = time.perf_counter()
        try:
            answer = send([image])
            ok = check is None or check(answer)
        except Exception as e:  # noqa: BLE001 - every failure is counted and shown
            ok, answer = False, e
        elapsed = time.perf_counter() - t
        if ok:
            results.latencies.append(elapsed)
        else:
            results.errors.append(repr(answer)[:200])
    results.seconds = time.perf_counter() - began
    return results


def concurrent_clients(make_send: Callable[[int], Callable], pool: Sequence[bytes], clients: int, *,
                       seconds: Optional[float] = None, stop: Optional[threading.Event] = None,
                       check: Optional[Callable[[object], bool]] = None) -> Results:
    """``clients`` threads, each a :func:`client_loop` with its own ``make_send(i)`` (its own connection),
    for ``seconds`` or until ``stop``; their latencies and errors merged, ``seconds`` the wall time."""
    stop = stop or threading.Event()
    parts: List[Optional[Results]] = [None] * clients
    sends = [make_send(i) for i in range(clients)]   # connections made before the clock starts

    def run(i: int) -> None:
        parts[i] = client_loop(sends[i], pool, start=i * 7, stop=stop, check=check)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    if seconds is not None:
        stop.wait(seconds)
        stop.set()
    for t in threads:
        t.join()
    merged = Results(seconds=time.perf_counter() - began)
    for part in parts:
        merged.merge(part)
    return merged
