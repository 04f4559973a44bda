"""Version folders under ``SERVING_DIR/MODEL_NAME/``: which names count, and how a push writes one.

Shared by the Pusher (which writes them), the built-in model server (which
watches them) and the serving benchmark (which pushes the way the Pusher
does).  No TensorFlow at import: the server's poller calls
:func:`version_number` on every scan.

* A version folder's name is ASCII digits only, at most 2**63 - 1 (TF
  Serving's int64).  ``str.isdigit`` also accepts ``²`` or ``٣``, which
  ``int`` then refuses or reads as another number: such a folder, like any
  other name, is not a version and is ignored.
* A push is atomic on a local file system: the model is copied under a
  hidden temporary name in the same folder (never a version name, so no
  server loads it), then renamed to its version number in one step.  A
  server never sees a version folder without ``saved_model.pb``.  On object
  stores (``gs://``), where a rename is a copy, ``saved_model.pb`` is copied
  last instead, which is what TF Serving relies on there.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Iterable, Optional, Tuple

log = logging.getLogger(__name__)

MAX_VERSION = (1 << 63) - 1
# Temporary folders of pushes in progress: hidden, and never a version number.
TEMP_PREFIX = ".visiontune-push-"
SAVED_MODEL_FILE = "saved_model.pb"


def version_number(name: str) -> Optional[int]:
    """The version a folder name stands for, or None when it is not a version folder."""
    name = name.rstrip("/")
    if not (name.isascii() and name.isdecimal()):
        return None
    number = int(name)
    return number if number <= MAX_VERSION else None


def latest_version(names: Iterable[str]) -> Optional[str]:
    """The folder name of the highest version among ``names`` (a listing of the base folder)."""
    versions = {version_number(n): n.rstrip("/") for n in names}
    versions.pop(None, None)
    return versions[max(versions)] if versions else None


def next_version(names: Iterable[str], now: Optional[float] = None) -> int:
    """The Unix time (TFX's versioning), or one more than the latest version if that is not newer.

    TF Serving serves the highest number: a push must always be the highest,
    even with the clock set back or two pushes in one second.
    """
    latest = latest_version(names)
    stamp = int(time.time() if now is None else now)
    return max(stamp, version_number(latest) + 1 if latest is not None else 0)


def _copy_tree(fileio, src: str, dst: str) -> None:
    """Copies ``src`` into ``dst`` with ``saved_model.pb`` last."""
    from tfx.utils import io_utils

    io_utils.copy_dir(src, dst, deny_regex_patterns=[r"saved_model\.pb"])
    graph = os.path.join(src, SAVED_MODEL_FILE)
    if fileio.exists(graph):
        io_utils.copy_file(graph, os.path.join(dst, SAVED_MODEL_FILE))


def push_version(model_dir: str, base_directory: str) -> Tuple[str, str]:
    """Copies the SavedModel ``model_dir`` to a new version under ``base_directory``.

    Returns (version, path).  Local: copied aside, then renamed (atomic).
    Elsewhere: copied in place with ``saved_model.pb`` last.
    """
    from tfx.dsl.io import fileio

    fileio.makedirs(base_directory)
    version = str(next_version(fileio.listdir(base_directory)))
    final = os.path.join(base_directory, version)
    if "://" in base_directory:
        _copy_tree(fileio, model_dir, final)
        return version, final
    temp = os.path.join(base_directory, f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
    try:
        _copy_tree(fileio, model_dir, temp)
        while os.path.exists(final):   # another push took this number while we copied
            version = str(next_version(os.listdir(base_directory)))
            final = os.path.join(base_directory, version)
        os.rename(temp, final)
    finally:
        if os.path.exists(temp):   # only our own temporary copy, after a failed copy or rename
            import shutil

            shutil.rmtree(temp, ignore_errors=True)
    log.info("model written to serving path %s", final)
    return version, final
