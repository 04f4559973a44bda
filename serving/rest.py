"""TF Serving's REST API over the built-in model server (stdlib HTTP, HTTP/1.1 keep-alive).

Routes (TF Serving's; the model's name and version go in the path):

* ``GET  /v1/models/{name}[/versions/{v}]``           version status
* ``GET  /v1/models/{name}[/versions/{v}]/metadata``  signatures
* ``POST /v1/models/{name}[/versions/{v}]:predict``    row or columnar JSON

Errors are TF Serving's: ``{"error": "..."}`` with 400 for a bad request, 404
for an unknown model or version (a body over the size limit is a bad request
too, answered before it is read).  Every response is written with one ``send`` on a TCP_NODELAY
socket: a status line and a body in two packets would meet the client's
delayed ACK and add ~40 ms to every request.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Tuple

from visiontune.serving import tensors
from visiontune.serving.model_server import ModelManager, ServingError, invalid

log = logging.getLogger("visiontune.serving")

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)"
                   r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
                   r"(?::(?P<method>[a-z]+)|/(?P<metadata>metadata))?/?$", re.IGNORECASE)


def _version(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    if not text.isdigit():
        raise invalid(f"Failed to convert version: {text} to numeric.")
    return int(text)


def status_json(manager: ModelManager, name: str, version: Optional[int]):
    return {"model_version_status": [
        {"version": str(s.version), "state": s.state,
         "status": {"error_code": s.error_code, "error_message": s.error_message}}
        for s in manager.status(name, version)]}


def metadata_json(manager: ModelManager, name: str, version: Optional[int], label: Optional[str]):
    from google.protobuf import json_format

    servable = manager.servable(name, version, label)
    defs = {k: json_format.MessageToDict(v, preserving_proto_field_name=True)
            for k, v in sorted(servable.signature_defs.items())}
    return {"model_spec": {"name": name, "signature_name": "", "version": str(servable.version)},
            "metadata": {"signature_def": {"signature_def": defs}}}


def predict_json(manager: ModelManager, name: str, version: Optional[int], label: Optional[str],
                 body: bytes):
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"JSON Parse error: {e}") from None
    if not isinstance(request, dict):
        raise invalid("JSON Parse error: the request body must be a JSON object")
    servable = manager.servable(name, version, label)
    signature_name = request.get("signature_name")
    if signature_name is not None and not isinstance(signature_name, str):
        raise invalid("'signature_name' must be a string")
    signature = servable.signature(signature_name)
    inputs, fmt = tensors.parse_predict_request(request, signature.inputs)
    outputs = manager.predict(servable, signature, inputs)
    return tensors.make_predict_response(outputs, fmt)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: clients reuse one connection
    server_version = "visiontune-model-server"
    manager: ModelManager           # set on the subclass the server builds

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, payload, close: bool = False) -> None:
        body = json.dumps(payload).encode("utf-8")
        head = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                + ("Connection: close\r\n" if close else "") + "\r\n").encode("latin-1")
        self.log_request(status, len(body))
        self.wfile.write(head + body)
        if close:
            self.close_connection = True

    def _discard(self, length: int) -> None:
        """Reads and drops an unwanted body, a chunk at a time, before the connection closes.

        Closing a socket with unread input makes the kernel send RST, and a
        client still sending may then lose the 400 answer already on its way.
        """
        self.connection.settimeout(5)
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass

    def _route(self) -> Tuple[re.Match, str]:
        path = self.path.split("?", 1)[0]
        match = _PATH.match(path)
        if match is None:
            raise invalid(f"Malformed request: {self.command} {path}")
        return match, path

    def do_GET(self):
        try:
            match, path = self._route()
            if match["method"]:
                raise invalid(f"Malformed request: GET {path}")
            version = _version(match["version"])
            if match["metadata"]:
                payload = metadata_json(self.manager, match["name"], version, match["label"])
            else:
                payload = status_json(self.manager, match["name"], version)
            self._send(200, payload)
        except ServingError as e:
            self._send(e.http_status, {"error": e.message})
        except Exception as e:  # the server must keep serving whatever a request does
            log.exception("GET %s failed", self.path)
            self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def do_POST(self):
        limit = self.manager.limits.max_body_bytes
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            # No body length (chunked upload or none): refuse rather than read an unbounded stream.
            self._send(400, {"error": "a Content-Length header is required"}, close=True)
            return
        if length > limit:
            self._send(400, {"error": f"request body of {length} bytes exceeds the server's limit of "
                                      f"{limit} bytes (--max-body-bytes)"}, close=True)
            self._discard(min(length, 16 * limit))
            return
        body = self.rfile.read(length)
        try:
            match, path = self._route()
            method = (match["method"] or "").lower()
            if method != "predict":
                if method in ("classify", "regress"):
                    raise ServingError("UNIMPLEMENTED", f"the built-in server implements :predict only, "
                                                        f"not :{method}")
                raise invalid(f"Malformed request: POST {path}")
            payload = predict_json(self.manager, match["name"], _version(match["version"]),
                                   match["label"], body)
            self._send(200, payload)
        except ServingError as e:
            self._send(e.http_status, {"error": e.message})
        except Exception as e:
            log.exception("POST %s failed", self.path)
            self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})


class RestServer:
    """A threaded HTTP server (one thread per connection) in a background thread."""

    def __init__(self, manager: ModelManager, host: str = "127.0.0.1", port: int = 8501):
        handler = type("Handler", (_Handler,), {"manager": manager})
        server_class = type("Server", (ThreadingHTTPServer,), {
            "allow_reuse_address": True,
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self.httpd = server_class((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "RestServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="rest", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
