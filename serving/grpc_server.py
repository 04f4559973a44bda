"""TF Serving's gRPC API over the built-in model server (protos from ``tensorflow-serving-api``).

Implements what clients call: ``PredictionService/Predict``, ``Classify``,
``Regress``, ``MultiInference`` (``serving/classify.py``),
``PredictionService/GetModelMetadata``, ``ModelService/GetModelStatus`` and
``ModelService/HandleReloadConfigRequest`` (a new ``ModelServerConfig``, live).
Other methods answer UNIMPLEMENTED (the generated base servicer's default).
Errors are TF Serving's status codes: INVALID_ARGUMENT for a bad request,
NOT_FOUND for an unknown model or version; a message over the size limit is
refused by gRPC itself with RESOURCE_EXHAUSTED; ``model_spec.version_label``
names a version by its label (``version_labels`` in the model config); an
unknown label is INVALID_ARGUMENT, in GetModelStatus too.

Bounded like the REST server: ``workers`` threads compute requests (gRPC
holds no thread for an idle connection), at most ``8 * workers`` RPCs wait
for one (more are refused with RESOURCE_EXHAUSTED), and a connection idle
for ``idle_timeout`` is closed (clients reconnect by themselves).
"""

from __future__ import annotations

import logging
import socket
from concurrent import futures
from typing import Optional

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from visiontune.serving import classify, metrics, tensors
from visiontune.serving.model_server import ModelManager, ServingError, invalid

log = logging.getLogger("visiontune.serving")


def _abort(context, e: ServingError):
    context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN), e.message)


def _spec(model_spec):
    version = model_spec.version.value if model_spec.HasField("version") else None
    return model_spec.name, version, model_spec.version_label or None


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def Predict(self, request, context):
        try:
            servable = self.manager.servable(*_spec(request.model_spec))
            signature = servable.signature(request.model_spec.signature_name)
            inputs = {}
            for name, proto in request.inputs.items():
                if name in signature.inputs:
                    inputs[name] = tensors.from_tensor_proto(proto, signature.inputs[name], name)
                else:
                    inputs[name] = None  # reported by predict() with the full list of names
            outputs = self.manager.predict(servable, signature, inputs, list(request.output_filter))
            response = predict_pb2.PredictResponse()
            response.model_spec.name = servable.model_name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = signature.name
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(
                    tensors.to_tensor_proto(value, signature.outputs[name].dtype))
            return response
        except ServingError as e:
            _abort(context, e)
        except Exception as e:  # keep serving; report what happened
            log.exception("Predict failed")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    def _answer(self, name: str, spec, build, request, context):
        """Classify/Regress/MultiInference: the servable ``spec`` names, ``build``'s response, TF Serving's codes."""
        try:
            return build(self.manager, self.manager.servable(*_spec(spec)), request)
        except ServingError as e:
            _abort(context, e)
        except Exception as e:  # keep serving; report what happened
            log.exception("%s failed", name)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    def Classify(self, request, context):
        return self._answer("Classify", request.model_spec, classify.classification_response, request, context)

    def Regress(self, request, context):
        return self._answer("Regress", request.model_spec, classify.regression_response, request, context)

    def MultiInference(self, request, context):
        if not request.tasks:
            _abort(context, invalid("MultiInferenceRequest has no tasks"))
        # The first task's ModelSpec picks the servable, as in TF Serving (multi_inference_helper.cc).
        return self._answer("MultiInference", request.tasks[0].model_spec, classify.multi_inference_response,
                            request, context)

    def GetModelMetadata(self, request, context):
        try:
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise ServingError("INVALID_ARGUMENT", "Metadata field(s) not supported: "
                                   f"{[f for f in fields if f != 'signature_def'] or 'none requested'}; "
                                   "request 'signature_def'")
            servable = self.manager.servable(*_spec(request.model_spec))
            defs = get_model_metadata_pb2.SignatureDefMap()
            for name, sig in servable.signature_defs.items():
                defs.signature_def[name].CopyFrom(sig)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.model_name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(defs)
            return response
        except ServingError as e:
            _abort(context, e)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        try:
            response = get_model_status_pb2.GetModelStatusResponse()
            for s in self.manager.status(*_spec(request.model_spec)):
                entry = response.model_version_status.add()
                entry.version = s.version
                entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(s.state)
                entry.status.error_code = getattr(grpc.StatusCode, s.error_code).value[0]
                entry.status.error_message = s.error_message
            return response
        except ServingError as e:
            _abort(context, e)

    def HandleReloadConfigRequest(self, request, context):
        """Serves ``request.config`` from now on (``ServerCore.reload``); errors as TF Serving answers them."""
        reload = getattr(self.manager, "reload", None)
        if reload is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server serves one ModelManager, not a ServerCore")
        try:
            reload(request.config)
        except ServingError as e:
            log.error("ReloadConfig failed: %s", e.message)
            _abort(context, e)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = 0   # OK, as TF Serving's ToStatusProto
        return response


def _check_free(host: str, port: int) -> None:
    """Binds the address once here: gRPC itself reports a port in use with a log line and a RuntimeError."""
    if not 0 <= port <= 65535:
        raise OSError(f"port {port} is not in 0-65535")
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC binds
        probe.bind((host, port))


class GrpcServer:
    def __init__(self, manager: ModelManager, host: str = "127.0.0.1", port: int = 8500):
        limits = manager.limits
        _check_free(host, port)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=8 * limits.workers,
            interceptors=[metrics.grpc_interceptor(manager)],   # counts every method, new ones too
            options=[("grpc.max_receive_message_length", min(limits.max_body_bytes, (1 << 31) - 1)),  # an int32
                     ("grpc.max_send_message_length", -1),
                     ("grpc.max_connection_idle_ms", int(limits.idle_timeout * 1000)),
                     ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(manager),
                                                                           self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:   # taken between the check and here
            raise OSError(f"cannot bind gRPC to {address}: {e}") from None
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        self.host = host

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> "GrpcServer":
        self.server.start()
        return self

    def stop(self, grace: Optional[float] = 1.0) -> None:
        self.server.stop(grace).wait()
