"""The built-in server's Prometheus metrics: TF Serving's names and labels, REST and gRPC, loads, files.

Requests go over loopback: plain HTTP for REST, TF Serving's own stubs for gRPC; the metrics page is
read over HTTP and parsed with prometheus_client's parser (what a Prometheus scrape would see).
"""

from __future__ import annotations

import base64
import json
import os

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.serving_helpers import MODEL, builtin_server, http_get, push, scrape, shape_pngs, value
from visiontune.serving import metrics

COUNT, LATENCY = ":tensorflow:serving:request_count", ":tensorflow:serving:request_latency"


def _rest_predict(url: str, body: dict, path: str = f"/v1/models/{MODEL}:predict") -> int:
    import http.client

    host, port = url.split("//", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _grpc_predict(stub, name: str, images, signature: str = "serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(np.array(images, dtype=object)))
    return stub.Predict(request, timeout=60)


@pytest.fixture(scope="module")
def model_dir(exported_model):
    return exported_model.serving_model_dir


def test_requests_and_loads_are_counted_under_tf_serving_names(model_dir, tmp_path):
    version_dir = push(model_dir, str(tmp_path / MODEL))
    png = shape_pngs(1)[0]
    instance = {"image_bytes": {"b64": base64.b64encode(png).decode()}}
    with builtin_server(str(tmp_path / MODEL)) as (_, url, target):
        # REST: two good predictions, a bad signature, metadata, status, an unknown model, a bad path.
        assert _rest_predict(url, {"instances": [instance]}) == 200
        assert _rest_predict(url, {"instances": [instance, instance]}) == 200
        assert _rest_predict(url, {"signature_name": "nope", "instances": [instance]}) == 400
        assert http_get(url, f"/v1/models/{MODEL}/metadata")[0] == 200
        assert http_get(url, f"/v1/models/{MODEL}")[0] == 200
        assert _rest_predict(url, {"instances": [instance]}, "/v1/models/other:predict") == 404
        # gRPC, with TF Serving's stubs: a good prediction, an unknown model, a bad image, model status.
        with grpc.insecure_channel(target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert _grpc_predict(stub, MODEL, [png]).outputs["probabilities"].tensor_shape.dim[0].size == 1
            with pytest.raises(grpc.RpcError) as e:
                _grpc_predict(stub, "other", [png])
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:
                _grpc_predict(stub, MODEL, [b"not an image"])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = get_model_status_pb2.GetModelStatusRequest()
            status.model_spec.name = MODEL
            model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status, timeout=60)
            # A method this module knows nothing about is counted too (the interceptor sees every method).
            classify = classification_pb2.ClassificationRequest()
            classify.model_spec.name = "other"
            with pytest.raises(grpc.RpcError):
                stub.Classify(classify, timeout=60)
        samples = scrape(url)
        again = scrape(url)

    served = dict(model_name=MODEL, version="1")
    predict = dict(served, signature_name="serving_default", API="Predict")
    assert value(samples, COUNT, **predict, entrypoint="REST", status="OK") == 2
    assert value(samples, LATENCY + "_count", **predict, entrypoint="REST", status="OK") == 2
    assert value(samples, LATENCY + "_bucket", **predict, entrypoint="REST", status="OK", le="+Inf") == 2
    assert value(samples, LATENCY + "_sum", **predict, entrypoint="REST", status="OK") > 0
    assert value(samples, COUNT, **served, signature_name="", API="Predict", entrypoint="REST",
                 status="INVALID_ARGUMENT") == 1
    assert value(samples, COUNT, **served, API="GetModelMetadata", entrypoint="REST", status="OK") == 1
    assert value(samples, COUNT, model_name=MODEL, API="GetModelStatus", entrypoint="REST", status="OK") == 1
    # An unknown model is counted without its name: a client cannot add series.
    assert value(samples, COUNT, model_name="", API="Predict", entrypoint="REST", status="NOT_FOUND") == 1
    assert value(samples, COUNT, **predict, entrypoint="GRPC", status="OK") == 1
    assert value(samples, COUNT, model_name="", API="Predict", entrypoint="GRPC", status="NOT_FOUND") == 1
    assert value(samples, COUNT, **predict, entrypoint="GRPC", status="INVALID_ARGUMENT") == 1
    assert value(samples, COUNT, model_name=MODEL, API="GetModelStatus", entrypoint="GRPC", status="OK") == 1
    assert value(samples, COUNT, model_name="", API="Classify", entrypoint="GRPC") == 1
    assert not any("other" in dict(labels).values() for _, labels in samples)
    # TF Serving counts by model and status; the totals add up.
    assert value(samples, COUNT, model_name=MODEL) == 8
    # Reading the page is not a request of the API.
    assert value(again, COUNT) == value(samples, COUNT)
    # The load, as TensorFlow's SavedModel loader reports it.
    load = os.path.abspath(version_dir)
    assert value(samples, ":tensorflow:cc:saved_model:load_attempt_count", model_path=load, status="success") == 1
    assert value(samples, ":tensorflow:cc:saved_model:load_latency", model_path=load) > 0


def test_failed_loads_are_counted_and_servers_do_not_share_metrics(model_dir, tmp_path):
    base = str(tmp_path / MODEL)
    push(model_dir, base, 1)
    broken = push(model_dir, base, 2)
    with open(os.path.join(broken, "saved_model.pb"), "r+b") as f:
        f.truncate(100)
    os.utime(os.path.join(broken, "saved_model.pb"), (1, 1_000_000_000))
    with builtin_server(base) as (_, url, _target), builtin_server(str(tmp_path / "empty")) as (_, other, _t):
        assert _rest_predict(url, {"instances": [{"b64": base64.b64encode(shape_pngs(1)[0]).decode()}]}) == 200
        samples, empty = scrape(url), scrape(other)
    attempts = ":tensorflow:cc:saved_model:load_attempt_count"
    assert value(samples, attempts, model_path=os.path.abspath(broken), status="fail") == 1
    assert value(samples, attempts, model_path=os.path.abspath(os.path.join(base, "1")), status="success") == 1
    assert value(samples, ":tensorflow:cc:saved_model:load_latency", model_path=os.path.abspath(broken),
                 default=None) is None
    # The second server (another registry, same process) saw none of it.
    assert value(empty, COUNT, default=None) is None and value(empty, attempts, default=None) is None


def test_monitoring_config_moves_or_turns_off_the_page(model_dir, tmp_path):
    base = str(tmp_path / MODEL)
    push(model_dir, base)
    with builtin_server(base) as (manager, url, _):
        manager.metrics.path = "/metrics"
        assert http_get(url, "/metrics")[0] == 200
        assert http_get(url, metrics.DEFAULT_PATH)[0] == 400   # TF Serving: an unknown path
        manager.metrics.enabled = False
        assert http_get(url, "/metrics")[0] == 400


def test_monitoring_config_file_is_tf_servings_format(tmp_path):
    config = tmp_path / "monitoring.config"
    config.write_text('prometheus_config { enable: true, path: "/metrics" }\n')
    assert metrics.read_monitoring_config(str(config)) == (True, "/metrics")
    config.write_text("prometheus_config { }\n")   # TF Serving: off unless enabled
    assert metrics.read_monitoring_config(str(config)) == (False, metrics.DEFAULT_PATH)
    assert metrics.read_monitoring_config(None) == (True, metrics.DEFAULT_PATH)
    # What --write-monitoring-config writes reads back the same.
    config.write_text(metrics.monitoring_config_text(True, "/m"))
    assert metrics.read_monitoring_config(str(config)) == (True, "/m")
    for text, problem in (("prometheus_config { enabled: true }", "enabled"),
                          ('prometheus_config { enable: true, path: "/v1/models" }', "outside /v1/")):
        config.write_text(text)
        with pytest.raises(ValueError) as e:
            metrics.read_monitoring_config(str(config))
        assert problem in str(e.value) and str(config) in str(e.value) and "\n" not in str(e.value)


def test_serve_refuses_bad_monitoring_and_batching_files_in_one_line(tmp_path, capsys):
    from visiontune import cli

    base = tmp_path / MODEL
    base.mkdir()
    bad = tmp_path / "bad.config"
    bad.write_text("prometheus_config { enable: yes please }\n")
    assert cli.main(["serve", "--model-base-path", str(base), "--monitoring_config_file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--monitoring_config_file" in err and str(bad) in err
    bad.write_text("max_batch_size { value: 8 }\nbatch_timeout: 5\n")
    assert cli.main(["serve", "--model-base-path", str(base), "--enable_batching",
                     "--batching_parameters_file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "batch_timeout" in err and str(bad) in err
    assert cli.main(["serve", "--model-base-path", str(base), "--batching_parameters_file", str(bad)]) == 2
    assert "--enable_batching" in capsys.readouterr().err
