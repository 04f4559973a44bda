"""Serving: the built-in TF Serving-compatible server, the client, `visiontune serve/predict`.

The server runs on loopback with ephemeral ports and serves a real export of
the shared tiny model (``exported_model``); every answer is compared with
``tf.saved_model.load`` in process.  The same client tests run against real
TF Serving when ``tensorflow_model_server`` is on PATH, or when
``TFSERVING_URL`` (REST), ``TFSERVING_GRPC`` (host:port), ``TFSERVING_MODEL_NAME``
and ``TFSERVING_BASE_PATH`` (the host folder the server watches) name one
already running, e.g.::

    docker run -p 8501:8501 -p 8500:8500 -v /tmp/tfs:/models/visiontune \\
        -e MODEL_NAME=visiontune tensorflow/serving
    TFSERVING_URL=http://localhost:8501 TFSERVING_GRPC=localhost:8500 \\
        TFSERVING_BASE_PATH=/tmp/tfs pytest tests/test_serving.py
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
import pytest

from tests.conftest import SHAPE_CLASSES, draw_shape
from visiontune.serving import tensors
from visiontune.serving.client import GrpcClient, PredictionError, RestClient, load_class_names, top_k
from visiontune.serving.images import encode_for_serving

MODEL = "shapes"


def copy_version(src: str, dst: str, with_graph: bool = True) -> None:
    """Writes a version as the Pusher does: everything first, ``saved_model.pb`` last."""
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            if rel == "." and f == "saved_model.pb":
                continue
            shutil.copy2(os.path.join(root, f), os.path.join(dst, rel, f))
    if with_graph:
        shutil.copyfile(os.path.join(src, "saved_model.pb"), os.path.join(dst, "saved_model.pb"))


@dataclasses.dataclass
class Served:
    kind: str
    rest_url: str
    grpc_target: str
    name: str
    base_path: str
    stop: Callable[[], None]
    manager: Optional[object] = None   # the built-in server's ModelManager

    def rest(self, **kw) -> RestClient:
        return RestClient(self.rest_url, self.name, **kw)

    def grpc(self, **kw) -> GrpcClient:
        return GrpcClient(self.grpc_target, self.name, **kw)

    def versions(self) -> dict:
        try:
            status = self.rest().status()["model_version_status"]
        except PredictionError:
            return {}
        return {int(s["version"]): s["state"] for s in status}

    def wait_available(self, version: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.versions().get(version) != "AVAILABLE":
            assert time.monotonic() < deadline, f"version {version} not available: {self.versions()}"
            time.sleep(0.1)

    def latest(self) -> int:
        return max((v for v, s in self.versions().items() if s == "AVAILABLE"), default=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_builtin(base_path: str, name: str = MODEL, **limits) -> Served:
    from visiontune.serving.grpc_server import GrpcServer
    from visiontune.serving.model_server import Limits, ModelManager
    from visiontune.serving.rest import RestServer

    manager = ModelManager(name, base_path, num_versions=2, poll_seconds=0.2,
                           limits=Limits(**limits)).start()
    rest = RestServer(manager, port=0).start()
    grpc_server = GrpcServer(manager, port=0).start()

    def stop():
        rest.stop()
        grpc_server.stop()
        manager.stop()

    return Served("builtin", rest.url, grpc_server.target, name, base_path, stop, manager)


def start_tf_serving(base_path: str, name: str = MODEL, config_text: Optional[str] = None,
                     flags: Sequence[str] = ()) -> Served:
    """Real TF Serving on ``base_path`` (latest 2 versions), or on ``config_text`` (a ModelServerConfig)."""
    from visiontune.serving.tf_serving import tf_serving_config

    config = os.path.join(os.path.dirname(base_path), f"{name}.config")
    with open(config, "w") as f:
        f.write(config_text or tf_serving_config(name, base_path, 2))
    rest_port, grpc_port = _free_port(), _free_port()
    process = subprocess.Popen([shutil.which("tensorflow_model_server"), f"--port={grpc_port}",
                                f"--rest_api_port={rest_port}", f"--model_config_file={config}",
                                *flags, "--file_system_poll_wait_seconds=1"])

    def stop():
        process.terminate()
        process.wait(timeout=30)

    return Served("tfserving", f"http://127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}", name,
                  base_path, stop)


def external_tf_serving() -> Served:
    if not os.environ.get("TFSERVING_BASE_PATH"):
        pytest.skip("TFSERVING_URL is set but TFSERVING_BASE_PATH (the folder it watches) is not")
    return Served("external", os.environ["TFSERVING_URL"], os.environ.get("TFSERVING_GRPC", ""),
                  os.environ.get("TFSERVING_MODEL_NAME", "visiontune"), os.environ["TFSERVING_BASE_PATH"],
                  lambda: None)


SERVER_KINDS = ["builtin", "tfserving"]


def start_server(kind: str, base_path: str) -> Served:
    """A server of ``kind`` watching ``base_path`` (which holds version 1, or for external, gets it)."""
    if kind == "builtin":
        return start_builtin(base_path)
    if os.environ.get("TFSERVING_URL"):
        return external_tf_serving()
    if shutil.which("tensorflow_model_server"):
        return start_tf_serving(base_path)
    pytest.skip("real TF Serving: no tensorflow_model_server on PATH and no TFSERVING_URL")


@pytest.fixture(scope="session")
def model_dir(exported_model):
    return exported_model.serving_model_dir


@pytest.fixture(scope="session")
def in_process(model_dir):
    """``serving_default`` called in process: what every server answer must equal."""
    import tensorflow as tf

    loaded = tf.saved_model.load(model_dir)
    signature = loaded.signatures["serving_default"]

    def predict(images):
        return {k: v.numpy() for k, v in signature(image_bytes=tf.constant(list(images))).items()}

    predict.loaded = loaded
    return predict


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Shape images as PNG, JPEG and PPM (which TensorFlow cannot decode: the client converts it)."""
    import random

    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(1)
    paths = []
    for i, (label, ext) in enumerate([("2", "png"), ("10", "jpg"), ("circle", "ppm"), ("2", "ppm"),
                                      ("circle", "png")]):
        path = str(folder / f"{label}_{i}.{ext}")
        draw_shape(label, 36, rng).save(path)
        paths.append(path)
    return paths


