"""A small client for TF Serving (real or built-in), over REST or gRPC.

    from visiontune.serving.client import RestClient, classify_files
    client = RestClient("http://localhost:8501", "gtsrb")
    for row in classify_files(client, ["stop.ppm"], top_k=3):
        print(row["image"], row["top_k"])

Both clients return the signature's outputs as numpy arrays by name (strings
as ``bytes``), exactly what ``tf.saved_model.load(...).signatures[...]`` gives
in process, so code can switch between the three.  Images are encoded with
:func:`serving.images.encode_for_serving` (PPM, TIFF, WebP... become PNG).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import threading
import urllib.parse
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from visiontune import features


class PredictionError(Exception):
    """The server refused a request: ``code`` is the gRPC status name, ``http_status`` REST's."""

    def __init__(self, message: str, code: str = "UNKNOWN", http_status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status


_HTTP_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 411: "INVALID_ARGUMENT",
               413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 501: "UNIMPLEMENTED",
               503: "UNAVAILABLE"}


def _from_json(value) -> np.ndarray:
    """A JSON output value -> numpy (strings and ``{"b64"}`` as bytes, like in-process outputs)."""
    def convert(v):
        if isinstance(v, list):
            return [convert(x) for x in v]
        if isinstance(v, dict) and "b64" in v:
            return base64.b64decode(v["b64"])
        if isinstance(v, str):
            return v.encode("utf-8")
        return v

    converted = convert(value)
    array = np.array(converted, dtype=object if _has_bytes(converted) else None)
    return array


def _has_bytes(v) -> bool:
    while isinstance(v, list) and v:
        v = v[0]
    return isinstance(v, bytes)


def _json_value(array) -> object:
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind == "S":
        def enc(v):
            if isinstance(v, list):
                return [enc(x) for x in v]
            return {"b64": base64.b64encode(v if isinstance(v, bytes) else str(v).encode()).decode("ascii")}
        return enc(array.tolist())
    return array.tolist()


