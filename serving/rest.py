"""TF Serving's REST API over the built-in model server (HTTP/1.1 keep-alive, asyncio + a worker pool).

Routes (TF Serving's; the model's name and version go in the path):

* ``GET  /v1/models/{name}[/versions/{v}]``           version status
* ``GET  /v1/models/{name}[/versions/{v}]/metadata``  signatures
* ``POST /v1/models/{name}[/versions/{v}]:predict``    row or columnar JSON
* ``POST /v1/models/{name}[/versions/{v}]:classify``   ``{"examples": [...]}`` (``serving/classify.py``)
* ``POST /v1/models/{name}[/versions/{v}]:regress``    the same; our models have no regression signature
* ``GET  /monitoring/prometheus/metrics``             the server's metrics (:mod:`serving.metrics`)

``/labels/{label}`` in place of ``/versions/{v}`` names a version by its label
(``version_labels`` in the model config); an unknown label is a 400, as TF
Serving answers.  ``manager`` is a ``ServerCore`` (several models, labels) or
one ``ModelManager``.

Errors are TF Serving's: ``{"error": "..."}`` with 400 for a bad request, 404
for an unknown model or version.  The connection layer answers on its own:

* 413 for a body over ``max_body_bytes``: counted on the bytes read, so a
  chunked body is cut off at the limit, and a ``Content-Length`` over it is
  refused before any of the body is read;
* 400 for a ``Content-Length`` that is not a byte count (``-1``), 411 for a
  POST with no length at all (the bytes after it would otherwise be read as
  the body "until the connection closes");
* 431 for a request head over 64 KiB.

Each refused connection is closed after a short, bounded drain (so the
client reads the answer instead of a reset), never after reading what it
sends.

Why asyncio: an idle keep-alive connection is a coroutine waiting on a socket,
not a thread; requests are computed in a pool of ``workers`` threads.  A
connection idle for ``idle_timeout`` is closed; a request must arrive whole
within ``read_timeout`` of its first byte; at ``max_connections`` the oldest
idle connection is closed for a new one (503 when none is idle).  Every
response is written with one ``send`` on a TCP_NODELAY socket (asyncio's
default): a status line and a body in two packets would meet the client's
delayed ACK and add ~40 ms to every request.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Dict, Optional, Tuple

from visiontune.serving import classify, metrics, tensors
from visiontune.serving.model_server import ModelManager, ServingError, invalid

log = logging.getLogger("visiontune.serving")

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)"
                   r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
                   r"(?::(?P<method>[a-z]+)|/(?P<metadata>metadata))?/?$", re.IGNORECASE)

MAX_HEAD_BYTES = 64 << 10   # request line + headers
MAX_HEADERS = 100
_LINGER_SECONDS = 2.0       # drain after a refusal, so the client sees the answer, not a reset


def _version(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise invalid(f"Failed to convert version: {text} to numeric.")
    return int(text)


def status_json(manager: ModelManager, name: str, version: Optional[int], label: Optional[str] = None):
    return {"model_version_status": [
        {"version": str(s.version), "state": s.state,
         "status": {"error_code": s.error_code, "error_message": s.error_message}}
        for s in manager.status(name, version, label)]}


def metadata_json(manager: ModelManager, name: str, version: Optional[int], label: Optional[str]):
    from google.protobuf import json_format

    servable = manager.servable(name, version, label)
    defs = {k: json_format.MessageToDict(v, preserving_proto_field_name=True)
            for k, v in sorted(servable.signature_defs.items())}
    return {"model_spec": {"name": name, "signature_name": "", "version": str(servable.version)},
            "metadata": {"signature_def": {"signature_def": defs}}}


def predict_json(manager: ModelManager, name: str, version: Optional[int], label: Optional[str],
                 body: bytes):
    request = tensors.parse_json_body(body)
    servable = manager.servable(name, version, label)
    signature_name = request.get("signature_name")
    if signature_name is not None and not isinstance(signature_name, str):
        raise invalid("'signature_name' must be a string")
    signature = servable.signature(signature_name)
    try:
        inputs, fmt = tensors.parse_predict_request(request, signature.inputs)
    except RecursionError:
        raise invalid("the request's values are nested too deeply") from None
    outputs = manager.predict(servable, signature, inputs)
    return tensors.make_predict_response(outputs, fmt)


def handle(manager: ModelManager, method: str, target: str, body: bytes) -> Tuple[int, object]:
    """One request's (HTTP status, JSON payload): the API itself, without the connection layer."""
    try:
        path = target.split("?", 1)[0]
        match = _PATH.match(path)
        if match is None or method not in ("GET", "POST"):
            raise invalid(f"Malformed request: {method} {path}")
        version, label = _version(match["version"]), match["label"]
        api_method = (match["method"] or "").lower()
        if method == "GET":
            if api_method:
                raise invalid(f"Malformed request: GET {path}")
            if match["metadata"]:
                return 200, metadata_json(manager, match["name"], version, label)
            return 200, status_json(manager, match["name"], version, label)
        if api_method == "classify":
            return 200, classify.classify_json(manager, match["name"], version, label, body)
        if api_method == "regress":
            return 200, classify.regress_json(manager, match["name"], version, label, body)
        if api_method != "predict":
            raise invalid(f"Malformed request: POST {path}")
        return 200, predict_json(manager, match["name"], version, label, body)
    except ServingError as e:
        metrics.note(status=e.code)
        return e.http_status, {"error": e.message}
    except Exception as e:  # the server must keep serving whatever a request does
        log.exception("%s %s failed", method, target[:200])
        return 500, {"error": f"internal error: {type(e).__name__}: {e}"}