@contextlib.contextmanager
def serving(kind: str, model_dir: str, base: str):
    """A server of ``kind`` with ``model_dir`` as its newest version (pushed as the next one to an external server)."""
    copy_version(model_dir, os.path.join(base, "1"))
    server = start_server(kind, base)
    try:
        if server.kind == "external":
            version = max([int(v) for v in os.listdir(server.base_path) if v.isdigit()], default=0) + 1
            copy_version(model_dir, os.path.join(server.base_path, str(version)))
            server.wait_available(version)
        else:
            server.wait_available(1)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=SERVER_KINDS)
def served(request, model_dir, tmp_path_factory):
    with serving(request.param, model_dir, str(tmp_path_factory.mktemp(f"serving-{request.param}") / MODEL)) as server:
        yield server


def _assert_same(got, expected):
    np.testing.assert_allclose(np.asarray(got["probabilities"], np.float32), expected["probabilities"],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got["scores"], np.float32), expected["scores"], rtol=1e-6)
    assert list(np.asarray(got["class_ids"]).ravel()) == list(expected["class_ids"])
    assert list(got["classes"]) == list(expected["classes"])


# ---------------------------------------------------------------- answers equal in-process ones

def test_rest_and_grpc_predictions_equal_in_process(served, image_files, in_process):
    images = [encode_for_serving(p) for p in image_files]
    expected = in_process(images)
    rest, grpc_client = served.rest(), served.grpc()
    _assert_same(rest.predict_images(images), expected)                      # row format
    _assert_same(rest.predict({"image_bytes": np.array(images, dtype=object)}), expected)  # columnar
    _assert_same(grpc_client.predict_images(images), expected)
    # One image at a time gives the same as in a batch.
    _assert_same(rest.predict_images(images[:1]), in_process(images[:1]))


