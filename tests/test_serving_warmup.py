"""Warm-up requests: written at export from eval images, replayed before a version is AVAILABLE.

The export's ``assets.extra/tf_serving_warmup_requests`` is checked as TF
Serving reads it (TFRecord of ``PredictionLog``), its requests are sent to the
server with TF Serving's own stubs, and a version whose warm-up request fails
never becomes AVAILABLE, on the built-in server and on real TF Serving when
it is there (``tests/test_serving.py``).
"""

from __future__ import annotations

import glob
import os
import shutil
import time

import grpc
import numpy as np
import pytest

from tests.test_serving import MODEL, SERVER_KINDS, copy_version, start_server
from visiontune import features


def _records(path: str):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def _warmup_file(model_dir: str) -> str:
    return os.path.join(model_dir, features.METADATA_DIR, features.WARMUP_REQUESTS_FILE)


def test_export_writes_warmup_requests_from_eval_images(exported_model, shapes_transformed):
    import tensorflow as tf

    from visiontune.components import transform, warmup_requests

    path = _warmup_file(exported_model.serving_model_dir)
    logs = _records(path)
    kinds = [log.WhichOneof("log_type") for log in logs]
    count = warmup_requests.WARMUP_IMAGES
    assert kinds == ["predict_log"] * (count + 1) + ["classify_log"]
    # The first eval images of the transformed split, pixel for pixel, at the model's input size.
    _, transformed_dir, _, size = shapes_transformed
    files = sorted(glob.glob(os.path.join(transformed_dir, "eval*")))
    spec = {features.PIXELS_KEY: tf.io.FixedLenFeature([], tf.string)}
    expected = [transform.decode_pixels_one(tf.io.parse_single_example(r, spec)[features.PIXELS_KEY], size).numpy()
                for r in tf.data.TFRecordDataset(files, compression_type="GZIP").take(count)]
    singles = []
    for log in logs[:count]:
        request = log.predict_log.request
        assert request.model_spec.signature_name == features.SERVING_DEFAULT
        batch = tf.make_ndarray(request.inputs[features.IMAGE_BYTES_INPUT])
        assert batch.shape == (1,)
        singles.append(batch[0])
    for png, pixels in zip(singles, expected):
        np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), pixels)
    assert list(tf.make_ndarray(logs[count].predict_log.request.inputs[features.IMAGE_BYTES_INPUT])) == singles
    classify = logs[-1].classify_log.request
    assert classify.model_spec.signature_name == features.CLASSIFY_SIGNATURE
    assert [e.features.feature["image"].bytes_list.value[0] for e in classify.input.example_list.examples] == singles
    # Published whole: no temporary file next to it.
    assert os.listdir(os.path.dirname(path)).count(features.WARMUP_REQUESTS_FILE) == 1
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_warmup_requests_succeed_and_a_failing_one_fails_the_load(kind, exported_model, tmp_path):
    """Each request of the file answers over gRPC; a version whose warm-up fails never becomes AVAILABLE."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2, prediction_service_pb2_grpc

    model_dir = exported_model.serving_model_dir
    base = str(tmp_path / MODEL)
    copy_version(model_dir, os.path.join(base, "1"))
    server = start_server(kind, base)
    try:
        first = 1
        if server.kind == "external":   # a running server: push this export as its next version
            first = max([int(v) for v in os.listdir(server.base_path) if v.isdigit()], default=0) + 1
            copy_version(model_dir, os.path.join(server.base_path, str(first)))
        server.wait_available(first)
        client = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.grpc_target))
        for log in _records(_warmup_file(model_dir)):
            if log.HasField("predict_log"):
                request = log.predict_log.request
                request.model_spec.name = server.name
                response = client.Predict(request, timeout=60)
                batch = len(tf.make_ndarray(request.inputs[features.IMAGE_BYTES_INPUT]))
                assert tf.make_ndarray(response.outputs[features.PROBABILITIES_OUTPUT]).shape == (batch, 3)
            else:
                request = log.classify_log.request
                request.model_spec.name = server.name
                response = client.Classify(request, timeout=60)
                assert len(response.result.classifications) == len(request.input.example_list.examples)

        # The next version carries a warm-up request the model refuses (bytes that are no image).
        broken = os.path.join(server.base_path, str(first + 1))
        copy_version(model_dir, broken, with_graph=False)
        log = prediction_log_pb2.PredictionLog()
        log.predict_log.request.inputs[features.IMAGE_BYTES_INPUT].CopyFrom(
            tf.make_tensor_proto([b"these bytes are not an image"], dtype=tf.string))
        with tf.io.TFRecordWriter(_warmup_file(broken)) as writer:
            writer.write(log.SerializeToString())
        shutil.copyfile(os.path.join(model_dir, "saved_model.pb"), os.path.join(broken, "saved_model.pb"))
        # Real TF Serving retries a failed load (--max_num_load_retries, default 5, a minute apart) before END.
        deadline = time.monotonic() + (120 if server.kind == "builtin" else 420)
        while server.versions().get(first + 1) != "END":
            assert server.versions().get(first + 1) != "AVAILABLE", "served although its warm-up failed"
            assert time.monotonic() < deadline, server.versions()
            time.sleep(0.1)
        status = server.rest().status(first + 1)["model_version_status"][0]["status"]
        assert status["error_code"] != "OK"
        if server.kind == "builtin":
            assert "warm-up request 1 (predict_log) failed: INVALID_ARGUMENT" in status["error_message"]
            assert features.WARMUP_REQUESTS_FILE in status["error_message"]
        assert server.latest() == first
    finally:
        server.stop()


def test_builtin_replays_the_file_and_falls_back_without_it(exported_model, tmp_path, caplog):
    """Loads run in this thread (``poll_once``): the version is AVAILABLE once its requests were replayed."""
    import logging

    from visiontune.serving.model_server import ModelManager

    model_dir = exported_model.serving_model_dir
    base = tmp_path / MODEL
    copy_version(model_dir, str(base / "1"))
    copy_version(model_dir, str(base / "2"))
    os.remove(_warmup_file(str(base / "2")))                 # an export without the file
    copy_version(model_dir, str(base / "3"))
    with open(_warmup_file(str(base / "3")), "wb") as f:     # not TFRecord
        f.write(b"not a TFRecord file")
    manager = ModelManager(MODEL, str(base), num_versions=3)
    with caplog.at_level(logging.INFO, logger="visiontune.serving"):
        manager.poll_once()
        manager.poll_once()   # the second scan: every version's files are settled
    states = {s.version: s for s in manager.status(MODEL)}
    assert states[1].state == "AVAILABLE" and states[2].state == "AVAILABLE"
    assert states[3].state == "END" and "TFRecord" in states[3].error_message
    replayed = [r.getMessage() for r in caplog.records if "warm-up requests" in r.getMessage()]
    count = 4 + 1 + 1   # one predict per image, one batch, one classify (components/warmup_requests.py)
    assert replayed == [f"version 1: replayed {count} warm-up requests from {_warmup_file(str(base / '1'))}"]
    assert manager.versions() == [1, 2]
