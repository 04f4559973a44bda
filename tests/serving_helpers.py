"""A built-in server on loopback for the metrics and batching tests, and a reader of its metrics page."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import random
import shutil
from typing import Dict, Optional, Tuple

from tests.conftest import SHAPE_CLASSES, draw_shape

MODEL = "shapes"


def shape_pngs(n: int, seed: int = 0, size: int = 40):
    """``n`` real PNGs of the shapes the test model knows."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        draw_shape(SHAPE_CLASSES[i % len(SHAPE_CLASSES)], size, rng).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def push(model_dir: str, base: str, version: int = 1) -> str:
    """A copy of ``model_dir`` as ``base/<version>``, its files dated in the past (settled at the first scan)."""
    dst = os.path.join(base, str(version))
    shutil.copytree(model_dir, dst)
    for root, _, files in os.walk(dst):
        for f in files:
            os.utime(os.path.join(root, f), (1, 1_000_000_000))
    return dst


@contextlib.contextmanager
def builtin_server(base: str, batching=None, **limits):
    """(manager, REST url, gRPC target) of a built-in server on ephemeral ports; ``batching``: parameters."""
    from visiontune.serving.batching import Batcher
    from visiontune.serving.grpc_server import GrpcServer
    from visiontune.serving.model_server import Limits, ModelManager
    from visiontune.serving.rest import RestServer

    manager = ModelManager(MODEL, base, num_versions=1, poll_seconds=0.2, limits=Limits(**limits))
    if batching is not None:
        manager.batcher = Batcher(batching)
    manager.start(wait_seconds=60)
    rest = RestServer(manager, port=0).start()
    grpc_server = GrpcServer(manager, port=0).start()
    try:
        yield manager, rest.url, grpc_server.target
    finally:
        rest.stop()
        grpc_server.stop()
        manager.batcher.stop()
        manager.stop()


def http_get(url: str, path: str) -> Tuple[int, str, bytes]:
    """(status, content type, body) of a plain HTTP GET."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def scrape(url: str, path: str = "/monitoring/prometheus/metrics") -> Dict[Tuple[str, frozenset], float]:
    """The metrics page, parsed by prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, content_type, body = http_get(url, path)
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type, body[:200])
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, default: Optional[float] = 0.0, **labels) -> Optional[float]:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    return sum(found) if found else default