def test_status_and_metadata_over_rest_and_grpc(served):
    from tensorflow_serving.apis import get_model_status_pb2

    version = served.latest()
    status = served.rest().status(version)
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    assert status["model_version_status"][0]["status"]["error_code"] == "OK"
    metadata = served.rest().metadata()
    assert metadata["model_spec"]["name"] == served.name and metadata["model_spec"]["version"] == str(version)
    defs = metadata["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "serving_examples", "transform_features"} <= set(defs)
    assert defs["serving_default"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert set(defs["serving_default"]["outputs"]) == {"classes", "class_ids", "scores", "probabilities"}

    response, signature_defs = served.grpc().metadata()
    assert response.model_spec.version.value == version
    assert signature_defs.signature_def["serving_default"].outputs["probabilities"].dtype == 1  # DT_FLOAT
    grpc_status = served.grpc().status(version)
    assert grpc_status.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_other_signatures_by_name(served, shapes_prepared, in_process):
    """``signature_name`` picks ``serving_examples`` (serialized tf.Example input)."""
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(shapes_prepared.output_dir, "eval", "*")))
    records = [r.numpy() for r in tf.data.TFRecordDataset(files).take(4)]
    expected = in_process.loaded.signatures["serving_examples"](examples=tf.constant(records))
    for client in (served.rest(signature="serving_examples"), served.grpc(signature="serving_examples")):
        got = client.predict({"examples": np.array(records, dtype=object)})
        np.testing.assert_allclose(np.asarray(got["probabilities"], np.float32),
                                   expected["probabilities"].numpy(), rtol=1e-6, atol=1e-7)


def test_predict_command_prints_top_k(served, image_files, model_dir, in_process, capsys):
    from visiontune import cli

    expected = in_process([encode_for_serving(p) for p in image_files])
    code = cli.main(["predict", "--server", served.rest_url, "--model", served.name, "--json",
                     "--batch-size", "2", "--top-k", "3", "--classes", model_dir, *image_files])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == image_files
    for row, probs, cls in zip(rows, expected["probabilities"], expected["classes"]):
        assert [c["class"] for c in row["top_k"]] == [SHAPE_CLASSES[i] for i in np.argsort(-probs)]
        assert row["top_k"][0]["class"] == cls.decode()
        # Batches of 2 against one batch of all: float32 sums in another order differ by a few ulps.
        np.testing.assert_allclose([c["probability"] for c in row["top_k"]], np.sort(probs)[::-1], rtol=1e-5)

    code = cli.main(["predict", "--grpc", served.grpc_target, "--model", served.name, image_files[2]])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"{image_files[2]}: {expected['classes'][2].decode()} ")


