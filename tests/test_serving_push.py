"""Version folders: which names the server and the Pusher count, and atomic pushes (issue 14 items 2-3).

The Pusher's real executor runs on real TFX artifacts and the shared tiny
export; the server is the built-in one on loopback.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from tests.test_serving import MODEL, copy_version, start_builtin
from visiontune.components import model_versions

# Names a hostile or careless user leaves in the base path: none is a version.
NOT_VERSIONS = ["\u00b2", "\u0663", "1\u00b2", "99999999999999999999", "-1", "+3", " 4", "v5", "",
                ".visiontune-push-7-abc", "007a"]


@pytest.fixture(scope="module")
def model_dir(exported_model):
    return exported_model.serving_model_dir


@pytest.mark.parametrize("name, number", [("1", 1), ("007", 7), ("1796278489", 1796278489),
                                          (str(model_versions.MAX_VERSION), model_versions.MAX_VERSION),
                                          ("12/", 12)] + [(n, None) for n in NOT_VERSIONS])
def test_version_folder_names_are_ascii_digits_within_int64(name, number):
    assert model_versions.version_number(name) == number


def test_next_version_is_always_above_the_latest():
    assert model_versions.next_version(["\u00b2", "5"], now=1000) == 1000
    assert model_versions.next_version(["\u00b2", "5000"], now=1000) == 5001   # clock behind the last push
    assert model_versions.next_version([], now=1000.7) == 1000


def _pusher_inputs(tmp_path, model_dir, base):
    from google.protobuf import json_format
    from tfx.proto import pusher_pb2
    from tfx.types import standard_artifacts

    model = standard_artifacts.Model()
    model.uri = str(tmp_path / "trainer_model")
    shutil.copytree(model_dir, os.path.join(model.uri, "Format-Serving"))
    blessing = standard_artifacts.ModelBlessing()
    blessing.uri = str(tmp_path / "blessing")
    blessing.set_int_custom_property("blessed", 1)
    destination = pusher_pb2.PushDestination(
        filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=base))
    properties = {"push_destination": json_format.MessageToJson(destination)}

    def outputs(i):
        pushed = standard_artifacts.PushedModel()
        pushed.uri = str(tmp_path / f"pushed_{i}")
        return {"pushed_model": [pushed]}

    return {"model": [model], "model_blessing": [blessing]}, outputs, properties


def test_pusher_pushes_atomically_and_ignores_folders_that_are_no_versions(model_dir, tmp_path):
    """The server never sees a version folder without saved_model.pb; ² and friends crash nothing."""
    from visiontune.components.pusher import Executor

    base = str(tmp_path / "serving" / MODEL)
    for name in NOT_VERSIONS[:4]:
        os.makedirs(os.path.join(base, name))
    inputs, outputs, properties = _pusher_inputs(tmp_path, model_dir, base)

    seen, incomplete, done = set(), [], threading.Event()

    def watch():   # what a polling server would see, as often as it can look
        while not done.is_set():
            for name in os.listdir(base):
                if model_versions.version_number(name) is not None:
                    seen.add(name)
                    if not os.path.exists(os.path.join(base, name, "saved_model.pb")):
                        incomplete.append(name)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        first = outputs(1)
        Executor().Do(inputs, first, properties)
    finally:
        done.set()
        watcher.join()
    pushed = first["pushed_model"][0]
    version = pushed.get_string_custom_property("pushed_version")
    assert pushed.get_int_custom_property("pushed") == 1
    assert seen == {version} and not incomplete
    assert sorted(os.listdir(base)) == sorted(NOT_VERSIONS[:4] + [version])   # no temp folder left
    assert os.path.exists(os.path.join(base, version, "variables", "variables.index"))

    # The same model again: recorded as that version, nothing copied.
    again = outputs(2)
    Executor().Do(inputs, again, properties)
    assert again["pushed_model"][0].get_string_custom_property("pushed_version") == version
    assert sorted(os.listdir(base)) == sorted(NOT_VERSIONS[:4] + [version])


def test_server_ignores_folders_that_are_no_versions_and_loads_a_push(model_dir, tmp_path):
    base = str(tmp_path / MODEL)
    copy_version(model_dir, os.path.join(base, "1"))
    for name in filter(None, NOT_VERSIONS):
        # Models under names that are no version: never loaded, never a crash (three complete ones).
        copy_version(model_dir, os.path.join(base, name), with_graph=name in NOT_VERSIONS[:2] + NOT_VERSIONS[-2:-1])
    server = start_builtin(base)
    try:
        server.wait_available(1)
        version, path = model_versions.push_version(model_dir, base)
        server.wait_available(int(version))
        assert set(server.versions()) == {1, int(version)}
        assert os.path.basename(path) == version and not [n for n in os.listdir(base)
                                                           if n.startswith(model_versions.TEMP_PREFIX + version)]
    finally:
        server.stop()