class _Text(bytes):
    """A body that is not JSON: the metrics page."""

    content_type = metrics.CONTENT_TYPE


def _api(method: str, path: str) -> str:
    """TF Serving's name for the API a REST request calls (its metrics' ``API`` label)."""
    match = _PATH.match(path)
    if match is None:
        return ""
    if method == "GET":
        return "GetModelMetadata" if match["metadata"] else "GetModelStatus"
    api = (match["method"] or "").lower()
    return api.capitalize() if api in ("predict", "classify", "regress") else ""   # never a client's word


def _answer(manager: ModelManager, method: str, target: str, body: bytes) -> Tuple[int, bytes]:
    """``handle`` with the JSON encoded too, in the worker (a big answer must not stall the loop).

    Also serves the metrics page (TF Serving's ``/monitoring/prometheus/metrics``) and counts every other
    request in the server's metrics.
    """
    server_metrics = getattr(manager, "metrics", None)
    path = target.split("?", 1)[0]
    if server_metrics is None or not server_metrics.enabled:
        status, payload = handle(manager, method, target, body)
    elif path == server_metrics.path and method == "GET":
        return 200, _Text(server_metrics.exposition())
    else:
        with server_metrics.request(_api(method, path), "REST") as record:
            status, payload = handle(manager, method, target, body)
            record.http_status(status)
    return status, json.dumps(payload).encode("utf-8")


class _Refused(Exception):
    """A request the connection layer answers itself; the connection closes after it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Request:
    def __init__(self, method: str, target: str, version: str, headers: Dict[str, str]):
        self.method, self.target, self.version, self.headers = method, target, version, headers

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def _parse_head(head: bytes) -> _Request:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/"):
        raise _Refused(400, f"malformed request line: {lines[0][:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Refused(400, f"HTTP version {version[:20]!r} is not supported (HTTP/1.1 is)")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Refused(400, f"malformed header line: {line[:100]!r}")
        name, value = name.lower(), value.strip()
        if name in headers and name in ("content-length", "transfer-encoding") and headers[name] != value:
            raise _Refused(400, f"conflicting {name} headers")
        headers[name] = value
        if len(headers) > MAX_HEADERS:
            raise _Refused(431, f"more than {MAX_HEADERS} headers")
    return _Request(method.upper(), target, version, headers)


class _Connection:
    """One client connection: its streams, and whether it waits between requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.idle = True

    def close(self) -> None:
        self.writer.close()