class RestClient:
    """TF Serving's REST API over one keep-alive HTTP connection per thread."""

    def __init__(self, url: str, model: str, version: Optional[int] = None,
                 signature: Optional[str] = None, timeout: float = 60.0, label: Optional[str] = None):
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"{url}: the REST server URL must be http:// or https://")
        self.url = f"{parsed.scheme}://{parsed.netloc}"
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname, parsed.port or (443 if self._https else 80)
        self.model, self.version, self.signature, self.timeout = model, version, signature, timeout
        self.label = label   # a version label (version_labels in the model config), used without a version
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            conn.connect()
            # Small requests and answers: do not let Nagle hold them back.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, body: Optional[bytes] = None) -> dict:
        """One call; the JSON answer, or :class:`PredictionError` with the server's message."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (0, 1):
            try:
                conn = self._connection()
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except BrokenPipeError as e:
                # The server answered early (a body over its limit) and stopped reading:
                # its answer may be waiting to be read.
                try:
                    response = conn.getresponse()
                    data = response.read()
                    self.close()
                    break
                except (OSError, http.client.HTTPException):
                    self.close()
                    if attempt:
                        raise PredictionError(f"cannot reach {self.url}: {e}", "UNAVAILABLE") from None
            except (ConnectionError, http.client.HTTPException, socket.timeout, OSError) as e:
                self.close()
                # A keep-alive connection the server closed: retry once on a new one.
                if attempt or isinstance(e, (ConnectionRefusedError, socket.timeout)):
                    raise PredictionError(f"cannot reach {self.url}: {e}", "UNAVAILABLE") from None
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        try:
            payload = json.loads(data) if data else {}
        except ValueError:
            payload = {"error": data.decode("utf-8", "replace")[:500]}
        if response.status != 200:
            message = payload.get("error", "") if isinstance(payload, dict) else str(payload)
            raise PredictionError(message or f"HTTP {response.status}",
                                  _HTTP_CODES.get(response.status, "UNKNOWN"), response.status)
        return payload

    def _model_path(self, version: Optional[int]) -> str:
        path = f"/v1/models/{urllib.parse.quote(self.model, safe='')}"
        version = self.version if version is None else version
        if version is None and self.label:
            return path + f"/labels/{urllib.parse.quote(self.label, safe='')}"
        return path + (f"/versions/{int(version)}" if version is not None else "")

    def status(self, version: Optional[int] = None) -> dict:
        return self.request("GET", self._model_path(version))

    def metadata(self, version: Optional[int] = None) -> dict:
        return self.request("GET", self._model_path(version) + "/metadata")

    def predict_json(self, body: dict, version: Optional[int] = None) -> dict:
        signature = body.get("signature_name", self.signature)
        if signature:
            body = {**body, "signature_name": signature}
        return self.request("POST", self._model_path(version) + ":predict", json.dumps(body).encode())

    def predict(self, inputs: Mapping[str, object], version: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Any signature, columnar format: numpy inputs by name -> numpy outputs by name."""
        answer = self.predict_json({"inputs": {k: _json_value(v) for k, v in inputs.items()}}, version)
        outputs = answer["outputs"]
        if not isinstance(outputs, dict):  # one output comes back bare; its name is unknown here
            return {"outputs": _from_json(outputs)}
        return {k: _from_json(v) for k, v in outputs.items()}

    def predict_images(self, images: Sequence[bytes], version: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Encoded images -> ``serving_default`` outputs, in the row format a REST user writes."""
        instances = [{"b64": base64.b64encode(b).decode("ascii")} for b in images]
        predictions = self.predict_json({"instances": instances}, version)["predictions"]
        if predictions and isinstance(predictions[0], dict):
            return {k: _from_json([p[k] for p in predictions]) for k in predictions[0]}
        return {"predictions": _from_json(predictions)}


class GrpcClient:
    """TF Serving's gRPC API (``PredictionService``, ``ModelService``)."""

    def __init__(self, target: str, model: str, version: Optional[int] = None,
                 signature: Optional[str] = None, timeout: float = 60.0, label: Optional[str] = None):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.target, self.model, self.version, self.signature, self.timeout = (
            target, model, version, signature, timeout)
        self.label = label   # a version label, used when no version is given
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1),
                                                               ("grpc.max_send_message_length", -1)])
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _spec(self, spec, version: Optional[int], signature: bool = True) -> None:
        spec.name = self.model
        version = self.version if version is None else version
        if version is not None:
            spec.version.value = int(version)
        elif self.label:
            spec.version_label = self.label
        if signature and self.signature:
            spec.signature_name = self.signature

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code()
            raise PredictionError(e.details() or str(code), code.name if code else "UNKNOWN") from None

    def status(self, version: Optional[int] = None):
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, version, signature=False)
        return self._call(self._models.GetModelStatus, request)

    def metadata(self, version: Optional[int] = None):
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec, version, signature=False)
        request.metadata_field.append("signature_def")
        response = self._call(self._predict.GetModelMetadata, request)
        defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(defs)
        return response, defs

    def predict_response(self, inputs: Mapping[str, object], version: Optional[int] = None):
        """The raw ``PredictResponse`` (its ``model_spec`` says which version answered)."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, version)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        return self._call(self._predict.Predict, request)

    def predict(self, inputs: Mapping[str, object], version: Optional[int] = None) -> Dict[str, np.ndarray]:
        import tensorflow as tf

        response = self.predict_response(inputs, version)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def predict_images(self, images: Sequence[bytes], version: Optional[int] = None) -> Dict[str, np.ndarray]:
        return self.predict({features.IMAGE_BYTES_INPUT: np.array(list(images), dtype=object)}, version)


# ---------------------------------------------------------------- top-k classification

def load_class_names(path: str) -> List[str]:
    """``classes.txt``, or the one in a SavedModel's ``assets.extra/``, or in a base path's newest version."""
    candidates = [path, os.path.join(path, features.METADATA_DIR, features.CLASSES_FILE)]
    if os.path.isdir(path):
        from visiontune.components.model_versions import latest_version

        newest = latest_version(os.listdir(path))   # ASCII digits only: a folder named ² is no version
        if newest is not None:
            candidates.append(os.path.join(path, newest, features.METADATA_DIR, features.CLASSES_FILE))
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f if line.strip()]
    raise FileNotFoundError(f"no classes.txt at {path} (nor in assets.extra/ of it or of its newest version)")


def top_k(outputs: Mapping[str, np.ndarray], k: int = 3,
          class_names: Optional[Sequence[str]] = None) -> List[List[dict]]:
    """Per image, the k most probable classes: ``{"class", "class_id", "probability"}``.

    Names come from ``class_names`` when given; otherwise the model's own
    ``classes`` output names the top class and others show as their id.
    """
    probabilities = np.asarray(outputs[features.PROBABILITIES_OUTPUT], dtype=np.float64)
    learned = {}
    if features.CLASSES_OUTPUT in outputs and features.CLASS_IDS_OUTPUT in outputs:
        for name, cid in zip(np.ravel(outputs[features.CLASSES_OUTPUT]),
                             np.ravel(outputs[features.CLASS_IDS_OUTPUT])):
            learned[int(cid)] = name.decode("utf-8") if isinstance(name, bytes) else str(name)
    rows = []
    for probs in probabilities:
        order = np.argsort(-probs, kind="stable")[:k]
        rows.append([{"class": (class_names[i] if class_names and i < len(class_names)
                                else learned.get(int(i), f"#{int(i)}")),
                      "class_id": int(i), "probability": float(probs[i])} for i in order])
    return rows




def _mask_rows(paths: Sequence[str], outputs: Mapping[str, np.ndarray], masks_dir: Optional[str]
               ) -> List[dict]:
    """Segmentation answers: the mask PNG per image (saved under ``masks_dir``) and its foreground share."""
    import io

    from PIL import Image

    rows = []
    probability = np.asarray(outputs.get(features.FOREGROUND_PROBABILITY_OUTPUT, []), dtype=np.float64)
    for i, (path, png) in enumerate(zip(paths, np.ravel(outputs[features.MASK_BYTES_OUTPUT]))):
        mask = Image.open(io.BytesIO(png))
        row = {"image": path, "mask_size": list(mask.size),
               "mask_values": sorted(int(v) for v in np.unique(np.asarray(mask)))}
        if probability.size:
            row["foreground_share"] = float((probability[i] >= 0.5).mean())
        if masks_dir:
            os.makedirs(masks_dir, exist_ok=True)
            row["mask"] = os.path.join(masks_dir, os.path.splitext(os.path.basename(path))[0] + "_mask.png")
            with open(row["mask"], "wb") as f:
                f.write(png)
        rows.append(row)
    return rows


def classify_files(client, paths: Sequence[str], top: int = 3, batch_size: int = 32,
                   class_names: Optional[Sequence[str]] = None,
                   masks_dir: Optional[str] = None) -> List[dict]:
    """Sends image files (any format Pillow reads) in batches; top-k classes per file.

    A segmentation model answers with a mask per image instead: the row then
    has the mask's size and values, and the PNG is written to ``masks_dir``.
    """
    from visiontune.serving.images import encode_for_serving

    results = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        outputs = client.predict_images([encode_for_serving(p) for p in chunk])
        if features.MASK_BYTES_OUTPUT in outputs:
            results.extend(_mask_rows(chunk, outputs, masks_dir))
            continue
        if features.PROBABILITIES_OUTPUT not in outputs:
            raise PredictionError("the signature has no 'probabilities' output to rank", "INVALID_ARGUMENT")
        for path, classes in zip(chunk, top_k(outputs, top, class_names)):
            results.append({"image": path, "top_k": classes})
    return results
