"""A bounded fuzz test of the built-in REST endpoint (issue 14 item 5): random requests, never a 5xx.

Hypothesis builds requests, three in four well-framed POSTs to a predict or
classify path (so the bodies reach the JSON, tensor and example parsing and the model), the
rest from random methods, paths, HTTP versions, headers (lengths that lie,
encodings, ``Expect``) and framings, with bodies of random bytes, JSON of any
shape, or predict and classify requests with random tensors, examples and
base64; sends each over a raw loopback socket and half-closes it.  Every
answer must be a 2xx or 4xx, every connection must end (no hang: the socket has a timeout),
and the server must still answer a status request after each one.

Bounded: 150 examples, derandomized (the same ones on every run and in CI),
no example database written.
"""

from __future__ import annotations

import base64
import io
import json
import socket

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.conftest import builtin_server_fixture
from tests.test_serving import MODEL

LIMITS = dict(max_instances=4, max_body_bytes=64 << 10, max_pixels=64 * 64, inference_batch_size=2,
              workers=2, max_connections=16, idle_timeout=5.0, read_timeout=5.0)


def _png(size: int = 12) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


PNG = _png()


server = builtin_server_fixture("fuzz", LIMITS)


# ---------------------------------------------------------------- strategies

PATHS = [f"/v1/models/{MODEL}", f"/v1/models/{MODEL}:predict", f"/v1/models/{MODEL}/metadata",
         f"/v1/models/{MODEL}/versions/1:predict", f"/v1/models/{MODEL}/versions/1",
         f"/v1/models/{MODEL}/labels/stable:predict", f"/v1/models/{MODEL}:classify",
         f"/v1/models/{MODEL}:regress", "/v1/models/nope:predict",
         f"/v1/models/{MODEL}/versions/99999999999999999999999:predict", "/", "*", "/v1/models/",
         f"/v1/models/{MODEL}:predict?x=1"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
b64_values = st.one_of(st.just(PNG), st.binary(max_size=64), st.just(_png(65))).map(
    lambda b: {"b64": base64.b64encode(b).decode()})
instances = st.lists(st.one_of(b64_values, json_values, st.dictionaries(
    st.sampled_from(["image_bytes", "examples", "x"]), st.one_of(b64_values, json_values), max_size=2)),
    max_size=6)
predict_bodies = st.fixed_dictionaries(
    {}, optional={"instances": instances, "inputs": st.one_of(instances, json_values),
                  "signature_name": st.one_of(st.sampled_from(["serving_default", "serving_examples",
                                                               "transform_features", "nope"]), json_values)})
example_objects = st.dictionaries(
    st.sampled_from(["image", "x"]), st.one_of(b64_values, json_values, st.lists(b64_values, max_size=2)),
    max_size=2)
classify_bodies = st.fixed_dictionaries(
    {}, optional={"examples": st.one_of(st.lists(st.one_of(example_objects, json_values), max_size=5), json_values),
                  "context": st.one_of(example_objects, json_values),
                  "signature_name": st.one_of(st.sampled_from(["classification", "serving_default", "nope"]),
                                              json_values)})
bodies = st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: json.dumps(v).encode()),
    predict_bodies.map(lambda v: json.dumps(v).encode()),
    classify_bodies.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),      # deep nesting
    st.just(b"x" * ((64 << 10) + 1)),                             # one byte over the limit
)
header_values = st.one_of(st.integers(-2**70, 2**70).map(str), st.text(max_size=30),
                          st.sampled_from(["chunked", "gzip, chunked", "100-continue", "close", "keep-alive",
                                           "0", "-1", "application/json"]))
headers = st.lists(st.tuples(st.one_of(st.sampled_from(["Content-Length", "Transfer-Encoding", "Expect",
                                                        "Connection", "Content-Type", "Host"]),
                                       st.text(max_size=12)), header_values), max_size=5)


@st.composite
def requests(draw) -> bytes:
    """Mostly well-framed POSTs to the predict and classify paths (where the model and the JSON parsing are), the rest
    wild: any method, path, HTTP version, headers and framing."""
    wild = draw(st.integers(0, 3)) == 0
    if wild:
        method = draw(st.one_of(st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE"]), st.text(max_size=8)))
        path = draw(st.one_of(st.sampled_from(PATHS), st.text(max_size=40)))
        version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", ""]))
        framing = draw(st.sampled_from(["length", "chunked", "headers-only"]))
    else:
        method, version = "POST", "HTTP/1.1"
        path = draw(st.sampled_from([p for p in PATHS if p.endswith((":predict", ":classify", ":regress"))]))
        framing = draw(st.sampled_from(["length", "length", "chunked"]))
    body = draw(bodies)
    lines = [f"{method} {path} {version}".rstrip()]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        size = draw(st.integers(1, 300))
        body = b"".join(f"{len(body[i:i + size]):x}\r\n".encode() + body[i:i + size] + b"\r\n"
                        for i in range(0, len(body), size)) + b"0\r\n\r\n"
    if wild or draw(st.booleans()):
        lines += [f"{k}: {v}" for k, v in draw(headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body


# ---------------------------------------------------------------- the test

def _answers(sock: socket.socket):
    """Statuses of every response on the connection until the server closes it."""
    buffer, statuses = b"", []
    while True:
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)   # socket.timeout here is a hang: the test fails
            if not data:
                return statuses, buffer
            buffer += data
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        statuses.append((int(lines[0].split()[1]), lines))
        length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                       if k.lower() == "content-length"), 0)
        while len(buffer) < length:
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
        buffer = buffer[length:]


def _status_ok(server) -> bool:
    port = int(server.rest_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET /v1/models/{MODEL} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        statuses, _ = _answers(sock)
    return [s for s, _ in statuses] == [200]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(raw=requests())
def test_random_requests_get_a_4xx_never_a_5xx_crash_or_hang(server, raw):
    port = int(server.rest_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)   # the request ends here, whatever its headers announced
        except OSError:
            pass                            # refused and closed while we were still sending: fine
        reset = False
        try:
            statuses, _ = _answers(sock)
        except ConnectionResetError:
            # Refused and closed with our unread bytes in its buffer: the answer may be lost.
            statuses, reset = [], True
    request_line = raw.split(b"\r\n", 1)[0]
    for status, lines in statuses:
        assert status < 500, (request_line[:100], lines)
    # Every request that has a request line gets an answer.
    assert statuses or reset or not raw.strip(b"\r\n"), request_line[:100]
    assert _status_ok(server)
