"""Classify, Regress and MultiInference: TF Serving's classification API on the exported model.

REST over plain HTTP, gRPC through ``tensorflow_serving.apis``' own stubs, on
loopback; the built-in server always, real TF Serving when
``tensorflow_model_server`` is on PATH or ``TFSERVING_URL`` is set (see
``tests/test_serving.py``).  Every classification is checked against the same
images' ``:predict`` answer from the same server.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from tests.conftest import SHAPE_CLASSES
from tests.test_serving import MODEL, SERVER_KINDS, serving, start_builtin
from visiontune import features

CLASSIFICATION = features.CLASSIFY_SIGNATURE


@pytest.fixture(scope="module", params=SERVER_KINDS)
def served(request, exported_model, tmp_path_factory):
    base = str(tmp_path_factory.mktemp(f"classify-{request.param}") / MODEL)
    with serving(request.param, exported_model.serving_model_dir, base) as server:
        yield server


@pytest.fixture(scope="module")
def eval_images(shapes_prepared):
    """Encoded eval images (PNG and JPEG) as ingest stored them."""
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(shapes_prepared.output_dir, "eval", "*")))
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files).take(5)]
    return [r.features.feature["image"].bytes_list.value[0] for r in records]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(served, path: str, payload) -> tuple:
    """(HTTP status, decoded JSON answer) of a POST with plain HTTP."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(served.rest_url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stub(served):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(served.grpc_target)
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def example(png: bytes):
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png]))}))


def predict_probabilities(served, images):
    status, body = post(served, f"/v1/models/{served.name}:predict",
                        {"instances": [{"b64": _b64(png)} for png in images]})
    assert status == 200, body
    return np.array([p["probabilities"] for p in body["predictions"]], np.float32)


def assert_agrees(rows, probabilities):
    """Each row is every class best first, with the probabilities :predict gives for them."""
    for row, probs in zip(rows, probabilities):
        assert [name for name, _ in row] == [SHAPE_CLASSES[i] for i in np.argsort(-probs, kind="stable")]
        np.testing.assert_allclose([score for _, score in row], np.sort(probs)[::-1], rtol=1e-5, atol=1e-6)
    assert len(rows) == len(probabilities)


def classification_request(served, images, signature=CLASSIFICATION, context=None):
    from tensorflow_serving.apis import classification_pb2

    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = served.name
    if signature is not None:
        request.model_spec.signature_name = signature
    if context is None:
        for png in images:
            request.input.example_list.examples.add().CopyFrom(example(png))
    else:
        request.input.example_list_with_context.context.CopyFrom(example(context))
        for _ in images:
            request.input.example_list_with_context.examples.add()
    return request


def grpc_rows(result):
    return [[(c.label, c.score) for c in classification.classes] for classification in result.classifications]


# ---------------------------------------------------------------- answers

def test_classify_over_rest_and_grpc_agrees_with_predict(served, eval_images):
    from tensorflow_serving.apis import inference_pb2

    probabilities = predict_probabilities(served, eval_images)

    status, body = post(served, f"/v1/models/{served.name}:classify", {
        "signature_name": CLASSIFICATION, "examples": [{"image": {"b64": _b64(png)}} for png in eval_images]})
    assert status == 200, body
    assert_agrees(body["results"], probabilities)
    version = served.latest()
    status, body = post(served, f"/v1/models/{served.name}/versions/{version}:classify", {
        "signature_name": CLASSIFICATION, "examples": [{"image": [{"b64": _b64(eval_images[0])}]}]})
    assert status == 200, body
    assert_agrees(body["results"], probabilities[:1])

    response = stub(served).Classify(classification_request(served, eval_images), timeout=60)
    assert_agrees(grpc_rows(response.result), probabilities)
    assert response.model_spec.name == served.name and response.model_spec.signature_name == CLASSIFICATION
    assert response.model_spec.version.value == version

    multi = inference_pb2.MultiInferenceRequest()
    task = multi.tasks.add(method_name=features.CLASSIFY_METHOD)
    task.model_spec.name, task.model_spec.signature_name = served.name, CLASSIFICATION
    multi.input.CopyFrom(classification_request(served, eval_images).input)
    answer = stub(served).MultiInference(multi, timeout=60)
    assert len(answer.results) == 1 and answer.results[0].model_spec.signature_name == CLASSIFICATION
    assert_agrees(grpc_rows(answer.results[0].classification_result), probabilities)


