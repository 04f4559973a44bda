"""The built-in model server's core: versions of one model, loaded and swapped safely.

TF Serving watches ``BASE_PATH/<version>/`` and serves the latest N versions; this module does the same for
the built-in server (``visiontune serve`` when no ``tensorflow_model_server`` is installed):

* A poller thread rescans the base path every ``poll_seconds``.  A version folder's name is ASCII digits
  (:func:`model_versions.version_number`; anything else, such as ``²`` or the Pusher's hidden temporary
  folders, is ignored).  It is a candidate once ``saved_model.pb`` is there (the Pusher renames a complete
  copy into place; other tools write that file last) *and* the folder has not changed since the previous
  scan, so a copy still in progress is never loaded.
* The new version is loaded and warmed up in the poller thread while the previous ones keep answering; it
  joins the served set in one atomic swap. A version that fails to load is reported (``END`` with the error)
  and retried only when its files change; it never displaces a good version.
* The versions the version policy picks stay available by number (TF Serving's ``model_version_policy``:
  the latest ``num_versions``, all, or specific ones); the others are unloaded after the new one is
  serving.  A request holds a reference to its version, so unloading never breaks one in flight.

Request handling (:meth:`ModelManager.predict`) validates inputs against the signature, refuses images whose
header declares more than ``max_pixels``, runs the model in calls of at most ``inference_batch_size``
instances (so a request of 1,000 images costs the memory of 32 at a time), and raises :class:`ServingError`
with TF Serving's status codes, which the REST and gRPC front ends turn into their own error shapes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from visiontune import features
from visiontune.serving import batching, image_header, metrics, version_scan
from visiontune.serving.model_config import VersionPolicy

log = logging.getLogger("visiontune.serving")
# protobuf's C++ parser warns (besides stopping early) on bytes that are not a message; the request
# gets a 400 that says so (_declared_pixels), the log needs no warning per request.
warnings.filterwarnings("ignore", message="Unexpected end-group tag", category=RuntimeWarning)

# ModelVersionStatus.State values (tensorflow_serving/apis/get_model_status.proto).
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


class ServingError(Exception):
    """A request that cannot be served; ``code`` is a gRPC status code name.

    ``INVALID_ARGUMENT`` (HTTP 400) for malformed requests, ``NOT_FOUND``
    (HTTP 404) for unknown models and versions, as TF Serving does.
    """

    HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
                   "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413, "UNAVAILABLE": 503,
                   "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNKNOWN": 500}

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return self.HTTP_STATUS.get(self.code, 500)


def invalid(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


@dataclasses.dataclass
class Limits:
    """What one client can cost the built-in server (TF Serving has none of these of its own).

    Memory: at most ``workers`` model calls run at once, each on at most
    ``inference_batch_size`` images whose headers declare at most
    ``max_pixels`` in all (one bigger image runs alone); at most ``2 * workers``
    request bodies of ``max_body_bytes`` are held at once.
    """

    max_instances: int = 1024           # instances per request (--max-instances)
    max_body_bytes: int = 64 << 20      # REST body / gRPC message (--max-body-bytes)
    max_pixels: int = 64 * 1024 * 1024  # per image, from its header (--max-pixels; ingest's data.max_pixels)
    inference_batch_size: int = 32      # instances per model call (--inference-batch-size)
    workers: int = 4                    # requests computed at once (REST pool; gRPC threads)
    max_connections: int = 256          # open REST connections; idle ones are closed first
    idle_timeout: float = 60.0          # seconds a keep-alive connection may wait for its next request
    read_timeout: float = 60.0          # seconds to receive a whole request once it has begun


@dataclasses.dataclass
class Signature:
    name: str
    function: object                      # the loaded ConcreteFunction
    inputs: Dict[str, object]             # input name -> tf.TensorSpec
    outputs: Dict[str, object]            # output name -> tf.TensorSpec


@dataclasses.dataclass
class Servable:
    """One loaded version: the SavedModel, its callable signatures, its SignatureDefs."""

    version: int
    path: str
    model: object
    signatures: Dict[str, Signature]
    signature_defs: object                # meta_graph_pb2 SignatureDef map (for metadata)
    model_name: str = ""                  # set by the ModelManager that loads it

    def signature(self, name: Optional[str]) -> Signature:
        name = name or features.SERVING_DEFAULT
        if name not in self.signatures:
            # TF Serving's wording (http_rest_api_handler.cc), INVALID_ARGUMENT.
            raise invalid(f'Serving signature name: "{name}" not found in signature def')
        return metrics.noted(self.signatures[name])


@dataclasses.dataclass
class VersionStatus:
    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""


def load_servable(version: int, path: str, warmup: bool = True) -> Servable:
    """Loads a SavedModel version as TF Serving would (tag ``serve``), then warms it up (``serving/warmup.py``)."""
    import tensorflow as tf
    from tensorflow.python.saved_model import loader_impl

    saved_model = loader_impl.parse_saved_model(path)
    meta_graph = next((m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags), None)
    if meta_graph is None:
        raise ValueError(f"{path}: no MetaGraph tagged 'serve'")
    model = tf.saved_model.load(path, tags=["serve"])
    signatures = {}
    for name, fn in model.signatures.items():
        if name.startswith("__"):
            continue  # __saved_model_init_op and friends are not callable signatures
        _, kwargs = fn.structured_input_signature
        outputs = fn.structured_outputs
        signatures[name] = Signature(name, fn, dict(kwargs),
                                     {k: tf.TensorSpec(v.shape, v.dtype, k) for k, v in outputs.items()})
    defs = {k: v for k, v in meta_graph.signature_def.items() if k in signatures}
    servable = Servable(version, path, model, signatures, defs)
    if warmup:
        # The model's assets.extra/tf_serving_warmup_requests, as TF Serving replays them (a failing one
        # fails the load); before the caller makes the version AVAILABLE.
        from visiontune.serving import warmup as warmup_lib

        warmup_lib.warm_up(servable)
    return servable


class ModelManager:
    """Serves the versions of one model in ``base_path`` that ``policy`` picks (default: the latest
    ``num_versions``).  Version labels are the ``ServerCore``'s (server_core.py)."""

    def __init__(self, name: str, base_path: str, num_versions: int = 2, poll_seconds: float = 1.0,
                 limits: Optional[Limits] = None, warmup: bool = True, policy: Optional[VersionPolicy] = None):
        if num_versions < 1:
            raise ValueError("num_versions must be at least 1")
        self.name = name
        self.base_path = os.path.abspath(base_path)
        self.policy = policy or VersionPolicy("latest", num_versions=num_versions)
        self.poll_seconds = poll_seconds
        self.limits = limits or Limits()
        self.warmup = warmup
        self.metrics, self.batcher = metrics.ServerMetrics(), batching.UNBATCHED   # a ServerCore may share them
        self._servables: Dict[int, Servable] = {}   # replaced, never mutated in place
        self._status: Dict[int, VersionStatus] = {}
        self._seen: Dict[int, Tuple] = {}           # version -> fingerprint at the last scan
        self._failed: Dict[int, Tuple] = {}         # version -> fingerprint that failed to load
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, wait_seconds: float = 0.0) -> "ModelManager":
        """Loads what is on disk now, then polls in a daemon thread.

        ``wait_seconds``: how long to wait for a version that is on disk but was
        written too recently to count as complete at the first scan.
        """
        self.poll_once(initial=True)
        self._thread = threading.Thread(target=self._run, name=f"poll-{self.name}", daemon=True)
        self._thread.start()
        # Versions just written are loaded by the poller once settled; wait for them, not for an empty folder.
        deadline = time.monotonic() + wait_seconds
        while self._seen and not self._servables and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def unload_all(self) -> None:
        """Unloads every version (the model left the config); requests holding one still finish."""
        for version in self.versions():
            self._unload(version)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # keep polling: a transient file-system error must not stop reloads
                log.exception("polling %s failed", self.base_path)

    # ------------------------------------------------------------------ polling

    def poll_once(self, initial: bool = False) -> None:
        on_disk = version_scan.versions_on_disk(self.base_path)
        ready = {}
        for version, path in on_disk.items():
            if not os.path.exists(os.path.join(path, "saved_model.pb")):
                self._seen.pop(version, None)
                continue  # still being written: the Pusher copies saved_model.pb last
            fp = version_scan.fingerprint(path)
            settled = self._seen.get(version) == fp or (initial and version_scan.is_old(fp))
            self._seen[version] = fp
            if self._failed.get(version) == fp:
                continue  # failed before with exactly these files
            if settled:
                ready[version] = path
        # Versions gone from disk are unloaded, as TF Serving does.
        for version in [v for v in self._servables if v not in on_disk]:
            self._unload(version)
        policy = self.policy   # one policy per scan: a config reload may replace it
        for version in sorted(policy.select(set(ready) | set(self._servables)), reverse=True):
            if version not in self._servables:
                self._load(version, ready[version])
        # After the loads: a version that failed to load never displaces a good one.
        for version in sorted(set(self._servables) - policy.select(self._servables)):
            self._unload(version)

    def _load(self, version: int, path: str) -> None:
        self._status[version] = VersionStatus(version, LOADING)
        started = time.monotonic()
        try:
            servable = load_servable(version, path, warmup=self.warmup)
            servable.model_name = self.name
        except Exception as e:
            self._failed[version] = self._seen.get(version)
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            self._status[version] = VersionStatus(version, END, "UNKNOWN", message)
            self.metrics.load(path, time.monotonic() - started, ok=False)
            log.warning("model %s version %d failed to load: %s", self.name, version, message)
            return
        with self._lock:
            self._servables = {**self._servables, version: servable}
        self._failed.pop(version, None)
        self._status[version] = VersionStatus(version, AVAILABLE)
        self.metrics.load(path, seconds := time.monotonic() - started, ok=True)   # warm-up included
        log.info("model %s version %d is available (loaded in %.1f s)", self.name, version, seconds)

    def _unload(self, version: int) -> None:
        self._status[version] = VersionStatus(version, UNLOADING)
        with self._lock:
            self._servables = {v: s for v, s in self._servables.items() if v != version}
        self._status[version] = VersionStatus(version, END)
        log.info("model %s version %d unloaded", self.name, version)

    # ------------------------------------------------------------------ queries

    def _check_name(self, name: str) -> None:
        if name != self.name:
            raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
        metrics.note(model_name=name)   # a served model's name only: clients cannot add series

    @staticmethod
    def _check_label(label: Optional[str]) -> None:
        # A ModelManager alone has no labels (a ServerCore resolves them first): every label is unknown,
        # which TF Serving answers with INVALID_ARGUMENT (server_core.cc), not NOT_FOUND.
        if label:
            raise invalid(f"Unrecognized servable version label: {label}")

    def servable(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> Servable:
        """The version a request names, or the latest available one."""
        self._check_name(name)
        self._check_label(label)
        servables = self._servables  # one consistent snapshot
        if version is None:
            if not servables:
                raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
            return metrics.noted(servables[max(servables)])
        if version not in servables:
            raise ServingError("NOT_FOUND", f"Servable not found for request: Specific({name}, {version})")
        return metrics.noted(servables[version])

    def versions(self) -> List[int]:
        return sorted(self._servables)

    def status(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> List[VersionStatus]:
        self._check_name(name)
        self._check_label(label)
        if version is not None:
            if version not in self._status:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
            return [self._status[version]]
        if not self._status:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        return [self._status[v] for v in sorted(self._status, reverse=True)]

    def wait_for_version(self, version: int, timeout: float = 60.0) -> Servable:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if version in self._servables:
                return self._servables[version]
            time.sleep(0.05)
        raise TimeoutError(f"version {version} not available after {timeout} s")

    # ------------------------------------------------------------------ inference

    def predict(self, servable: Servable, signature: Signature, inputs: Mapping[str, object],
                output_filter: Sequence[str] = ()) -> Dict[str, object]:
        """Runs ``signature`` on numpy ``inputs``; returns numpy outputs by name."""
        import numpy as np

        expected = set(signature.inputs)
        if set(inputs) != expected:
            missing, extra = sorted(expected - set(inputs)), sorted(set(inputs) - expected)
            raise invalid(f"input names do not match signature {signature.name!r}: "
                          f"expected {sorted(expected)}" + (f", missing {missing}" if missing else "")
                          + (f", unknown {extra}" if extra else ""))
        unknown = [o for o in output_filter if o not in signature.outputs]
        if unknown:
            raise invalid(f"output tensor alias not found in signature: {', '.join(unknown)}")
        arrays = {}
        for name, value in inputs.items():
            spec = signature.inputs[name]
            array = np.asarray(value)
            if array.ndim and array.shape[0] > self.limits.max_instances:
                raise invalid(f"batch of {array.shape[0]} instances exceeds the server's limit of "
                              f"{self.limits.max_instances} (--max-instances)")
            if not spec.shape.is_compatible_with(array.shape):
                raise invalid(f"input {name!r} has shape {list(array.shape)}, the signature expects "
                              f"{spec.shape.as_list() if spec.shape.rank is not None else 'any'}")
            arrays[name] = array
        pixels = self._declared_pixels(arrays)
        calls = [self.batcher.run(self, signature, arrays, part, pixels)   # self._call, maybe merged (batching.py)
                 for part in self._parts(signature, arrays, pixels)]
        wanted = output_filter or list(calls[0])
        if len(calls) == 1:
            return {k: calls[0][k] for k in wanted}
        return {k: np.concatenate([c[k] for c in calls]) for k in wanted}

    def _declared_pixels(self, arrays: Mapping[str, object]) -> Optional[List[int]]:
        """Pixels per instance, from the image headers (raises INVALID_ARGUMENT over ``max_pixels``).

        Images travel as ``image_bytes`` or inside the ``image`` feature of
        serialized ``tf.Example``s (``examples``; ``inputs`` of the classification
        signature); None when there are none.
        """
        limit = self.limits.max_pixels
        images = arrays.get(features.IMAGE_BYTES_INPUT)
        examples_key = features.EXAMPLES_INPUT if features.EXAMPLES_INPUT in arrays else features.CLASSIFY_INPUTS
        examples = arrays.get(examples_key)
        if images is None and examples is None:
            return None
        counts: List[int] = []
        if images is not None and images.dtype == object and images.ndim == 1:
            for i, data in enumerate(images):
                counts.append(_checked_pixels(data, limit, f"{features.IMAGE_BYTES_INPUT}[{i}]"))
        elif examples is not None and examples.dtype == object and examples.ndim == 1:
            from tensorflow.core.example import example_pb2

            for i, data in enumerate(examples):
                where = f"{examples_key}[{i}]"
                example = example_pb2.Example()
                try:
                    # A message parses to its last byte; the C++ parser stops early on some garbage.
                    complete = example.MergeFromString(bytes(data)) == len(data)
                except Exception:  # protobuf's DecodeError
                    complete = False
                if not complete:
                    raise invalid(f"{where} is not a serialized tf.Example (send an encoded image as "
                                  f"{features.IMAGE_BYTES_INPUT} to signature "
                                  f"{features.SERVING_DEFAULT!r})") from None
                feature = example.features.feature.get(features.IMAGE_KEY)
                values = feature.bytes_list.value if feature is not None else []
                counts.append(sum(_checked_pixels(v, limit, f"{where}.{features.IMAGE_KEY}") for v in values))
        else:
            return None
        return counts

    def _parts(self, signature: Signature, arrays: Mapping[str, object],
               pixels: Optional[List[int]]) -> List[Optional[slice]]:
        """Slices of the batch for one model call each: ``[None]`` (all at once) when it cannot be split.

        A part holds at most ``inference_batch_size`` instances and, when the
        inputs are images, at most ``max_pixels`` declared pixels (at least
        one instance), so decode memory stays bounded whatever the request.
        """
        sizes = {a.shape[0] if a.ndim else None for a in arrays.values()}
        batch = sizes.pop() if len(sizes) == 1 else None
        splittable = batch is not None and batch > 0 and all(
            spec.shape.rank and spec.shape[0] is None for spec in list(signature.outputs.values())
            + list(signature.inputs.values()))
        if not splittable:
            return [None]
        step, budget = max(1, self.limits.inference_batch_size), self.limits.max_pixels
        parts, start, used = [], 0, 0
        for i in range(batch):
            cost = pixels[i] if pixels else 0
            if i > start and (i - start >= step or used + cost > budget):
                parts.append(slice(start, i))
                start, used = i, 0
            used += cost
        parts.append(slice(start, batch))
        return parts if len(parts) > 1 else [None]

    @staticmethod
    def _call(signature: Signature, arrays: Mapping[str, object]) -> Dict[str, object]:
        import tensorflow as tf

        tensors = {}
        for name, array in arrays.items():
            spec = signature.inputs[name]
            try:
                tensors[name] = tf.convert_to_tensor(array, dtype=spec.dtype)
            except (TypeError, ValueError) as e:
                raise invalid(f"input {name!r} cannot be converted to {spec.dtype.name}: {e}") from None
        try:
            result = signature.function(**tensors)
        except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
            # Bytes that are not an image land here (DecodeImage), as in TF Serving.
            raise invalid(tf_error_message(e)) from None
        except tf.errors.OpError as e:
            raise ServingError(_code_name(e.error_code) if e.error_code else "INTERNAL",
                               tf_error_message(e)) from None
        except UnicodeDecodeError:
            # TensorFlow's error message quoted the client's bytes and could not be decoded itself.
            raise invalid(f"the model refused the request's bytes (inputs {sorted(arrays)}), in a message "
                          "that quotes them and is not UTF-8") from None
        return {k: v.numpy() for k, v in result.items()}


def _checked_pixels(data: bytes, limit: int, where: str) -> int:
    pixels = image_header.declared_pixels(data)
    if pixels > limit:
        raise invalid(f"{where}: the image's header declares {pixels} pixels, more than the server's limit "
                      f"of {limit} (--max-pixels); send a smaller image")
    return pixels


def tf_error_message(e) -> str:
    """The op's own message, without eager's "Graph execution error" and node trace lines."""
    import re

    lines = [line.strip() for line in (e.message or str(e)).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Graph execution error", "Detected at node",
                                                                    "<stack traces", "[[", "File "))]
    return re.sub(r"\s*\[\[.*|\s*\[Op:[^\]]*\]", "", " ".join(kept)).strip() or lines[0]


def _code_name(code: int) -> str:
    import grpc

    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
