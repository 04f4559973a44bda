"""The built-in server against hostile clients (issue 14 item 2): what one client can cost it.

Raw HTTP over loopback sockets, so every malformed request is really sent the
way a hostile client sends it; gRPC through TF Serving's own stubs.  The
server serves the shared tiny export with small limits, so the refusals are
reached with small requests.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import zlib
from typing import Optional

import numpy as np
import pytest

from tests.conftest import builtin_server_fixture
from tests.test_serving import MODEL
from visiontune.serving.client import RestClient

LIMITS = dict(max_instances=8, max_body_bytes=256 << 10, max_pixels=100 * 100, inference_batch_size=3,
              workers=2, max_connections=12, idle_timeout=1.5, read_timeout=1.5)
BIG = 32 << 20   # what a hostile client sends after a head the server refuses


@pytest.fixture(scope="module")
def model_dir(exported_model):
    return exported_model.serving_model_dir


server = builtin_server_fixture("limits", LIMITS)


@pytest.fixture(scope="module")
def signature(model_dir):
    import tensorflow as tf

    fn = tf.saved_model.load(model_dir).signatures["serving_default"]
    return lambda images: {k: v.numpy() for k, v in fn(image_bytes=tf.constant(list(images))).items()}


def image(fmt: str, width: int, height: int, frames: int = 1) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    pictures = [Image.new("RGB", (width, height), (40 * i, 120, 200)) for i in range(frames)]
    pictures[0].save(out, fmt, **({"save_all": True, "append_images": pictures[1:]} if frames > 1 else {}))
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG that declares width x height (the pixel data never comes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\x00" * 64)


def predict_body(images, **extra) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(i).decode()} for i in images], **extra}).encode()


# ---------------------------------------------------------------- raw HTTP

class Answer:
    def __init__(self, status: Optional[int], headers: dict, body: bytes, sent: int):
        self.status, self.headers, self.body, self.sent = status, headers, body, sent

    @property
    def json(self):
        return json.loads(self.body)


def _read_answer(sock: socket.socket, buffer: bytes = b""):
    """(status, headers, body, rest of the buffer) of one response, or (None, ...) when the server closed."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            return None, {}, buffer, b""
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(buffer) < length:
        data = sock.recv(65536)
        if not data:
            break
        buffer += data
    return int(lines[0].split()[1]), headers, buffer[:length], buffer[length:]