def test_context_features_reach_every_example(served, eval_images):
    """``context`` (REST) / ``example_list_with_context`` (gRPC): the context's image for examples without one."""
    probabilities = predict_probabilities(served, eval_images[1:2])
    status, body = post(served, f"/v1/models/{served.name}:classify", {
        "signature_name": CLASSIFICATION, "context": {"image": {"b64": _b64(eval_images[1])}},
        "examples": [{"unused": 1}, {"unused": 2.5}]})
    assert status == 200, body
    assert_agrees(body["results"], np.repeat(probabilities, 2, axis=0))
    response = stub(served).Classify(classification_request(served, [b"", b""], context=eval_images[1]),
                                     timeout=60)
    assert_agrees(grpc_rows(response.result), np.repeat(probabilities, 2, axis=0))


def test_the_signature_is_tf_servings_classification_signature(served):
    with urllib.request.urlopen(f"{served.rest_url}/v1/models/{served.name}/metadata", timeout=60) as response:
        defs = json.loads(response.read())["metadata"]["signature_def"]["signature_def"]
    sig = defs[CLASSIFICATION]
    assert sig["method_name"] == "tensorflow/serving/classify"
    assert list(sig["inputs"]) == ["inputs"] and sig["inputs"]["inputs"]["dtype"] == "DT_STRING"
    assert sig["outputs"]["classes"]["dtype"] == "DT_STRING" and sig["outputs"]["scores"]["dtype"] == "DT_FLOAT"
    assert defs["serving_default"]["method_name"] == "tensorflow/serving/predict"


# ---------------------------------------------------------------- errors