class RestServer:
    """The REST API in a background thread: one asyncio loop for the sockets, a pool for the requests."""

    def __init__(self, manager: ModelManager, host: str = "127.0.0.1", port: int = 8501):
        self.manager = manager
        limits = manager.limits
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))   # here, not in the loop: a port in use is the caller's error
            sock.listen(512)
        except OverflowError as e:    # port outside 0-65535
            sock.close()
            raise OSError(str(e)) from None
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self._pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="rest")
        self._loop = asyncio.new_event_loop()
        self._connections: "collections.OrderedDict[_Connection, None]" = collections.OrderedDict()
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._stopping: Optional[asyncio.Event] = None
        self._busy: Optional[asyncio.Semaphore] = None

    @property
    def limits(self):
        """The manager's limits, read per request (the pool's size is fixed when the server starts)."""
        return self.manager.limits

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def start(self) -> "RestServer":
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),),
                                        name="rest", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        return self

    def stop(self) -> None:
        if self._thread is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False)
        if not self._loop.is_running():
            self._loop.close()
        self._sock.close()

    # ------------------------------------------------------------------ the loop

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        # At most 2 bodies per worker are held (read, or queued for a worker) at once.
        self._busy = asyncio.Semaphore(2 * self.limits.workers)
        server = await asyncio.start_server(self._client, sock=self._sock, limit=MAX_HEAD_BYTES)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for conn in list(self._connections):
                conn.close()
            await server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(reader, writer)
        if len(self._connections) >= self.limits.max_connections:
            idle = next((c for c in self._connections if c.idle), None)
            if idle is None:
                await self._refuse(conn, _Refused(503, f"the server holds {self.limits.max_connections} "
                                                       "busy connections; retry later"))
                return
            idle.close()   # HTTP lets a server close an idle keep-alive connection at any time
            self._connections.pop(idle, None)
        self._connections[conn] = None
        try:
            while await self._one_request(conn):
                pass
        except _Refused as e:
            await self._refuse(conn, e)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass   # the client went away, stalled or idled out: nobody to answer
        except Exception:  # keep the loop serving whatever a connection does
            log.exception("REST connection failed")
        finally:
            self._connections.pop(conn, None)
            conn.close()

    async def _one_request(self, conn: _Connection) -> bool:
        """Reads, computes and answers one request; whether the connection stays open."""
        reader = conn.reader
        conn.idle = True
        first = await asyncio.wait_for(reader.readexactly(1), self.limits.idle_timeout)
        conn.idle = False
        deadline = time.monotonic() + self.limits.read_timeout
        try:
            return await self._request(conn, first, deadline)
        except asyncio.TimeoutError:
            raise _Refused(408, f"the request did not arrive whole within {self.limits.read_timeout:g} s "
                                "of its first byte") from None

    async def _request(self, conn: _Connection, first: bytes, deadline: float) -> bool:
        reader = conn.reader
        try:
            head = first + await self._within(reader.readuntil(b"\r\n\r\n"), deadline)
        except asyncio.LimitOverrunError:
            raise _Refused(431, f"request head over {MAX_HEAD_BYTES} bytes") from None
        except asyncio.IncompleteReadError as e:
            if e.partial.strip() or first.strip():
                raise _Refused(400, "the request head ends early") from None
            raise
        head = head.lstrip(b"\r\n")   # RFC 9112: empty lines before a request line are ignored
        if not head.strip():
            return True
        request = _parse_head(head)
        async with self._busy:
            try:
                body = await self._read_body(conn, request, deadline)
            except asyncio.IncompleteReadError:   # the client may have shut down its side only: answer
                raise _Refused(400, "the request body ends before the length it announced") from None
            status, data = await asyncio.get_running_loop().run_in_executor(
                self._pool, _answer, self.manager, request.method, request.target, body)
            del body
        keep = request.keep_alive
        await self._write(conn, status, data, keep, http10=request.version == "HTTP/1.0")
        return keep

    @staticmethod
    async def _within(awaitable, deadline: float):
        return await asyncio.wait_for(awaitable, max(0.001, deadline - time.monotonic()))

    async def _read_body(self, conn: _Connection, request: _Request, deadline: float) -> bytes:
        limit = self.limits.max_body_bytes
        reader, headers = conn.reader, request.headers
        too_big = f"request body over the server's limit of {limit} bytes (--max-body-bytes)"
        if "transfer-encoding" in headers:
            if "content-length" in headers:
                raise _Refused(400, "both Transfer-Encoding and Content-Length: send one")
            if headers["transfer-encoding"].lower() != "chunked":
                raise _Refused(400, f"Transfer-Encoding {headers['transfer-encoding'][:40]!r} is not "
                                    "supported (chunked is)")
            await self._continue(conn, request)
            chunks, total = [], 0
            while True:
                try:
                    line = await self._within(reader.readuntil(b"\r\n"), deadline)
                except asyncio.LimitOverrunError:
                    raise _Refused(400, "malformed chunk size line") from None
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF"
                                                               for c in size_text):
                    raise _Refused(400, f"malformed chunk size {size_text[:20]!r}")
                size = int(size_text, 16)
                if size == 0:
                    break
                total += size
                if total > limit:
                    raise _Refused(413, too_big)
                chunk = await self._within(reader.readexactly(size + 2), deadline)
                if chunk[-2:] != b"\r\n":
                    raise _Refused(400, "a chunk does not end with CRLF")
                chunks.append(chunk[:-2])
            while True:   # trailer fields, up to the empty line
                try:
                    line = await self._within(reader.readuntil(b"\r\n"), deadline)
                except asyncio.LimitOverrunError:
                    raise _Refused(431, "chunked trailer too long") from None
                if line == b"\r\n":
                    break
            return b"".join(chunks)
        text = headers.get("content-length")
        if text is None:
            if request.method == "POST":
                raise _Refused(411, "a POST needs a Content-Length header (or Transfer-Encoding: chunked)")
            return b""
        if not (text.isascii() and text.isdigit()) or len(text) > 19:
            raise _Refused(400, f"Content-Length {text[:30]!r} is not a byte count")
        length = int(text)
        if length > limit:
            raise _Refused(413, f"request body of {length} bytes is over the server's limit of {limit} "
                                "bytes (--max-body-bytes)")
        await self._continue(conn, request)
        return await self._within(reader.readexactly(length), deadline) if length else b""

    async def _continue(self, conn: _Connection, request: _Request) -> None:
        """Answers ``Expect: 100-continue`` (curl sends it for bodies over 1 KiB) once the body is welcome."""
        if request.version == "HTTP/1.1" and request.headers.get("expect", "").lower() == "100-continue":
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await conn.writer.drain()

    async def _write(self, conn: _Connection, status: int, data: bytes, keep: bool, http10: bool = False) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        content_type = getattr(data, "content_type", "application/json")
        head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(data)}\r\nServer: visiontune-model-server\r\n"
                + ("Connection: close\r\n" if not keep else "Connection: keep-alive\r\n" if http10 else "")
                + "\r\n").encode("latin-1")
        conn.writer.write(head + data)
        await asyncio.wait_for(conn.writer.drain(), self.limits.read_timeout)
        log.debug("%s %d %d", conn.writer.get_extra_info("peername"), status, len(data))

    async def _refuse(self, conn: _Connection, refusal: _Refused) -> None:
        """Answers, then drains (bounded in time and bytes) so the answer is read, not reset away."""
        try:
            await self._write(conn, refusal.status, json.dumps({"error": refusal.message}).encode(), keep=False)
            if conn.writer.can_write_eof():
                conn.writer.write_eof()
            deadline, left = time.monotonic() + _LINGER_SECONDS, self.limits.max_body_bytes
            while left > 0 and time.monotonic() < deadline:
                data = await self._within(conn.reader.read(min(left, 1 << 16)), deadline)
                if not data:
                    break
                left -= len(data)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
