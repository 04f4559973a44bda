"""Several models from one ``--model_config_file``: version policies, labels, live reloads (issue 15 item 2).

The built-in server is started the way ``visiontune serve --model_config_file``
starts it (a ``ServerCore`` behind the REST and gRPC servers) on copies of the
shared tiny export; REST is plain HTTP, gRPC is TF Serving's own stubs
(``tensorflow_serving.apis``), reloads go through the real
``ModelService/HandleReloadConfigRequest``.  The label test also runs against
real TF Serving when ``tensorflow_model_server`` is on PATH.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse

import grpc
import numpy as np
import pytest

from tests.test_serving import _free_port, copy_version, start_tf_serving

IMAGE_CONFIG = """model_config_list {{
  config {{
    name: "shapes" base_path: "{shapes}" model_platform: "tensorflow"
    model_version_policy {{ all {{}} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
  config {{
    name: "latest2" base_path: "{shapes}" model_platform: "tensorflow"
    model_version_policy {{ latest {{ num_versions: 2 }} }}
  }}
  config {{
    name: "pinned" base_path: "{shapes}" model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 versions: 3 }} }}
  }}
  config {{ name: "other" base_path: "{other}" model_platform: "tensorflow" }}
}}
"""


def png(seed: int = 0) -> bytes:
    import io
    import random

    from tests.conftest import draw_shape

    out = io.BytesIO()
    draw_shape("circle", 32, random.Random(seed)).save(out, "PNG")
    return out.getvalue()


def age(folder: str) -> None:
    """Files an hour old: the server's first scan loads them at once (no wait for a settled copy)."""
    past = time.time() - 3600
    for root, _, files in os.walk(folder):
        for f in files:
            os.utime(os.path.join(root, f), (past, past))


@pytest.fixture(scope="module")
def model_root(exported_model, tmp_path_factory):
    """serving/shapes/{1,2,3} and serving/other/5: copies of the tiny export."""
    root = tmp_path_factory.mktemp("config") / "serving"
    for name, version in (("shapes", 1), ("shapes", 2), ("shapes", 3), ("other", 5)):
        copy_version(exported_model.serving_model_dir, str(root / name / str(version)))
    age(str(root))
    return root


class Served:
    """A ``ServerCore`` behind the REST and gRPC servers, as ``visiontune serve --model_config_file`` runs it."""

    def __init__(self, config_text: str, allow_unavailable_labels: bool = False):
        from visiontune.serving import model_config
        from visiontune.serving.grpc_server import GrpcServer
        from visiontune.serving.model_server import Limits
        from visiontune.serving.rest import RestServer
        from visiontune.serving.server_core import ServerCore

        self.core = ServerCore(Limits(workers=2), poll_seconds=0.2,
                               allow_version_labels_for_unavailable_models=allow_unavailable_labels)
        self.core.reload(model_config.parse(config_text))
        self.rest_server = RestServer(self.core, port=0).start()
        self.grpc_server = GrpcServer(self.core, port=0).start()
        self.rest_port, self.grpc_target = self.rest_server.port, self.grpc_server.target

    def stop(self):
        self.rest_server.stop()
        self.grpc_server.stop()
        self.core.stop()


@pytest.fixture(scope="module")
def served(model_root):
    server = Served(IMAGE_CONFIG.format(shapes=model_root / "shapes", other=model_root / "other"),
                    allow_unavailable_labels=True)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- plain HTTP and TF Serving's stubs