def test_predict_command_errors_are_one_line(served, image_files, tmp_path, capsys):
    from visiontune import cli

    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert cli.main(["predict", "--server", served.rest_url, "--model", served.name, str(not_image)]) == 2
    assert "not an image Pillow can read" in capsys.readouterr().err
    assert cli.main(["predict", "--server", served.rest_url, "--model", "nope", image_files[0]]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli.main(["predict", "--server", f"http://127.0.0.1:{_free_port()}", "--model", served.name,
                     image_files[0]]) == 2
    assert "cannot reach" in capsys.readouterr().err


# ---------------------------------------------------------------- bad requests

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bad_rest_requests_get_tf_serving_errors(served, image_files):
    client = served.rest()
    png = encode_for_serving(image_files[0])
    predict = f"/v1/models/{served.name}:predict"
    cases = [
        (predict, b"{not json", 400),
        (predict, json.dumps({"instances": [{"b64": "***not base64***"}]}).encode(), 400),
        (predict, json.dumps({"instances": [{"b64": _b64(b"these bytes are not an image")}]}).encode(), 400),
        (predict, json.dumps({"instances": [{"b64": _b64(png)}], "signature_name": "nope"}).encode(), 400),
        (predict, json.dumps({"instances": [{"image": {"b64": _b64(png)}}]}).encode(), 400),
        (predict, json.dumps({"nothing": []}).encode(), 400),
        ("/v1/models/nope:predict", json.dumps({"instances": [{"b64": _b64(png)}]}).encode(), 404),
        (f"/v1/models/{served.name}/versions/999999999999:predict",
         json.dumps({"instances": [{"b64": _b64(png)}]}).encode(), 404),
        # No labels are configured: INVALID_ARGUMENT, as TF Serving answers an unknown label.
        (f"/v1/models/{served.name}/labels/no-such-label:predict",
         json.dumps({"instances": [{"b64": _b64(png)}]}).encode(), 400),
        # Image bytes where serialized tf.Examples belong.
        (predict, json.dumps({"signature_name": "serving_examples", "instances": [{"b64": _b64(png)}]}).encode(),
         400),
    ]
    for path, body, status in cases:
        with pytest.raises(PredictionError) as e:
            client.request("POST", path, body)
        assert e.value.http_status == status, (body[:60], e.value.message)
        assert e.value.message, body[:60]
    with pytest.raises(PredictionError) as e:
        client.request("GET", "/v1/models/nope")
    assert e.value.http_status == 404
    # Still serving, on the same connection.
    assert client.predict_images([png])["probabilities"].shape == (1, 3)


def test_bad_grpc_requests_get_tf_serving_codes(served, image_files):
    png = encode_for_serving(image_files[0])
    cases = [
        (served.grpc(), {"image_bytes": np.array([b"not an image"], dtype=object)}, {"INVALID_ARGUMENT"}),
        (served.grpc(), {"image_bytes": np.array([1.0], dtype=np.float32)}, {"INVALID_ARGUMENT"}),
        (served.grpc(), {"pixels": np.array([png], dtype=object)}, {"INVALID_ARGUMENT"}),
        (served.grpc(signature="nope"), {"image_bytes": np.array([png], dtype=object)},
         {"INVALID_ARGUMENT", "FAILED_PRECONDITION"}),   # real TF Serving says FAILED_PRECONDITION
        (GrpcClient(served.grpc_target, "nope"), {"image_bytes": np.array([png], dtype=object)}, {"NOT_FOUND"}),
        (served.grpc(version=999999999999), {"image_bytes": np.array([png], dtype=object)}, {"NOT_FOUND"}),
        (served.grpc(signature="serving_examples"), {"examples": np.array([png], dtype=object)},
         {"INVALID_ARGUMENT"}),   # image bytes where serialized tf.Examples belong
    ]
    for client, inputs, codes in cases:
        with pytest.raises(PredictionError) as e:
            client.predict(inputs)
        assert e.value.code in codes, (inputs, e.value.message)
    assert served.grpc().predict_images([png])["probabilities"].shape == (1, 3)


def test_builtin_limits_on_batch_and_body_size(served, image_files):
    if served.kind != "builtin":
        pytest.skip("request limits are the built-in server's")
    from visiontune.serving.grpc_server import GrpcServer
    from visiontune.serving.model_server import Limits

    png = encode_for_serving(image_files[0])
    manager = served.manager
    saved = manager.limits
    manager.limits = Limits(max_instances=4, max_body_bytes=4 * len(png) * 2)
    small_grpc = GrpcServer(manager, port=0).start()
    try:
        rest = served.rest()
        with pytest.raises(PredictionError) as e:
            rest.predict_images([png] * 5)
        assert e.value.http_status == 400 and "--max-instances" in e.value.message
        with pytest.raises(PredictionError) as e:
            rest.predict_images([png] * 4 + [png * 3])
        assert e.value.http_status == 413 and "--max-body-bytes" in e.value.message
        client = GrpcClient(small_grpc.target, served.name)
        with pytest.raises(PredictionError) as e:
            client.predict_images([png] * 5)
        assert e.value.code == "INVALID_ARGUMENT"
        with pytest.raises(PredictionError) as e:
            client.predict_images([png * 10])
        assert e.value.code == "RESOURCE_EXHAUSTED"
        assert rest.predict_images([png] * 4)["probabilities"].shape == (4, 3)
        assert client.predict_images([png] * 4)["probabilities"].shape == (4, 3)
    finally:
        small_grpc.stop()
        manager.limits = saved


# ---------------------------------------------------------------- hot reload

@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_a_pushed_version_is_picked_up_and_the_old_one_still_answers(kind, model_dir, image_files, tmp_path,
                                                                       in_process):
    base = str(tmp_path / MODEL)
    copy_version(model_dir, os.path.join(base, "1"))
    server = start_server(kind, base)
    try:
        old = server.latest() if server.kind == "external" else 1
        if server.kind != "external":
            server.wait_available(1)
        png = encode_for_serving(image_files[0])
        expected = in_process([png])
        # Requests keep being answered, by some complete version, while the new one loads.
        errors, answered, done = [], [], threading.Event()

        def hammer():
            client = server.rest()
            while not done.is_set():
                try:
                    _assert_same(client.predict_images([png]), expected)
                    answered.append(1)
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    errors.append(e)

        thread = threading.Thread(target=hammer)
        thread.start()
        new = old + 1
        try:
            copy_version(model_dir, os.path.join(server.base_path, str(new)), with_graph=False)
            time.sleep(1.5)  # several polls: a version without saved_model.pb is not loaded
            assert new not in server.versions() or server.versions()[new] != "AVAILABLE"
            copy_version(model_dir, os.path.join(server.base_path, str(new)))
            server.wait_available(new)
        finally:
            done.set()
            thread.join()
        assert not errors and answered
        grpc_client = server.grpc()
        assert grpc_client.predict_response({"image_bytes": np.array([png], dtype=object)}) \
            .model_spec.version.value == new
        old_answer = server.grpc(version=old).predict_response({"image_bytes": np.array([png], dtype=object)})
        assert old_answer.model_spec.version.value == old
        _assert_same(server.rest(version=old).predict_images([png]), expected)
        assert server.versions()[old] == "AVAILABLE"
    finally:
        server.stop()


@pytest.mark.e2e  # ~30 s on 2 busy cores: three loads of the model
def test_builtin_never_loads_a_broken_version_and_keeps_the_latest_n(model_dir, image_files, tmp_path):
    base = str(tmp_path / MODEL)
    copy_version(model_dir, os.path.join(base, "1"))
    copy_version(model_dir, os.path.join(base, "2"))
    server = start_builtin(base)
    try:
        server.wait_available(2)
        server.wait_available(1)
        # A half-written graph (a truncated saved_model.pb) fails to load and does not displace v2.
        broken = os.path.join(base, "3")
        copy_version(model_dir, broken, with_graph=False)
        with open(os.path.join(model_dir, "saved_model.pb"), "rb") as f:
            data = f.read()
        with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
            f.write(data[:len(data) // 3])
        deadline = time.monotonic() + 30
        while server.versions().get(3) != "END":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert server.rest().status(3)["model_version_status"][0]["status"]["error_code"] != "OK"
        assert server.latest() == 2 and server.versions()[1] == "AVAILABLE"
        png = encode_for_serving(image_files[0])
        assert server.grpc().predict_response({"image_bytes": np.array([png], dtype=object)}) \
            .model_spec.version.value == 2
        # Fixed in place (the whole version rewritten): now it loads, and v1 falls out of the latest 2.
        shutil.rmtree(broken)
        copy_version(model_dir, broken)
        server.wait_available(3)
        deadline = time.monotonic() + 30
        while server.versions().get(1) != "END":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(PredictionError) as e:
            server.rest(version=1).predict_images([png])
        assert e.value.http_status == 404
        assert sorted(server.manager.versions()) == [2, 3]
    finally:
        server.stop()


# ---------------------------------------------------------------- the serve command

def test_serve_command_runs_the_builtin_server_on_loopback(model_dir, image_files, tmp_path, in_process):
    base = str(tmp_path / MODEL)
    copy_version(model_dir, os.path.join(base, "7"))
    rest_port, grpc_port = _free_port(), _free_port()
    env = dict(os.environ, PATH=os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                 if not os.path.exists(os.path.join(p, "tensorflow_model_server"))))
    process = subprocess.Popen([sys.executable, "-m", "visiontune.cli", "serve", "--model-base-path", base,
                                "--rest-port", str(rest_port), "--grpc-port", str(grpc_port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "built-in model server" in line, process.stderr.read() if process.poll() is not None else line
        assert f"REST http://127.0.0.1:{rest_port}" in line and f"gRPC 127.0.0.1:{grpc_port}" in line
        assert "versions [7]" in line
        png = encode_for_serving(image_files[3])
        _assert_same(RestClient(f"http://127.0.0.1:{rest_port}", MODEL).predict_images([png]), in_process([png]))
        _assert_same(GrpcClient(f"127.0.0.1:{grpc_port}", MODEL).predict_images([png]), in_process([png]))
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def test_serve_command_errors(tmp_path, capsys):
    from visiontune import cli

    assert cli.main(["serve", "--model-base-path", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["predict", "--model", "m", str(tmp_path / "x.png")]) == 2
    assert "--server URL" in capsys.readouterr().err


def test_tf_serving_config_keeps_the_same_versions():
    """The generated --model_config_file parses as TF Serving's own ModelServerConfig proto."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from visiontune.serving.tf_serving import tf_serving_config

    text = tf_serving_config("gtsrb", "/srv/models/gtsrb", 3)
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("gtsrb", "/srv/models/gtsrb", "tensorflow")
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions == 3
    # A truncated file does not parse (the substring checks this replaced passed it).
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.rstrip().rstrip("}"), model_server_config_pb2.ModelServerConfig())


# ---------------------------------------------------------------- JSON tensors (no model)

class _Spec:
    def __init__(self, dtype):
        import tensorflow as tf

        self.dtype = tf.as_dtype(dtype)


def test_row_and_columnar_formats_follow_tf_serving():
    specs = {"image_bytes": _Spec("string"), "weight": _Spec("float32")}
    inputs, fmt = tensors.parse_predict_request(
        {"instances": [{"image_bytes": {"b64": _b64(b"\xff\x00")}, "weight": [1, 2]},
                       {"image_bytes": "text", "weight": [3, 4.5]}]}, specs)
    assert fmt == tensors.ROW and list(inputs["image_bytes"]) == [b"\xff\x00", b"text"]
    assert inputs["weight"].dtype == np.float32 and inputs["weight"].shape == (2, 2)
    inputs, fmt = tensors.parse_predict_request({"inputs": {"image_bytes": ["a"], "weight": [[1, 2]]}}, specs)
    assert fmt == tensors.COLUMNAR and inputs["weight"].shape == (1, 2)
    # One input: bare values, in both formats.
    one = {"image_bytes": _Spec("string")}
    assert list(tensors.parse_predict_request({"instances": [{"b64": _b64(b"x")}]}, one)[0]["image_bytes"]) == [b"x"]
    assert tensors.parse_predict_request({"inputs": [{"b64": _b64(b"y")}]}, one)[0]["image_bytes"].shape == (1,)

    out = {"classes": np.array([b"a", b"\xff"], dtype=object), "thumb_bytes": np.array([b"ok", b"x"], dtype=object),
           "scores": np.array([0.5, 0.25], np.float32)}
    row = tensors.make_predict_response(out, tensors.ROW)["predictions"]
    assert row[0] == {"classes": "a", "thumb_bytes": {"b64": _b64(b"ok")}, "scores": 0.5}
    assert row[1]["classes"] == {"b64": _b64(b"\xff")}   # not UTF-8: base64
    assert tensors.make_predict_response({"scores": out["scores"]}, tensors.ROW) == {"predictions": [0.5, 0.25]}
    assert tensors.make_predict_response({"scores": out["scores"]}, tensors.COLUMNAR) == {"outputs": [0.5, 0.25]}


@pytest.mark.parametrize("body", [
    {"instances": [{"image_bytes": "a", "weight": [1]}, {"image_bytes": "b", "weight": [1, 2]}]},  # ragged
    {"instances": [{"image_bytes": "a"}]},                                                           # missing
    {"instances": [{"image_bytes": "a", "weight": ["x"]}]},                                          # type
    {"inputs": {"image_bytes": ["a"], "weight": [[1]], "extra": [1]}},                               # unknown
    {"instances": [], "inputs": {}},
    {"instances": "a"},
    [1, 2],
])
def test_malformed_json_tensors_are_invalid_argument(body):
    from visiontune.serving.model_server import ServingError

    specs = {"image_bytes": _Spec("string"), "weight": _Spec("float32")}
    with pytest.raises(ServingError) as e:
        tensors.parse_predict_request(body, specs)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.http_status == 400


def test_top_k_names_classes_from_a_list_or_from_the_answer(tmp_path):
    outputs = {"probabilities": np.array([[0.1, 0.7, 0.2]]), "classes": np.array([b"b"], dtype=object),
               "class_ids": np.array([1])}
    assert [c["class"] for c in top_k(outputs, 3, ["a", "b", "c"])[0]] == ["b", "c", "a"]
    assert [c["class"] for c in top_k(outputs, 2)[0]] == ["b", "#2"]
    version = tmp_path / "model" / "12" / "assets.extra"
    version.mkdir(parents=True)
    (version / "classes.txt").write_text("a\nb\nc\n")
    (tmp_path / "model" / "\u00b2").mkdir()   # not a version: no crash, not "newer"
    assert load_class_names(str(tmp_path / "model")) == ["a", "b", "c"]
    assert load_class_names(str(tmp_path / "model" / "12")) == ["a", "b", "c"]
