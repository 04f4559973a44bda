"""``visiontune serve``'s own command paths (issue 16 item 4, issue 14 item 2's refusals).

* The hand-off to ``tensorflow_model_server``: a stub executable on PATH
  records the command line it is given (a test of our command line, not a
  mock of the server), and the config file it is pointed at is parsed with
  TF Serving's own ``ModelServerConfig`` proto.
* ``--builtin`` (even with TF Serving on PATH), ``--host``, port 0 (one API
  off) and ``--num-versions``, through a real ``visiontune serve`` process.
* Every refused value: exit status 2, one line naming the option, no traceback.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from tests.test_serving import MODEL, _free_port, copy_version

STUB = """#!/bin/sh
# A stand-in for TF Serving: records its argv and the config file it was given, then exits.
printf '%s\\n' "$@" > "$STUB_RECORD"
for arg in "$@"; do
  case "$arg" in --model_config_file=*) cp "${arg#--model_config_file=}" "$STUB_RECORD.config" ;; esac
done
"""


@pytest.fixture(scope="module")
def model_dir(exported_model):
    return exported_model.serving_model_dir


@pytest.fixture
def stub_path(tmp_path):
    """PATH with a ``tensorflow_model_server`` stub first; returns (env, record file)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    stub = folder / "tensorflow_model_server"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "argv.txt"
    env = dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ.get('PATH', '')}", STUB_RECORD=str(record))
    return env, record


def _serve(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "visiontune.cli", "serve", *args], env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_hands_over_to_tf_serving_with_our_command_line(tmp_path, stub_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    env, record = stub_path
    base = tmp_path / "serving" / "signs"
    base.mkdir(parents=True)
    result = _serve(["--model-base-path", str(base), "--rest-port", "9601", "--grpc-port", "9600",
                     "--num-versions", "3", "--poll-seconds", "2.6", "--host", "10.1.2.3"], env)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    assert argv[:2] == ["--port=9600", "--rest_api_port=9601"]
    assert argv[3] == "--file_system_poll_wait_seconds=3" and len(argv) == 5
    assert argv[4].startswith("--monitoring_config_file=")   # metrics on, as on the built-in server
    assert argv[2].startswith("--model_config_file=")
    assert result.stdout.startswith("running TF Serving: ") and argv[2] in result.stdout
    assert "--host is ignored" in result.stderr   # TF Serving has no bind address option
    config = text_format.Parse((tmp_path / "argv.txt.config").read_text(),
                               model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("signs", str(base), "tensorflow")
    assert model.model_version_policy.latest.num_versions == 3

    # --model-name overrides the folder name; the checks run before the hand-off.
    result = _serve(["--model-base-path", str(base), "--model-name", "stop_signs"], env)
    assert result.returncode == 0
    config = text_format.Parse((tmp_path / "argv.txt.config").read_text(),
                               model_server_config_pb2.ModelServerConfig())
    assert config.model_config_list.config[0].name == "stop_signs"
    record.unlink()
    result = _serve(["--model-base-path", str(base), "--poll-seconds", "0"], env)
    assert result.returncode == 2 and not record.exists()


def test_builtin_flag_host_port_0_and_num_versions(model_dir, tmp_path, stub_path):
    """--builtin wins over TF Serving on PATH; --host binds that address only; --rest-port 0 turns REST
    off; --num-versions 1 keeps the latest version only."""
    from tensorflow_serving.apis import get_model_status_pb2

    from visiontune.serving.client import GrpcClient, PredictionError

    env, record = stub_path
    base = str(tmp_path / MODEL)
    copy_version(model_dir, os.path.join(base, "1"))
    copy_version(model_dir, os.path.join(base, "2"))
    host, grpc_port = "127.0.0.2", _free_port()
    process = subprocess.Popen([sys.executable, "-m", "visiontune.cli", "serve", "--builtin", "--model-base-path",
                                base, "--host", host, "--rest-port", "0", "--grpc-port", str(grpc_port),
                                "--num-versions", "1", "--poll-seconds", "0.3"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "built-in model server (--builtin)" in line, process.stderr.read() if process.poll() else line
        assert f"gRPC {host}:{grpc_port}" in line and "REST" not in line and "versions [2]" in line
        assert not record.exists()   # the stub was never run
        client = GrpcClient(f"{host}:{grpc_port}", MODEL, timeout=30)
        statuses = {s.version: s.state for s in client.status().model_version_status}
        assert statuses == {2: get_model_status_pb2.ModelVersionStatus.AVAILABLE}   # version 1 is not kept
        with pytest.raises(PredictionError) as e:
            GrpcClient(f"{host}:{grpc_port}", MODEL, version=1, timeout=30).predict_images([b"x"])
        assert e.value.code == "NOT_FOUND"
        with socket.socket() as probe:   # bound to --host only
            assert probe.connect_ex(("127.0.0.1", grpc_port)) != 0
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


@pytest.mark.parametrize("args, says", [
    (["--poll-seconds", "0"], "--poll-seconds: got 0"),
    (["--poll-seconds", "nan"], "--poll-seconds: got nan"),
    (["--rest-port", "70000"], "--rest-port: got 70000"),
    (["--grpc-port", "-1"], "--grpc-port: got -1"),
    (["--rest-port", "0", "--grpc-port", "0"], "nothing to serve"),
    (["--rest-port", "9100", "--grpc-port", "9100"], "both 9100"),
    (["--model-name", "../../x"], "--model-name: got '../../x'"),
    (["--model-name", "a/b"], "--model-name: got 'a/b'"),
    (["--num-versions", "0"], "--num-versions: got 0"),
    (["--max-pixels", "0"], "--max-pixels: got 0"),
    (["--idle-timeout", "-5"], "--idle-timeout: got -5"),
])
def test_refused_values_are_one_line_and_exit_2(tmp_path, capfd, args, says):
    from visiontune import cli

    base = tmp_path / MODEL
    base.mkdir()
    assert cli.main(["serve", "--builtin", "--model-base-path", str(base), *args]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err


def test_a_base_path_folder_name_that_is_no_model_name_is_refused(tmp_path, capfd):
    from visiontune import cli

    base = tmp_path / "my model"
    base.mkdir()
    assert cli.main(["serve", "--builtin", "--model-base-path", str(base)]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --model-name" in err


@pytest.mark.parametrize("busy", ["rest", "grpc"])
def test_a_port_in_use_is_one_line_and_exit_2(tmp_path, capfd, busy):
    from visiontune import cli

    base = tmp_path / MODEL
    base.mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"rest": _free_port(), "grpc": _free_port(), busy: taken}
        code = cli.main(["serve", "--builtin", "--model-base-path", str(base), "--rest-port", str(ports["rest"]),
                         "--grpc-port", str(ports["grpc"])])
    assert code == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{'REST' if busy == 'rest' else 'gRPC'} cannot listen on 127.0.0.1 port {taken}" in err
    assert "in use" in err


def test_model_name_is_one_safe_folder_in_the_pipeline_config_too():
    from visiontune import configs
    from visiontune.errors import ConfigError

    for name in ("../../x", "a/b", ".hidden", "\u00b2"):
        with pytest.raises(ConfigError, match=r"^pipeline\.model_name: got .*single folder name"):
            configs.load_config(None, [f"pipeline.model_name={name}"])
    assert configs.load_config(None, ["pipeline.model_name=signs-v2.1_x"]).pipeline.model_name == "signs-v2.1_x"