def exchange(port: int, head: bytes, body=b"", timeout: float = 30) -> Answer:
    """Sends ``head`` then ``body`` (bytes, or an iterable of chunks, sent from a thread, which stops at
    the first error: a server that refuses closes the connection), and reads one answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sent = [0]

    def send():
        try:
            sock.sendall(head)
            for chunk in ([body] if isinstance(body, bytes) else body):
                sock.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        status, headers, data, _ = _read_answer(sock)
    finally:
        sender.join(timeout)
        sock.close()
    return Answer(status, headers, data, sent[0])


def post_head(path: str = f"/v1/models/{MODEL}:predict", **headers) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def zeros(total: int, size: int = 1 << 20):
    while total > 0:
        yield b"\0" * min(size, total)
        total -= size


def chunked(total: int, size: int = 64 << 10):
    while total > 0:
        n = min(size, total)
        yield f"{n:x}\r\n".encode() + b"{" * n + b"\r\n"
        total -= n
    yield b"0\r\n\r\n"


def assert_still_serving(server, png) -> None:
    assert RestClient(server.rest_url, MODEL).predict_images([png])["probabilities"].shape == (1, 3)


# ---------------------------------------------------------------- request bodies

@pytest.mark.parametrize("headers, body, status", [
    ({"Content-Length": BIG}, zeros(BIG), 413),                                 # refused before reading
    ({"Transfer-Encoding": "chunked"}, chunked(BIG), 413),                       # counted while reading
    ({"Content-Length": -1}, zeros(BIG), 400),                                   # not a byte count
    ({}, zeros(BIG), 411),                                                       # no length: not "until close"
    ({"Content-Length": "12abc"}, zeros(BIG), 400),
    ({"Content-Length": "+5"}, b"{}{}{", 400),
    ({"Content-Length": 10, "Transfer-Encoding": "chunked"}, zeros(BIG), 400),    # request smuggling shape
    ({"Transfer-Encoding": "gzip"}, zeros(BIG), 400),
    ({"Transfer-Encoding": "chunked"}, [b"zz\r\n" + b"\0" * BIG], 400),          # chunk size not hex
], ids=["content-length-over", "chunked-over", "content-length-minus-1", "no-length", "content-length-text",
        "content-length-sign", "both-lengths", "other-encoding", "bad-chunk-size"])
def test_bodies_are_bounded_by_the_bytes_read(server, headers, body, status):
    answer = exchange(_port(server), post_head(**headers), body)
    assert answer.status == status, answer.body[:200]
    assert answer.json["error"] and answer.headers.get("connection") == "close"
    # The server answered and closed without taking in what followed.
    assert answer.sent < BIG
    png = image("PNG", 20, 20)
    assert_still_serving(server, png)


def _port(server) -> int:
    return int(server.rest_url.rsplit(":", 1)[1])


def test_chunked_and_expect_continue_bodies_within_the_limit_are_served(server, signature):
    png = image("PNG", 30, 24)
    body = predict_body([png])
    expected = signature([png])["probabilities"]
    # Chunked, in uneven pieces, with a trailer field.
    pieces = [body[:7], body[7:100], body[100:]]
    chunks = b"".join(f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\nX-T: 1\r\n\r\n"
    answer = exchange(_port(server), post_head(Transfer_Encoding="chunked"), chunks)
    assert answer.status == 200, answer.body[:200]
    np.testing.assert_allclose(answer.json["predictions"][0]["probabilities"], expected[0], rtol=1e-6)
    # Expect: 100-continue (curl sends it for bodies over 1 KiB): 100 first, then the body is read.
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as sock:
        sock.sendall(post_head(Content_Length=len(body), Expect="100-continue"))
        status, _, _, rest = _read_answer(sock)
        assert status == 100
        sock.sendall(body)
        status, _, data, _ = _read_answer(sock, rest)
        assert status == 200 and "predictions" in json.loads(data)
    # Over the limit with Expect: refused at once, no 100.
    answer = exchange(_port(server), post_head(Content_Length=BIG, Expect="100-continue"))
    assert answer.status == 413


def test_request_heads_are_bounded(server):
    answer = exchange(_port(server), post_head(X_Big="a" * (70 << 10), Content_Length=2), b"{}")
    assert answer.status == 431
    many = {f"X-H{i}": i for i in range(150)}
    assert exchange(_port(server), post_head(Content_Length=2, **many), b"{}").status == 431
    assert exchange(_port(server), b"NOT AN HTTP REQUEST\r\n\r\n").status == 400
    assert exchange(_port(server), b"GET / HTTP/2.0\r\n\r\n").status == 400


# ---------------------------------------------------------------- connections and threads

def test_idle_connections_cost_no_thread_and_are_closed(server):
    """500 idle connections held 500 threads: now each is a coroutine, closed after idle_timeout,
    and the oldest idle one makes room when max_connections are open."""
    png = image("PNG", 20, 20)
    assert_still_serving(server, png)   # the pool's threads exist before we count
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", _port(server)), timeout=10) for _ in range(40)]
    try:
        assert_still_serving(server, png)   # a new client is answered with 40 idle ones around
        assert threading.active_count() <= threads + 1   # + at most the client's own
        for sock in idle:
            sock.settimeout(30)   # idle_timeout is 1.5 s: recv returns b"" once the server closes
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    assert_still_serving(server, png)


@pytest.mark.parametrize("head, body", [
    (b"GET /v1/mod", b""),                                            # a head that never ends
    (post_head(Content_Length=100), b'{"instances": '),                # a body that never comes
], ids=["head", "body"])
def test_a_request_that_stalls_is_answered_408_after_the_read_timeout(server, head, body):
    answer = exchange(_port(server), head, body)
    assert answer.status == 408 and "within" in answer.json["error"]


# ---------------------------------------------------------------- images and instances

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF"])
def test_pixel_limit_is_read_from_the_header(server, signature, fmt):
    client = RestClient(server.rest_url, MODEL)
    fits, too_big = image(fmt, 100, 100), image(fmt, 101, 100)
    got = client.predict_images([fits])
    np.testing.assert_allclose(got["probabilities"], signature([fits])["probabilities"], rtol=1e-5, atol=1e-6)
    answer = exchange(_port(server), post_head(Content_Length=len(predict_body([fits, too_big]))),
                      predict_body([fits, too_big]))
    assert answer.status == 400
    assert "image_bytes[1]" in answer.json["error"] and "--max-pixels" in answer.json["error"]


def test_pixel_limit_over_grpc_and_inside_examples(server):
    import tensorflow as tf

    from visiontune.serving.client import GrpcClient, PredictionError

    huge = png_header(16000, 16000)   # 1 MB of such a PNG cost 780 MB to decode
    with pytest.raises(PredictionError) as e:
        GrpcClient(server.grpc_target, MODEL).predict_images([huge])
    assert e.value.code == "INVALID_ARGUMENT" and "256000000 pixels" in e.value.message
    example = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image("PNG", 101, 100)]))}))
    with pytest.raises(PredictionError) as e:
        GrpcClient(server.grpc_target, MODEL, signature="serving_examples").predict(
            {"examples": np.array([example.SerializeToString()], dtype=object)})
    assert e.value.code == "INVALID_ARGUMENT" and "examples[0].image" in e.value.message


def test_instances_are_capped_and_run_in_bounded_batches(server, signature):
    client = RestClient(server.rest_url, MODEL)
    images = [image("PNG", 20 + i, 30) for i in range(LIMITS["max_instances"])]
    # 8 instances run as model calls of 3, 3 and 2: the same answers as one call on all 8.
    got = client.predict_images(images)
    expected = signature(images)
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-6)
    assert list(got["classes"]) == list(expected["classes"])
    answer = exchange(_port(server), post_head(Content_Length=len(predict_body(images + images[:1]))),
                      predict_body(images + images[:1]))
    assert answer.status == 400 and "--max-instances" in answer.json["error"]


@pytest.mark.parametrize("pixels, sizes", [
    ([10] * 7, [3, 3, 1]),                  # inference_batch_size
    ([60] * 4, [1, 1, 1, 1]),               # max_pixels (100 here) per call
    ([30, 30, 500, 30], [2, 1, 1]),          # an image over the budget runs alone
    (None, [3, 3, 1]),
])
def test_model_calls_are_bounded_by_instances_and_pixels(server, pixels, sizes):
    import dataclasses

    manager = server.manager
    servable = manager.servable(MODEL)
    arrays = {"image_bytes": np.array([b""] * (len(pixels) if pixels else 7), dtype=object)}
    saved = manager.limits
    manager.limits = dataclasses.replace(saved, max_pixels=100)
    try:
        parts = manager._parts(servable.signature(None), arrays, pixels)
    finally:
        manager.limits = saved
    assert [p.stop - p.start for p in parts] == sizes


# ---------------------------------------------------------------- signatures and labels

def test_image_bytes_sent_to_serving_examples_are_a_400(server):
    png = image("PNG", 20, 20)
    for body in (predict_body([png], signature_name="serving_examples"),
                 predict_body([b"\xff\xfe\x00 not utf-8"], signature_name="transform_features")):
        answer = exchange(_port(server), post_head(Content_Length=len(body)), body)
        assert answer.status == 400 and "tf.Example" in answer.json["error"], answer.body[:300]


def test_unknown_version_labels_are_invalid_argument_everywhere(server):
    import grpc
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    for method, path in [("GET", f"/v1/models/{MODEL}/labels/canary"),
                         ("GET", f"/v1/models/{MODEL}/labels/canary/metadata"),
                         ("POST", f"/v1/models/{MODEL}/labels/canary:predict")]:
        body = predict_body([image("PNG", 20, 20)]) if method == "POST" else b""
        head = f"{method} {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        answer = exchange(_port(server), head, body)
        assert answer.status == 400, (path, answer.body)
        assert answer.json["error"] == "Unrecognized servable version label: canary"
    # A version that is digits only in Unicode is no version either.
    answer = exchange(_port(server), f"GET /v1/models/{MODEL}/versions/\u0663 HTTP/1.1\r\n\r\n".encode("utf-8"))
    assert answer.status == 400

    channel = grpc.insecure_channel(server.grpc_target)
    try:
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        status = get_model_status_pb2.GetModelStatusRequest()
        predict = predict_pb2.PredictRequest()
        metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        for request, call in [(status, models.GetModelStatus), (predict, prediction.Predict),
                              (metadata, prediction.GetModelMetadata)]:
            request.model_spec.name = MODEL
            request.model_spec.version_label = "canary"
            with pytest.raises(grpc.RpcError) as e:
                call(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, call
            assert "Unrecognized servable version label: canary" in e.value.details()
        # Without the label: answered.
        status.model_spec.ClearField("version_label")
        assert models.GetModelStatus(status, timeout=30).model_version_status[0].version == 1
    finally:
        channel.close()


# ---------------------------------------------------------------- the header parser

@pytest.mark.parametrize("fmt, width, height, frames", [
    ("PNG", 37, 21, 1), ("JPEG", 640, 3, 1), ("BMP", 5, 700, 1), ("GIF", 33, 44, 1), ("GIF", 30, 20, 3),
    ("TIFF", 10, 10, 1), ("WEBP", 10, 10, 1),
])
def test_declared_pixels_match_what_the_image_holds(fmt, width, height, frames):
    from visiontune.serving.image_header import declared_pixels

    data = image(fmt, width, height, frames)
    # TensorFlow's GIF decoder reads every frame; other formats TensorFlow does not decode count 0.
    expected = {"TIFF": 0, "WEBP": 0}.get(fmt, width * height * (frames if fmt == "GIF" else 1))
    assert declared_pixels(data) == expected
    assert declared_pixels(png_header(16000, 16000)) == 256_000_000
    for cut in (1, 5, 12, 20):
        declared_pixels(data[:cut])   # truncated headers: no exception