def rest(port: int, method: str, path: str, body=None):
    """(HTTP status, JSON answer) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None,
                           {"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def rest_predict(port: int, path: str, image: bytes):
    return rest(port, "POST", f"{path}:predict", {"instances": [{"b64": base64.b64encode(image).decode()}]})


def stubs(target: str):
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(target)
    return (channel, prediction_service_pb2_grpc.PredictionServiceStub(channel),
            model_service_pb2_grpc.ModelServiceStub(channel))


def grpc_predict(stub, name: str, image: bytes, version=None, label=None):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([image]))
    return stub.Predict(request, timeout=60)


def grpc_states(stub, name: str) -> dict:
    from tensorflow_serving.apis import get_model_status_pb2

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    response = stub.GetModelStatus(request, timeout=60)
    return {s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state)
            for s in response.model_version_status}


def rest_states(port: int, name: str) -> dict:
    status, answer = rest(port, "GET", f"/v1/models/{name}")
    assert status == 200, answer
    return {int(s["version"]): s["state"] for s in answer["model_version_status"]}


def available(states: dict) -> list:
    return sorted(v for v, s in states.items() if s == "AVAILABLE")


def wait_until(check, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (AssertionError, grpc.RpcError, OSError):
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def reload(model_stub, config_text: str):
    from tensorflow_serving.apis import model_management_pb2

    from visiontune.serving import model_config

    request = model_management_pb2.ReloadConfigRequest()
    request.config.CopyFrom(model_config.parse(config_text))
    return model_stub.HandleReloadConfigRequest(request, timeout=120)


# ---------------------------------------------------------------- the tests

def test_each_version_policy_over_rest_and_grpc(served):
    channel, _, model_stub = stubs(served.grpc_target)
    with channel:
        for name, versions in (("shapes", [1, 2, 3]), ("latest2", [2, 3]), ("pinned", [1, 3]), ("other", [5])):
            wait_until(lambda: available(rest_states(served.rest_port, name)) == versions)
            assert available(grpc_states(model_stub, name)) == versions, name


def test_two_models_from_one_file_answer_on_rest_and_grpc(served, exported_model):
    import tensorflow as tf

    image = png(1)
    expected = tf.saved_model.load(exported_model.serving_model_dir).signatures["serving_default"](
        image_bytes=tf.constant([image]))["probabilities"].numpy()
    channel, prediction_stub, _ = stubs(served.grpc_target)
    with channel:
        for name, version in (("other", 5), ("latest2", 3)):
            status, answer = rest_predict(served.rest_port, f"/v1/models/{name}", image)
            assert status == 200, answer
            np.testing.assert_allclose(answer["predictions"][0]["probabilities"], expected[0], rtol=1e-5)
            response = grpc_predict(prediction_stub, name, image)
            assert (response.model_spec.name, response.model_spec.version.value) == (name, version)
            np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), expected, rtol=1e-5)
        # A version the policy does not serve is not found, by number.
        status, answer = rest_predict(served.rest_port, "/v1/models/pinned/versions/2", image)
        assert status == 404 and answer["error"] == "Servable not found for request: Specific(pinned, 2)"
        with pytest.raises(grpc.RpcError) as e:
            grpc_predict(prediction_stub, "pinned", image, version=2)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_labels_resolve_on_rest_and_grpc(served):
    image = png(2)
    channel, prediction_stub, model_stub = stubs(served.grpc_target)
    with channel:
        wait_until(lambda: available(rest_states(served.rest_port, "shapes")) == [1, 2, 3])
        for label, version in (("stable", 1), ("canary", 2)):
            status, answer = rest_predict(served.rest_port, f"/v1/models/shapes/labels/{label}", image)
            assert status == 200 and len(answer["predictions"]) == 1, answer
            status, answer = rest(served.rest_port, "GET", f"/v1/models/shapes/labels/{label}/metadata")
            assert status == 200 and answer["model_spec"]["version"] == str(version)
            status, answer = rest(served.rest_port, "GET", f"/v1/models/shapes/labels/{label}")
            assert status == 200 and [s["version"] for s in answer["model_version_status"]] == [str(version)]
            response = grpc_predict(prediction_stub, "shapes", image, label=label)
            assert (response.model_spec.name, response.model_spec.version.value) == ("shapes", version)


def test_clients_and_predict_command_take_a_label(served, tmp_path, capfd):
    from visiontune import cli
    from visiontune.serving.client import GrpcClient, RestClient

    url = f"http://127.0.0.1:{served.rest_port}"
    assert RestClient(url, "shapes", label="canary").metadata()["model_spec"]["version"] == "2"
    grpc_client = GrpcClient(served.grpc_target, "shapes", label="stable")
    try:
        assert grpc_client.predict_response({"image_bytes": np.array([png()], dtype=object)}).model_spec \
            .version.value == 1
    finally:
        grpc_client.close()
    image = tmp_path / "circle.png"
    image.write_bytes(png(6))
    for where in (["--server", url], ["--grpc", served.grpc_target]):
        assert cli.main(["predict", *where, "--model", "shapes", "--label", "canary", str(image)]) == 0
        assert str(image) in capfd.readouterr().out
        assert cli.main(["predict", *where, "--model", "shapes", "--label", "nope", str(image)]) == 2
        assert capfd.readouterr().err.strip().endswith("INVALID_ARGUMENT: Unrecognized servable version label: nope")
    assert cli.main(["predict", "--server", url, "--model", "shapes", "--label", "canary", "--version", "1",
                     str(image)]) == 2
    assert "--version and --label both pick a version: pass one" in capfd.readouterr().err


def test_unknown_labels_are_400_and_invalid_argument(served):
    image = png(3)
    channel, prediction_stub, _ = stubs(served.grpc_target)
    with channel:
        # "nope" is no label of shapes; latest2 has no labels at all; nobody is no model.
        for name, label in (("shapes", "nope"), ("latest2", "stable"), ("nobody", "stable")):
            status, answer = rest_predict(served.rest_port, f"/v1/models/{name}/labels/{label}", image)
            assert (status, answer) == (400, {"error": f"Unrecognized servable version label: {label}"})
            status, answer = rest(served.rest_port, "GET", f"/v1/models/{name}/labels/{label}/metadata")
            assert status == 400, answer
            with pytest.raises(grpc.RpcError) as e:
                grpc_predict(prediction_stub, name, image, label=label)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details() == f"Unrecognized servable version label: {label}"


RELOAD_BASE = """model_config_list {{
  config {{ name: "shapes" base_path: "{shapes}" model_platform: "tensorflow" model_version_policy {{ all {{}} }}
           {labels} }}
  {extra}
}}
"""
EXTRA = ('config { name: "extra" base_path: "%s" model_platform: "tensorflow" '
         'model_version_policy { specific { versions: 2 } } }')


def labels_text(**labels) -> str:
    return " ".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in labels.items())


def test_reload_adds_a_model_and_moves_a_label_without_dropping_requests(model_root, tmp_path):
    shapes = model_root / "shapes"
    server = Served(RELOAD_BASE.format(shapes=shapes, labels="", extra=""))
    channel, prediction_stub, model_stub = stubs(server.grpc_target)
    failures, answered, stop = [], [0], threading.Event()

    def hammer():   # a model that stays: none of its requests may fail while the config changes
        image = png(4)
        while not stop.is_set():
            try:
                grpc_predict(prediction_stub, "shapes", image, version=3)
                answered[0] += 1
            except grpc.RpcError as e:
                failures.append(f"{e.code()}: {e.details()}")
            stop.wait(0.02)   # steady traffic, leaving the CPU to the reloads

    try:
        with channel:
            assert available(grpc_states(model_stub, "shapes")) == [1, 2, 3]
            worker = threading.Thread(target=hammer)
            worker.start()
            try:
                # A model added, labels set: answered OK, as TF Serving's ReloadConfigResponse.
                response = reload(model_stub, RELOAD_BASE.format(
                    shapes=shapes, labels=labels_text(stable=1, canary=2), extra=EXTRA % shapes))
                assert response.status.error_code == 0 and response.status.error_message == ""
                assert available(grpc_states(model_stub, "extra")) == [2]
                assert grpc_predict(prediction_stub, "shapes", png(), label="stable").model_spec.version.value == 1

                # The label moves; the added model leaves.
                reload(model_stub, RELOAD_BASE.format(shapes=shapes, labels=labels_text(stable=2, canary=3),
                                                      extra=""))
                assert grpc_predict(prediction_stub, "shapes", png(), label="stable").model_spec.version.value == 2
                status, answer = rest(server.rest_port, "GET", "/v1/models/shapes/labels/canary/metadata")
                assert status == 200 and answer["model_spec"]["version"] == "3"
                status, answer = rest(server.rest_port, "GET", "/v1/models/extra")
                assert status == 404, answer

                # A label for a version that is not available is refused, and nothing changes.
                with pytest.raises(grpc.RpcError) as e:
                    reload(model_stub, RELOAD_BASE.format(shapes=shapes, labels=labels_text(stable=9), extra=""))
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert e.value.details() == ("Request to assign label to version 9 of model shapes, which is not "
                                             "currently available for inference")
                assert grpc_predict(prediction_stub, "shapes", png(), label="stable").model_spec.version.value == 2

                # A model whose versions fail to load: UNKNOWN, as TF Serving; it stays configured.
                broken = tmp_path / "broken"
                (broken / "1").mkdir(parents=True)
                (broken / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
                age(str(broken))
                extra = EXTRA.replace('"extra"', '"broken"').replace("versions: 2", "versions: 1") % broken
                with pytest.raises(grpc.RpcError) as e:
                    reload(model_stub, RELOAD_BASE.format(shapes=shapes, labels=labels_text(stable=2), extra=extra))
                assert e.value.code() == grpc.StatusCode.UNKNOWN
                # TF Serving's wording: "{" + "{" + ServableId.DebugString() + " due to error: ..." + "}, " + "}".
                assert e.value.details().startswith("1 model(s) did not become available: {{{name: broken version: "
                                                    "1} due to error: OSError: "), e.value.details()
                status, answer = rest(server.rest_port, "GET", "/v1/models/broken")
                assert status == 200 and answer["model_version_status"][0]["state"] == "END", answer

                # TF Serving's own checks: a model listed twice, a relative base path.
                twice = RELOAD_BASE.format(shapes=shapes, labels="", extra=EXTRA.replace("extra", "shapes") % shapes)
                with pytest.raises(grpc.RpcError) as e:
                    reload(model_stub, twice)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "Illegal to list model shapes multiple times" in e.value.details()
                with pytest.raises(grpc.RpcError) as e:
                    reload(model_stub, RELOAD_BASE.format(shapes="serving/shapes", labels="", extra=""))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details() == ("Expected model shapes to have an absolute path or URI; "
                                             "got base_path()=serving/shapes")

                # A new policy for a model that stays: versions 1 and 2 leave, 3 keeps answering.
                reload(model_stub, RELOAD_BASE.format(shapes=shapes, labels="", extra="").replace(
                    "all {}", "latest { num_versions: 1 }"))
                wait_until(lambda: rest_states(server.rest_port, "shapes") == {3: "AVAILABLE", 2: "END", 1: "END"})
                assert available(grpc_states(model_stub, "shapes")) == [3]
            finally:
                stop.set()
                worker.join(timeout=120)
        assert not failures and answered[0] > 0, failures[:3]
    finally:
        server.stop()


# ---------------------------------------------------------------- visiontune serve --model_config_file

def _one_line_exit_2(capfd, argv):
    from visiontune import cli

    assert cli.main(argv) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("text, says", [
    ("model_config_list { config { name: 'a' base_path: '/x' model_platform: 'tensorflow' }",
     "not a text-format ModelServerConfig: 1:"),
    ("model_config_list { config { name: 'a' base_pth: '/x' } }", 'no field named "base_pth"'),
    ("model_config_list { config { name: 'a' base_path: 'models/a' model_platform: 'tensorflow' } }",
     "Expected model a to have an absolute path or URI; got base_path()=models/a"),
    ("model_config_list { config { name: 'a' base_path: '/x' } }", "Illegal setting neither"),
    ("model_config_list { config { name: 'a' base_path: '/x' model_platform: 'pytorch' } }",
     "Model a requests unsupported platform pytorch"),
    ("model_config_list { config { name: 'a' base_path: '/x' model_platform: 'tensorflow' } "
     "config { name: 'a' base_path: '/y' model_platform: 'tensorflow' } }",
     "Illegal to list model a multiple times in config list"),
    ("", "names no model"),
    ("\udcff", "not a text file"),
])
def test_a_bad_config_file_is_one_line_naming_it_and_exit_2(tmp_path, capfd, text, says):
    path = tmp_path / "models.config"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    err = _one_line_exit_2(capfd, ["serve", "--builtin", "--model_config_file", str(path)])
    assert f"--model_config_file {path}: " in err and says in err, err


def test_config_file_flag_mistakes_are_one_line(tmp_path, capfd):
    path = tmp_path / "models.config"
    err = _one_line_exit_2(capfd, ["serve", "--builtin", "--model_config_file", str(path)])
    assert err.endswith(f"--model_config_file {path}: no such file")
    path.write_text(f"model_config_list {{ config {{ name: 'a' base_path: '{tmp_path}' "
                    "model_platform: 'tensorflow' } }")
    err = _one_line_exit_2(capfd, ["serve", "--builtin", "--model_config_file", str(path), "--num-versions", "3"])
    assert "--num-versions: the --model_config_file says this per model" in err
    err = _one_line_exit_2(capfd, ["serve", "--builtin", "--model_config_file", str(path),
                                   "--model-base-path", str(tmp_path)])
    assert "pass --model-base-path" in err
    err = _one_line_exit_2(capfd, ["serve", "--builtin"])
    assert "pass --model-base-path" in err
    path.write_text("model_config_list { config { name: 'a' base_path: 'gs://bucket/a' "
                    "model_platform: 'tensorflow' } }")
    err = _one_line_exit_2(capfd, ["serve", "--builtin", "--model_config_file", str(path), "--rest-port", "0",
                                   "--grpc-port", str(_free_port())])
    assert err.endswith(f"--model_config_file {path}: model a: base_path gs://bucket/a: the built-in server reads "
                        "local folders only")
    err = _one_line_exit_2(capfd, ["serve", "--builtin", "--model-base-path", str(tmp_path),
                                   "--model_config_file_poll_wait_seconds", "5"])
    assert "re-reads --model_config_file; pass one" in err


def test_labels_at_start_need_the_flag_as_in_tf_serving(tmp_path, capfd):
    """TF Serving assigns labels before it loads anything: at start-up a label names no AVAILABLE version."""
    path = tmp_path / "models.config"
    path.write_text(f"model_config_list {{ config {{ name: 'a' base_path: '{tmp_path}' "
                    "model_platform: 'tensorflow' version_labels { key: 'stable' value: 1 } } }")
    err = _one_line_exit_2(capfd, ["serve", "--builtin", "--model_config_file", str(path), "--rest-port", "0",
                                   "--grpc-port", str(_free_port())])
    assert (f"--model_config_file {path}: Request to assign label to version 1 of model a, which is not "
            "currently available for inference (start with --allow_version_labels_for_unavailable_models") in err


ONE_MODEL = ('model_config_list {{ config {{ name: "other" base_path: "{base}" model_platform: "tensorflow" '
             '{labels} }} }}')


def test_serve_command_polls_its_config_file(model_root, tmp_path):
    """``visiontune serve --model_config_file F --model_config_file_poll_wait_seconds S``: a label added to
    the file is served without a restart."""
    config = tmp_path / "models.config"
    config.write_text(ONE_MODEL.format(base=model_root / "other", labels=""))
    port = _free_port()
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "visiontune.cli", "serve", "--builtin",
                                    "--model_config_file", str(config), "--model_config_file_poll_wait_seconds", "0.3",
                                    "--grpc-port", "0", "--rest-port", str(port), "--poll-seconds", "0.3"],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = process.stdout.readline()
        assert "model 'other' from" in line and "versions [5]" in line, \
            (tmp_path / "stderr.txt").read_text() if process.poll() is not None else line
        assert rest(port, "GET", "/v1/models/other/labels/stable")[0] == 400
        aside = tmp_path / "models.config.new"   # as an editor saves it: whole, then renamed
        aside.write_text(ONE_MODEL.format(base=model_root / "other", labels=labels_text(stable=5)))
        os.replace(aside, config)
        wait_until(lambda: rest(port, "GET", "/v1/models/other/labels/stable/metadata")[1]
                   .get("model_spec", {}).get("version") == "5")
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


def test_write_config_prints_the_docker_command(model_root, tmp_path, capsys):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from visiontune import cli

    out = tmp_path / "models.config"
    assert cli.main(["serve", "--model-base-path", str(model_root / "shapes"), "--num-versions", "3",
                     "--write-config", str(out), "--config-root", "/models"]) == 0
    config = text_format.Parse(out.read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("shapes", "/models/shapes", "tensorflow")
    assert model.model_version_policy.latest.num_versions == 3
    said = capsys.readouterr().out.splitlines()
    assert said[1] == (f"docker run --rm -p 8500:8500 -p 8501:8501 --mount type=bind,source={model_root},"
                       f"target=/models --mount type=bind,source={tmp_path},target=/config tensorflow/serving "
                       "--model_config_file=/config/models.config")

    # A user's config file, rewritten for the container; the config next to the models needs one mount.
    user = tmp_path / "user.config"
    user.write_text(IMAGE_CONFIG.format(shapes=model_root / "shapes", other=model_root / "other"))
    out = model_root / "models.config"
    assert cli.main(["serve", "--model_config_file", str(user), "--write-config", str(out),
                     "--config-root", "/models", "--allow_version_labels_for_unavailable_models"]) == 0
    config = text_format.Parse(out.read_text(), model_server_config_pb2.ModelServerConfig())
    written = {m.name: m for m in config.model_config_list.config}
    assert {n: m.base_path for n, m in written.items()} == {
        "shapes": "/models/shapes", "latest2": "/models/shapes", "pinned": "/models/shapes", "other": "/models/other"}
    assert dict(written["shapes"].version_labels) == {"stable": 1, "canary": 2}
    assert list(written["pinned"].model_version_policy.specific.versions) == [1, 3]
    assert written["shapes"].model_version_policy.WhichOneof("policy_choice") == "all"
    assert written["other"].model_version_policy.latest.num_versions == 1
    assert capsys.readouterr().out.splitlines()[1] == (
        f"docker run --rm -p 8500:8500 -p 8501:8501 --mount type=bind,source={model_root},target=/models "
        "tensorflow/serving --model_config_file=/models/models.config "
        "--allow_version_labels_for_unavailable_models")

    # The batching and monitoring files written with it are mounted and passed on the same line.
    files = tmp_path / "tf_serving"
    files.mkdir()
    assert cli.main(["serve", "--model-base-path", str(model_root / "shapes"), "--config-root", "/models",
                     "--write-config", str(files / "models.config"),
                     "--write-batching-config", str(files / "batching.config"),
                     "--write-monitoring-config", str(files / "monitoring.config")]) == 0
    assert sorted(os.listdir(files)) == ["batching.config", "models.config", "monitoring.config"]
    assert capsys.readouterr().out.splitlines()[1] == (
        f"docker run --rm -p 8500:8500 -p 8501:8501 --mount type=bind,source={model_root},target=/models "
        f"--mount type=bind,source={files},target=/config tensorflow/serving "
        "--model_config_file=/config/models.config --enable_batching=true "
        "--batching_parameters_file=/config/batching.config --monitoring_config_file=/config/monitoring.config")


def test_hand_off_passes_the_config_file_and_tf_serving_flags_on(tmp_path):
    stub = tmp_path / "bin" / "tensorflow_model_server"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$STUB_RECORD"\n')
    stub.chmod(0o755)
    record = tmp_path / "argv.txt"
    config = tmp_path / "models.config"
    config.write_text(f"model_config_list {{ config {{ name: 'a' base_path: '{tmp_path}' "
                      "model_platform: 'tensorflow' } }")
    env = dict(os.environ, PATH=f"{stub.parent}{os.pathsep}{os.environ.get('PATH', '')}", STUB_RECORD=str(record))
    result = subprocess.run([sys.executable, "-m", "visiontune.cli", "serve", "--model_config_file", str(config),
                             "--allow_version_labels_for_unavailable_models",
                             "--model_config_file_poll_wait_seconds", "30"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    assert argv[:-1] == [
        "--port=8500", "--rest_api_port=8501", f"--model_config_file={config}", "--file_system_poll_wait_seconds=1",
        "--allow_version_labels_for_unavailable_models", "--model_config_file_poll_wait_seconds=30"]
    assert argv[-1].startswith("--monitoring_config_file=")   # metrics on, as on the built-in server


# ---------------------------------------------------------------- the same labels on real TF Serving

@pytest.mark.parametrize("kind", ["builtin", "tfserving"])
def test_labels_and_reload_on_both_servers(kind, model_root, tmp_path):
    """The label requests and the reload of the tests above, against the built-in server and real TF Serving
    (``tensorflow_model_server`` on PATH; the status of a label is left out: TF Serving ignores the label there)."""
    text = RELOAD_BASE.format(shapes=model_root / "shapes", labels=labels_text(stable=1, canary=2), extra="")
    if kind == "builtin":
        server = Served(text, allow_unavailable_labels=True)
        rest_port, target, stop = server.rest_port, server.grpc_target, server.stop
    else:
        if not shutil.which("tensorflow_model_server"):
            pytest.skip("real TF Serving: no tensorflow_model_server on PATH")
        real = start_tf_serving(str(tmp_path / "shapes"), "shapes", config_text=text,
                                flags=["--allow_version_labels_for_unavailable_models"])
        rest_port, target, stop = int(real.rest_url.rsplit(":", 1)[1]), real.grpc_target, real.stop
    image = png(5)
    channel, prediction_stub, model_stub = stubs(target)
    try:
        with channel:
            wait_until(lambda: available(grpc_states(model_stub, "shapes")) == [1, 2, 3])
            for label, version in (("stable", 1), ("canary", 2)):
                status, answer = rest_predict(rest_port, f"/v1/models/shapes/labels/{label}", image)
                assert status == 200 and len(answer["predictions"]) == 1, answer
                status, answer = rest(rest_port, "GET", f"/v1/models/shapes/labels/{label}/metadata")
                assert status == 200 and answer["model_spec"]["version"] == str(version), answer
                assert grpc_predict(prediction_stub, "shapes", image, label=label).model_spec.version.value == version
            status, answer = rest_predict(rest_port, "/v1/models/shapes/labels/nope", image)
            assert status == 400 and "Unrecognized servable version label: nope" in answer["error"]
            with pytest.raises(grpc.RpcError) as e:
                grpc_predict(prediction_stub, "shapes", image, label="nope")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            reload(model_stub, RELOAD_BASE.format(shapes=model_root / "shapes",
                                                  labels=labels_text(stable=3, canary=2), extra=""))
            assert grpc_predict(prediction_stub, "shapes", image, label="stable").model_spec.version.value == 3
            quoted = urllib.parse.quote("stable")
            status, answer = rest(rest_port, "GET", f"/v1/models/shapes/labels/{quoted}/metadata")
            assert status == 200 and answer["model_spec"]["version"] == "3"
    finally:
        stop()
