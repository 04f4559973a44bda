"""Running the real TF Serving (``tensorflow_model_server``, or ``docker run tensorflow/serving``) on pushed models.

``visiontune serve`` hands over to it when it is on PATH, with a ``--model_config_file``: the user's own
(passed on as it is), or one built from ``--model-base-path`` as a ``ModelServerConfig`` message
(model_config.py) with the version policy the built-in server has.  ``visiontune serve --write-config``
writes that file for a container and prints the ``docker run`` line that serves it.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from typing import Dict, Optional, Sequence, Tuple

from visiontune.serving import model_config

TF_SERVING_BINARY = "tensorflow_model_server"
DOCKER_IMAGE = "tensorflow/serving"


def tf_serving_config(name: str, base_path: str, num_versions: int) -> str:
    """A ``--model_config_file`` (text proto) with the version policy the built-in server has."""
    return model_config.to_text(model_config.build([model_config.single_model(name, base_path, num_versions)]))


def tf_serving_command(binary: str, name: str, base_path: str, *, grpc_port: int, rest_port: int,
                       num_versions: int, poll_seconds: float, config_file: Optional[str] = None,
                       extra: Sequence[str] = ()) -> list:
    """The ``tensorflow_model_server`` command line.

    ``config_file``: the user's ``--model_config_file``; without one, a config
    for ``name`` at ``base_path`` is written to a temp folder.  ``extra``: TF
    Serving flags passed on as they are (``--allow_version_labels_for_unavailable_models``).
    """
    if config_file is None:
        config_file = os.path.join(tempfile.mkdtemp(prefix="visiontune-serving-"), "models.config")
        model_config.write(model_config.build([model_config.single_model(name, base_path, num_versions)]),
                           config_file)
    return [binary, f"--port={grpc_port}", f"--rest_api_port={rest_port}",
            f"--model_config_file={os.path.abspath(config_file)}",
            f"--file_system_poll_wait_seconds={max(1, round(poll_seconds))}", *extra]


def container_paths(specs: Sequence[model_config.ModelSpec], root: str) -> Dict[str, str]:
    """{model name: its base path in a container where the models' common folder is mounted at ``root``}.

    Raises ``ValueError`` when the models live in several folders (one mount cannot hold them).
    """
    specs = [spec for spec in specs if not model_config.is_uri(spec.base_path)]   # gs:// stays as it is
    folders = sorted({os.path.dirname(spec.base_path.rstrip("/")) for spec in specs})
    if len(folders) > 1:
        raise ValueError(f"the models live in several folders ({', '.join(folders)}), so no one folder mounted "
                         f"at {root} holds them")
    return {spec.name: f"{root.rstrip('/')}/{os.path.basename(spec.base_path.rstrip('/'))}" for spec in specs}


def docker_command(specs: Sequence[model_config.ModelSpec], config_file: str, *, root: Optional[str] = None,
                   file_flags: Sequence[Tuple[str, str]] = (), flags: Sequence[str] = (), grpc_port: int = 8500,
                   rest_port: int = 8501) -> str:
    """The ``docker run tensorflow/serving`` line that serves ``config_file`` (written for ``specs``).

    Without ``root`` the config holds the host's paths, and each folder is mounted at
    the same path in the container; with ``root`` (the config written with
    ``container_paths``) the models' folder is mounted there, and the config file's
    folder, when it is another one, at ``/config``.  ``file_flags``: TF Serving flags
    that name another file, ``("--batching_parameters_file", path)``, mounted the
    same way; ``flags``: other flags (``--enable_batching``), passed on as they are.
    """
    mounts: Dict[str, str] = {}   # host folder -> container folder
    specs = [spec for spec in specs if not model_config.is_uri(spec.base_path)]   # TF Serving reads gs:// itself
    if root:
        container_paths(specs, root)   # raises when one mount cannot hold them
        for spec in specs[:1]:
            mounts[os.path.dirname(spec.base_path.rstrip("/"))] = root.rstrip("/")
    else:
        for spec in specs:
            folder = os.path.dirname(spec.base_path.rstrip("/"))
            mounts[folder] = folder

    def inside(path: str) -> str:
        folder = os.path.dirname(os.path.abspath(path))
        taken = set(mounts.values())
        target = mounts.setdefault(folder, folder if not root else next(
            f"/config{i or ''}" for i in range(len(mounts) + 1) if f"/config{i or ''}" not in taken))
        return f"{target}/{os.path.basename(path)}"

    args = [f"--model_config_file={inside(config_file)}", *flags]
    args += [f"{flag}={inside(path)}" for flag, path in file_flags]
    words = ["docker", "run", "--rm", "-p", f"{grpc_port}:8500", "-p", f"{rest_port}:8501"]
    for host, target in mounts.items():
        words += ["--mount", f"type=bind,source={host},target={target}"]
    return " ".join(shlex.quote(w) for w in words + [DOCKER_IMAGE, *args])
