"""Pusher component whose executor does not push the same model twice.

Re-running the pipeline on unchanged inputs reuses the cached Trainer output,
but the Evaluator runs again (its baseline is now the last blessed model,
which is this very model), and TFX's stock Pusher would copy the identical
SavedModel to a new version folder each time.  TF Serving would then "upgrade"
to a copy of what it already serves.  This executor compares the model with
the newest pushed version and, when they are the same bytes, records that
version as the push instead of making another.

It also writes each version atomically (:func:`model_versions.push_version`):
TFX's stock executor copies straight into ``BASE/<version>/``, where a server
polling at the wrong moment sees a version folder without ``saved_model.pb``.

``Pusher`` is TFX's Pusher with that executor as its ``EXECUTOR_SPEC`` (TFX's
way to customize a component; ``custom_executor_spec`` is deprecated).  Its id
stays "Pusher" and its MLMD type name still ends in ``.Pusher``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Dict, List, Optional

from tfx import types
from tfx.components.pusher import component as pusher_component, executor as pusher_executor
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import io_utils, proto_utils

from visiontune.components import model_versions

log = logging.getLogger(__name__)


def model_digest(model_dir: str) -> str:
    """Hash of ``saved_model.pb`` and the variables: what TF Serving would load."""
    digest = hashlib.sha256()
    paths = [os.path.join(model_dir, "saved_model.pb")]
    variables = os.path.join(model_dir, "variables")
    if fileio.exists(variables):
        paths += sorted(os.path.join(variables, f) for f in fileio.listdir(variables))
    for path in paths:
        if not fileio.exists(path):
            return ""
        with fileio.open(path, "rb") as f:
            digest.update(os.path.basename(path).encode())
            digest.update(f.read())
    return digest.hexdigest()


def latest_version(base_directory: str) -> Optional[str]:
    """The newest version folder's name (ASCII digits only: a folder named ``²`` is not a version)."""
    if not fileio.exists(base_directory):
        return None
    return model_versions.latest_version(fileio.listdir(base_directory))


class Executor(pusher_executor.Executor):
    """TFX's filesystem Pusher, minus duplicate pushes of an unchanged model, with atomic pushes."""

    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        destination = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY],
                                  destination)
        if destination.WhichOneof("destination") != "filesystem" or destination.filesystem.versioning not in (
                pusher_pb2.Versioning.AUTO, pusher_pb2.Versioning.UNIX_TIMESTAMP):
            super().Do(input_dict, output_dict, exec_properties)   # TFX's own handling (and errors)
            return
        self._log_startup(input_dict, output_dict, exec_properties)
        model_push = artifact_utils.get_single_instance(output_dict[standard_component_specs.PUSHED_MODEL_KEY])
        if not self.CheckBlessing(input_dict):
            self._MarkNotPushed(model_push)
            return
        model_path = self.GetModelPath(input_dict)
        base = destination.filesystem.base_directory
        version = latest_version(base)
        if version is not None:
            pushed_dir = os.path.join(base, version)
            if model_digest(model_path) == model_digest(pushed_dir):
                log.info("model is identical to pushed version %s; not pushed again", version)
                self._MarkPushed(model_push, pushed_destination=pushed_dir, pushed_version=version)
                return
        version, serving_path = model_versions.push_version(model_path, base)
        # As TFX does: the pushed model is also archived in the artifact's own folder.
        io_utils.copy_dir(model_path, model_push.uri)
        self._MarkPushed(model_push, pushed_destination=serving_path, pushed_version=version)


class Pusher(pusher_component.Pusher):
    """TFX's Pusher (same spec and arguments) running :class:`Executor`."""

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)
