"""What the built-in server's poller sees in a base path: version folders, and whether each has settled.

A version folder counts once ``saved_model.pb`` is there and its files have
not changed since the previous scan (:func:`fingerprint`), so a copy still in
progress is never loaded.  At start-up there is no previous scan: a folder
whose files are all older than a few seconds counts as settled (:func:`is_old`).
"""

from __future__ import annotations

import os
import time
from typing import Dict, Tuple

from visiontune.components import model_versions


def versions_on_disk(base_path: str) -> Dict[int, str]:
    """{version: folder} of the version folders under ``base_path`` (none when it does not exist)."""
    try:
        names = os.listdir(base_path)
    except FileNotFoundError:
        return {}
    found = {}
    for name in names:
        version = model_versions.version_number(name)
        path = os.path.join(base_path, name)
        # "007" and "7" are the same version to TF Serving too; the first listed wins.
        if version is not None and version not in found and os.path.isdir(path):
            found[version] = path
    return found


def fingerprint(path: str) -> Tuple:
    """(relative path, size, mtime) of every file: changes while a copy is in progress."""
    entries = []
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def is_old(fp: Tuple, seconds: float = 2.0) -> bool:
    """At start-up there is no previous scan: files untouched for a while count as settled."""
    newest = max((mtime for _, _, mtime in fp), default=0)
    return time.time() - newest / 1e9 > seconds
