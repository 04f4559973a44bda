"""Prometheus metrics of the built-in model server, under TF Serving's own names.

TF Serving exports its metrics at ``/monitoring/prometheus/metrics`` on the REST port once
``--monitoring_config_file`` holds ``prometheus_config { enable: true }``; dashboards and alerts written
for it (the Grafana TensorFlow Serving mixin, for one) query these names, so the built-in server uses them
too, with TF Serving's units (microseconds), buckets and label names:

* ``:tensorflow:serving:request_count`` {model_name, status} (counter) and
  ``:tensorflow:serving:request_latency`` {model_name, API, entrypoint, status} (histogram, µs), where API is
  Predict / Classify / Regress / MultiInference / GetModelMetadata / GetModelStatus / ..., entrypoint REST or
  GRPC and status a gRPC code name (OK, INVALID_ARGUMENT, ...).  Both carry two more labels, ``version`` and
  ``signature_name``; queries that aggregate over TF Serving's labels still work.
* ``:tensorflow:cc:saved_model:load_attempt_count`` {model_path, status=success|fail} and
  ``:tensorflow:cc:saved_model:load_latency`` {model_path} (µs, summed over successful loads), as
  TensorFlow's SavedModel loader reports them.
* With ``--enable_batching``, ``:tensorflow:serving:batching_session:`` ``input_batch_size`` (instances per
  request part queued), ``processed_batch_size`` (instances per merged model call, padding included),
  ``padding_size`` {execution_batch_size}, ``queuing_latency`` {thread_pool_name} (µs) and
  ``wrapped_run_count`` (model calls), with ``model_name`` and ``signature_name`` labels added.

Counters are exported untyped: prometheus_client's text format would rename a counter to ``NAME_total``,
and TF Serving's names have no such suffix.

Each server has its own :class:`ServerMetrics` (its own ``CollectorRegistry``): several servers in one
process (tests) never mix their numbers.  Labels come only from what the server found (a served model, a
loaded version, an existing signature), never from what a client typed, so a client cannot grow the
number of series.  A front end opens a :meth:`ServerMetrics.request` record for each request; the model
server fills in the model, version and signature it resolved (:func:`note`), from the same thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric

DEFAULT_PATH = "/monitoring/prometheus/metrics"   # TF Serving's PrometheusExporter::kPrometheusPath
# The classic text format (what generate_latest writes, and every Prometheus version reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
LOAD_ATTEMPT_COUNT = ":tensorflow:cc:saved_model:load_attempt_count"
LOAD_LATENCY = ":tensorflow:cc:saved_model:load_latency"
BATCHING = ":tensorflow:serving:batching_session:"
INPUT_BATCH_SIZE = BATCHING + "input_batch_size"
PROCESSED_BATCH_SIZE = BATCHING + "processed_batch_size"
PADDING_SIZE = BATCHING + "padding_size"
QUEUING_LATENCY = BATCHING + "queuing_latency"
WRAPPED_RUN_COUNT = BATCHING + "wrapped_run_count"

# An HTTP status back to the gRPC code TF Serving would count, when the error did not say (connection layer).
_HTTP_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED",
               413: "RESOURCE_EXHAUSTED", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE"}


def exponential_buckets(scale: float, growth: float, count: int) -> List[float]:
    """TensorFlow's ``monitoring::Buckets::Exponential``: ``scale * growth**i`` for i < count (then +Inf)."""
    return [scale * growth ** i for i in range(count)]


LATENCY_BUCKETS = exponential_buckets(10, 1.8, 33)        # request_latency: 10 µs .. ~20 minutes
QUEUING_BUCKETS = exponential_buckets(100, 1.2, 52)       # queuing_latency: 100 µs .. ~1 s
BATCH_SIZE_BUCKETS = exponential_buckets(1, 2, 14)        # batch sizes 1 .. 8192