def test_classify_and_regress_errors_are_tf_servings(served, eval_images):
    from tensorflow_serving.apis import inference_pb2, regression_pb2

    png = _b64(eval_images[0])
    path = f"/v1/models/{served.name}"
    cases = [
        # No signature name: serving_default, which is a predict signature (TF Serving's wording).
        (":classify", {"examples": [{"image": {"b64": png}}]}, 400,
         "Expected classification signature method_name to be tensorflow/serving/classify"),
        (":classify", {"signature_name": "nope", "examples": [{"image": {"b64": png}}]}, 400, "nope"),
        (":classify", {"signature_name": CLASSIFICATION}, 400, "examples"),
        (":classify", {"signature_name": CLASSIFICATION, "examples": []}, 400, "examples"),
        (":classify", {"signature_name": CLASSIFICATION, "examples": [{"image": [[png]]}]}, 400, "image"),
        (":classify", {"signature_name": CLASSIFICATION, "examples": [{"image": {"b64": _b64(b"no image")}}]},
         400, ""),
        (":regress", {"examples": [{"image": {"b64": png}}]}, 400,
         "Expected regression signature method_name to be tensorflow/serving/regress"),
        (":regress", {"signature_name": CLASSIFICATION, "examples": [{"image": {"b64": png}}]}, 400,
         "Expected regression signature method_name to be tensorflow/serving/regress"),
    ]
    for suffix, payload, code, text in cases:
        status, body = post(served, path + suffix, payload)
        assert status == code and text in body["error"], (payload, body)
    status, body = post(served, "/v1/models/nope:classify",
                        {"signature_name": CLASSIFICATION, "examples": [{"image": {"b64": png}}]})
    assert status == 404, body

    client = stub(served)
    with pytest.raises(grpc.RpcError) as e:
        client.Classify(classification_request(served, eval_images[:1], signature=None), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "method_name" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.Classify(classification_request(served, []), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    regression = regression_pb2.RegressionRequest()
    regression.model_spec.name = served.name
    regression.input.CopyFrom(classification_request(served, eval_images[:1]).input)
    with pytest.raises(grpc.RpcError) as e:
        client.Regress(regression, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tensorflow/serving/regress" in e.value.details()

    def multi(*tasks):
        request = inference_pb2.MultiInferenceRequest()
        for method, signature in tasks:
            task = request.tasks.add(method_name=method)
            task.model_spec.name, task.model_spec.signature_name = served.name, signature
        request.input.CopyFrom(classification_request(served, eval_images[:1]).input)
        return request

    for request, code in [
        (multi((features.REGRESS_METHOD, CLASSIFICATION)), grpc.StatusCode.INVALID_ARGUMENT),
        (multi((features.PREDICT_METHOD, "serving_default")), grpc.StatusCode.UNIMPLEMENTED),
        (multi((features.CLASSIFY_METHOD, CLASSIFICATION), (features.CLASSIFY_METHOD, CLASSIFICATION)),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            client.MultiInference(request, timeout=60)
        assert e.value.code() == code, e.value.details()
    # Still serving.
    assert len(client.Classify(classification_request(served, eval_images[:1]), timeout=60).result
               .classifications) == 1


def test_builtin_limits_apply_to_classify(served, eval_images):
    if served.kind != "builtin":
        pytest.skip("request limits are the built-in server's")
    from visiontune.serving.model_server import Limits

    manager = served.manager
    saved = manager.limits
    manager.limits = Limits(max_instances=2, max_pixels=30 * 30)
    try:
        payload = {"signature_name": CLASSIFICATION, "examples": [{"image": {"b64": _b64(eval_images[0])}}] * 3}
        status, body = post(served, f"/v1/models/{served.name}:classify", payload)
        assert status == 400 and "--max-instances" in body["error"], body
        big = _png(64)
        status, body = post(served, f"/v1/models/{served.name}:classify",
                            {"signature_name": CLASSIFICATION, "examples": [{"image": {"b64": _b64(big)}}]})
        assert status == 400 and "--max-pixels" in body["error"], body
        with pytest.raises(grpc.RpcError) as e:
            stub(served).Classify(classification_request(served, [big]), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-pixels" in e.value.details()
    finally:
        manager.limits = saved


def _png(size: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- regression and MultiInference with both

class _Tiny:
    """A tiny SavedModel with TF Serving's classification and regression signatures on feature ``x``."""

    @staticmethod
    def save(path: str) -> None:
        import tensorflow as tf

        from visiontune.components import signatures

        spec = {"x": tf.io.FixedLenFeature([1], tf.float32)}

        class Module(tf.Module):
            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
            def regress(self, inputs):
                return {"outputs": tf.io.parse_example(inputs, spec)["x"] * 2.0}

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
            def classify(self, inputs):
                x = tf.io.parse_example(inputs, spec)["x"]
                scores = tf.concat([x, 1.0 - x], axis=1)
                classes = tf.tile(tf.constant([["yes", "no"]]), [tf.shape(x)[0], 1])
                return {"classes": classes, "scores": scores}

        module = Module()
        tf.saved_model.save(module, path, signatures={
            "regression": module.regress.get_concrete_function(),
            "classification": module.classify.get_concrete_function()})
        signatures.set_method_names(path, {"regression": features.REGRESS_METHOD,
                                            "classification": features.CLASSIFY_METHOD})


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny") / "tiny"
    _Tiny.save(str(base / "1"))
    server = start_builtin(str(base), name="tiny")
    try:
        server.wait_available(1)
        yield server
    finally:
        server.stop()


def test_regress_and_multi_inference_on_a_regression_signature(tiny_served):
    import tensorflow as tf
    from tensorflow_serving.apis import inference_pb2, regression_pb2

    status, body = post(tiny_served, "/v1/models/tiny:regress",
                        {"signature_name": "regression", "examples": [{"x": 0.25}, {"x": [1.5]}]})
    assert status == 200 and body == {"results": [0.5, 3.0]}, body

    examples = [tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[v]))})) for v in (0.25, 0.75)]
    request = regression_pb2.RegressionRequest()
    request.model_spec.name, request.model_spec.signature_name = "tiny", "regression"
    request.input.example_list.examples.extend(examples)
    response = stub(tiny_served).Regress(request, timeout=60)
    assert [r.value for r in response.result.regressions] == [0.5, 1.5]

    multi = inference_pb2.MultiInferenceRequest()
    for method, signature in ((features.CLASSIFY_METHOD, "classification"), (features.REGRESS_METHOD, "regression")):
        task = multi.tasks.add(method_name=method)
        task.model_spec.name, task.model_spec.signature_name = "tiny", signature
    multi.input.example_list.examples.extend(examples)
    answer = stub(tiny_served).MultiInference(multi, timeout=60)
    assert grpc_rows(answer.results[0].classification_result) == [[("yes", 0.25), ("no", 0.75)],
                                                                   [("yes", 0.75), ("no", 0.25)]]
    assert [r.value for r in answer.results[1].regression_result.regressions] == [0.5, 1.5]
    # An integer where the signature parses floats is the model's INVALID_ARGUMENT, as in TF Serving.
    status, body = post(tiny_served, "/v1/models/tiny:regress",
                        {"signature_name": "regression", "examples": [{"x": 1}]})
    assert status == 400, body
