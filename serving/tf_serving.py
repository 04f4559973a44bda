"""Running the real TF Serving (``tensorflow_model_server``) on a pushed model.

``visiontune serve`` hands over to it when it is on PATH, with a
``--model_config_file`` that gives it the same version policy as the built-in
server.
"""

from __future__ import annotations

import json
import os
import tempfile

TF_SERVING_BINARY = "tensorflow_model_server"


def tf_serving_config(name: str, base_path: str, num_versions: int) -> str:
    """A ``--model_config_file`` (text proto) with the version policy the built-in server has."""
    return ("model_config_list {\n  config {\n"
            f"    name: {json.dumps(name)}\n    base_path: {json.dumps(os.path.abspath(base_path))}\n"
            '    model_platform: "tensorflow"\n'
            f"    model_version_policy {{ latest {{ num_versions: {num_versions} }} }}\n"
            "  }\n}\n")


def tf_serving_command(binary: str, name: str, base_path: str, *, grpc_port: int, rest_port: int,
                       num_versions: int, poll_seconds: float) -> list:
    """The ``tensorflow_model_server`` command line, its config file written to a temp folder."""
    config_dir = tempfile.mkdtemp(prefix="visiontune-serving-")
    config = os.path.join(config_dir, "models.config")
    with open(config, "w") as f:
        f.write(tf_serving_config(name, base_path, num_versions))
    return [binary, f"--port={grpc_port}", f"--rest_api_port={rest_port}",
            f"--model_config_file={config}",
            f"--file_system_poll_wait_seconds={max(1, round(poll_seconds))}"]