class _Counter:
    def __init__(self, name: str, doc: str, labels: Sequence[str]):
        self.name, self.doc, self.labels = name, doc, tuple(labels)
        self.values: Dict[Tuple[str, ...], float] = {}

    def add(self, key: Tuple[str, ...], amount: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount

    def family(self) -> Metric:
        metric = Metric(self.name, self.doc, "unknown")   # untyped: no "_total" appended (see the docstring)
        for key, value in sorted(self.values.items()):
            metric.add_sample(self.name, dict(zip(self.labels, key)), value)
        return metric


class _Histogram:
    def __init__(self, name: str, doc: str, labels: Sequence[str], bounds: Sequence[float]):
        self.name, self.doc, self.labels, self.bounds = name, doc, tuple(labels), list(bounds)
        self.values: Dict[Tuple[str, ...], list] = {}     # key -> [counts per bucket (+Inf last), sum]

    def add(self, key: Tuple[str, ...], value: float) -> None:
        entry = self.values.get(key)
        if entry is None:
            entry = self.values[key] = [[0] * (len(self.bounds) + 1), 0.0]
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        entry[0][index] += 1
        entry[1] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, (counts, total) in sorted(self.values.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self.bounds + [float("inf")], counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
            family.add_metric(list(key), buckets, total)
        return family


class RequestRecord:
    """What one request was, filled in as the server resolves it (see :func:`note`)."""

    __slots__ = ("api", "entrypoint", "model_name", "version", "signature_name", "status")

    def __init__(self, api: str, entrypoint: str):
        self.api, self.entrypoint = api, entrypoint
        self.model_name = self.version = self.signature_name = ""
        self.status: Optional[str] = None

    def http_status(self, status: int) -> None:
        """The answer's HTTP status, for a request whose error code nobody noted."""
        if self.status is None or status == 200:
            self.status = _HTTP_CODES.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


_local = threading.local()


def note(**fields) -> None:
    """Fills in the current request's record (``model_name``, ``version``, ``signature_name``, ``status``).

    Called by the model server where it resolves a model, a version or a signature, in the thread that
    handles the request; nothing happens outside a request (loading, warm-up, batch threads).
    """
    record = getattr(_local, "record", None)
    if record is not None:
        for name, value in fields.items():
            setattr(record, name, value if name == "status" else str(value))


def noted(found):
    """Returns ``found`` after noting it in the current request: a Servable's version, a Signature's name."""
    if hasattr(found, "version"):
        note(version=found.version)
    else:
        note(signature_name=found.name)
    return found


class ServerMetrics:
    """One server's metrics: a registry of its own, exported in Prometheus's text format at ``path``."""

    def __init__(self, path: str = DEFAULT_PATH, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self._lock = threading.Lock()
        request_labels = ("model_name", "version", "signature_name", "API", "entrypoint", "status")
        self.request_count = _Counter(REQUEST_COUNT, "The total number of requests.", request_labels)
        self.request_latency = _Histogram(
            REQUEST_LATENCY, "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            request_labels, LATENCY_BUCKETS)
        self.load_attempts = _Counter(LOAD_ATTEMPT_COUNT, "The number of times a SavedModel was loaded.",
                                      ("model_path", "status"))
        self.load_latency = _Counter(LOAD_LATENCY, "Latency in microseconds for SavedModels that were "
                                                   "successfully loaded.", ("model_path",))
        batch = ("model_name", "signature_name")
        self.input_batch_size = _Histogram(INPUT_BATCH_SIZE, "Tracks the batch size distribution on the inputs.",
                                           batch, BATCH_SIZE_BUCKETS)
        self.processed_batch_size = _Histogram(PROCESSED_BATCH_SIZE, "Tracks the batch size distribution on "
                                                                     "processing.", batch, BATCH_SIZE_BUCKETS)
        self.padding_size = _Histogram(PADDING_SIZE, "Tracks the padding size distribution on batches.",
                                       batch + ("execution_batch_size",), BATCH_SIZE_BUCKETS)
        self.queuing_latency = _Histogram(QUEUING_LATENCY, "Distribution of wall time spent (in microseconds) "
                                                           "in queuing", ("thread_pool_name",), QUEUING_BUCKETS)
        self.wrapped_run_count = _Counter(WRAPPED_RUN_COUNT, "Total count of run calls on the wrapped session",
                                          batch)
        self._all = [self.request_count, self.request_latency, self.load_attempts, self.load_latency,
                     self.input_batch_size, self.processed_batch_size, self.padding_size, self.queuing_latency,
                     self.wrapped_run_count]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # ------------------------------------------------------------------ export

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: every metric that has a value, as a snapshot."""
        with self._lock:
            families = [m.family() for m in self._all if m.values]
        yield from families

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ recording

    @contextlib.contextmanager
    def request(self, api: str, entrypoint: str) -> Iterator[RequestRecord]:
        """Times one request and counts it when it ends; the model server fills in the record meanwhile."""
        record = RequestRecord(api, entrypoint)
        previous = getattr(_local, "record", None)
        _local.record = record
        started = time.perf_counter()
        try:
            yield record
        except BaseException:
            if record.status is None:
                record.status = "INTERNAL"
            raise
        finally:
            _local.record = previous
            micros = (time.perf_counter() - started) * 1e6
            key = (record.model_name, record.version, record.signature_name, record.api, record.entrypoint,
                   record.status or "OK")
            with self._lock:
                self.request_count.add(key)
                self.request_latency.add(key, micros)

    def load(self, model_path: str, seconds: float, ok: bool) -> None:
        with self._lock:
            self.load_attempts.add((model_path, "success" if ok else "fail"))
            if ok:
                self.load_latency.add((model_path,), seconds * 1e6)

    def batch(self, model_name: str, signature_name: str, task_sizes: Sequence[int], padding: int,
              queued_seconds: Sequence[float], thread_pool_name: str) -> None:
        """One merged model call: the sizes of the request parts in it, and how long each waited."""
        key = (model_name, signature_name)
        size = sum(task_sizes) + padding
        with self._lock:
            for task_size in task_sizes:
                self.input_batch_size.add(key, task_size)
            self.processed_batch_size.add(key, size)
            self.padding_size.add(key + (str(size),), padding)
            for seconds in queued_seconds:
                self.queuing_latency.add((thread_pool_name,), seconds * 1e6)
            self.wrapped_run_count.add(key)


def read_monitoring_config(path: Optional[str]) -> Tuple[bool, str]:
    """``--monitoring_config_file`` -> (enabled, path); ValueError naming the file and the problem.

    No file: on, at TF Serving's path (the built-in server's default; TF Serving's is off).  With a file,
    TF Serving's reading: metrics are on only with ``prometheus_config { enable: true }``, at ``path`` or
    the default one.
    """
    if path is None:
        return True, DEFAULT_PATH
    from visiontune.serving import text_protos

    config = text_protos.read("MonitoringConfig", path).prometheus_config
    where = config.path or DEFAULT_PATH
    if not where.startswith("/") or "?" in where or where.startswith("/v1/"):
        raise ValueError(f"{path}: prometheus_config.path {where!r} must be an absolute URL path outside /v1/ "
                         "(the model API's)")
    return config.enable, where


def monitoring_config_text(enabled: bool = True, path: str = DEFAULT_PATH) -> str:
    """A ``--monitoring_config_file`` for tensorflow_model_server (text format)."""
    from visiontune.serving import text_protos

    config = text_protos.message_class("MonitoringConfig")()
    config.prometheus_config.enable = enabled
    config.prometheus_config.path = path
    return text_protos.to_text(config)


def grpc_interceptor(manager):
    """A ``grpc.ServerInterceptor`` that counts every unary RPC in ``manager.metrics`` (read per call).

    Every method of every servicer is counted, including ones added later, without touching them: the
    API label is the method's name (Predict, Classify, GetModelStatus, HandleReloadConfigRequest, ...),
    the status the code the handler ended with.
    """
    import grpc

    class _Interceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            handler = continuation(handler_call_details)
            if handler is None or handler.unary_unary is None:
                return handler
            api = handler_call_details.method.rsplit("/", 1)[-1]
            behavior = handler.unary_unary

            def counted(request, context):
                server_metrics = getattr(manager, "metrics", None)
                if server_metrics is None or not server_metrics.enabled:
                    return behavior(request, context)
                with server_metrics.request(api, "GRPC") as record:
                    try:
                        response = behavior(request, context)
                    except BaseException:
                        code = context.code()   # set by context.abort; None: an exception gRPC reports UNKNOWN
                        record.status = "UNKNOWN" if code is None else code.name
                        raise
                    code = context.code()
                    record.status = "OK" if code is None else code.name
                    return response
            return grpc.unary_unary_rpc_method_handler(counted, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

    return _Interceptor()
