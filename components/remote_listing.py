"""Listing sources on a filesystem TensorFlow knows by URL (``gs://``, ``s3://``, ``ram://``...).

The same layouts and rules as ``image_listing`` (class folders, CSV label
lists with files next to the CSV or under the source, hidden names counted,
CSV files skipped, stray files and missing or repeated rows rejected with a
reason), through ``tf.io.gfile``.  Object stores have no links, so none of the
local listing's link rules apply; a listed name outside the source is refused
as it is locally.  Folders are listed once each: one request per folder, not
one per file.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Dict, FrozenSet, List, Tuple

from visiontune.components import image_listing
from visiontune.components.image_listing import Hidden, PrepareError

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from visiontune.configs import DataConfig

Found = List[Tuple[str, str, str]]  # (path, relpath, label)
Rejects = List[Tuple[str, str]]


def is_url(path: str) -> bool:
    return "://" in path


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def check_folder(source: str) -> None:
    gfile = _gfile()
    if not gfile.isdir(source):
        raise PrepareError(f"{source}: data source is not a folder" if gfile.exists(source)
                           else f"{source}: data source folder does not exist")


def _entries(folder: str) -> Tuple[List[str], List[str]]:
    """(file names, folder names) of ``folder``, sorted."""
    gfile = _gfile()
    files, folders = [], []
    for name in sorted(n.rstrip("/") for n in gfile.listdir(folder)):
        (folders if gfile.isdir(posixpath.join(folder, name)) else files).append(name)
    return files, folders


def list_tree(source: str, hidden: Hidden) -> Tuple[Found, Rejects]:
    """(path, relpath, label) for every file under a class-per-folder tree at a URL."""
    source = source.rstrip("/")
    files, folders = _entries(source)
    rejects: Rejects = []
    class_dirs = []
    for name in folders:
        if image_listing._is_hidden(name):
            hidden.count(True)
            continue
        problem = image_listing.label_problem(name)
        if problem:
            raise PrepareError(f"{source}/{name}: class folder name {name!r} {problem}")
        class_dirs.append(name)
    for name in files:
        if image_listing._is_hidden(name):
            hidden.count(False)
        elif not image_listing._is_skipped_file(name):
            rejects.append((f"{source}/{name}", "not inside a class folder (expected source/<class>/<image>)"))
    if not class_dirs:
        raise PrepareError(f"{source}: no class folders (expected {source}/<class>/<image>); "
                           "set data.labels_csv if the labels are in CSV files")
    image_listing.check_distinct_labels(class_dirs, "class folders")
    found: Found = []
    for label in class_dirs:
        pending = [f"{source}/{label}"]
        while pending:  # top-down, files before subfolders, as the local listing
            folder = pending.pop(0)
            names, subfolders = _entries(folder)
            for name in names:
                if image_listing._is_hidden(name):
                    hidden.count(False)
                elif not image_listing._is_skipped_file(name):
                    path = f"{folder}/{name}"
                    found.append((path, path[len(source) + 1:], label))
            for name in subfolders:
                if image_listing._is_hidden(name):
                    hidden.count(True)
                else:
                    pending.append(f"{folder}/{name}")
    return found, rejects


def list_csv(source: str, labels_csv: str, data: "DataConfig") -> Tuple[Found, Rejects]:
    """(path, relpath, label) for every row of every CSV matching ``labels_csv`` at a URL."""
    gfile = _gfile()
    source = source.rstrip("/")
    pattern = _scheme_normpath(labels_csv if is_url(labels_csv) else posixpath.join(source, labels_csv))
    csv_paths = sorted(gfile.glob(pattern))
    if not csv_paths:
        raise PrepareError(f"{pattern}: no labels CSV matches (data.labels_csv={labels_csv!r}, "
                           f"relative to {source})")
    listings: Dict[str, FrozenSet[str]] = {}

    def files_in(folder: str) -> FrozenSet[str]:
        if folder not in listings:
            try:
                listings[folder] = frozenset(_entries(folder)[0])
            except Exception:  # noqa: BLE001 - NotFoundError: nothing there
                listings[folder] = frozenset()
        return listings[folder]

    found: Found = []
    rejects: Rejects = []
    seen: Dict[str, Tuple[str, str]] = {}
    for csv_path in csv_paths:
        with gfile.GFile(csv_path, "rb") as f:
            text = image_listing.decode_csv(csv_path, f.read())
        for filename, label, line in image_listing._read_label_rows(csv_path, data, text):
            where = f"{csv_path} line {line}"
            if not filename:
                rejects.append((csv_path, f"{where}: empty {data.filename_column}"))
                continue
            candidates = [_scheme_normpath(posixpath.join(base, filename))
                          for base in (posixpath.dirname(csv_path), source)]
            inside = [c for c in candidates if c.startswith(source + "/")]
            if not inside:
                rejects.append((candidates[0], f"{data.filename_column} {filename!r} in {where} is outside "
                                               f"the source folder {source}: refused"))
                continue
            path = next((c for c in inside if posixpath.basename(c) in files_in(posixpath.dirname(c))), None)
            if path is None:
                rejects.append((candidates[0], f"file listed in {where} not found (looked "
                                               f"{'next to the CSV and ' if len(inside) > 1 else ''}in {source})"))
                continue
            problem = image_listing.row_problem(label, where, seen.get(path))
            if problem:
                rejects.append((path, problem))
                continue
            seen[path] = (csv_path, label)
            found.append((path, path[len(source) + 1:], label))
    return found, rejects


def _scheme_normpath(url: str) -> str:
    """``posixpath.normpath`` of the part after ``scheme://`` (``..`` resolved, ``//`` kept in the scheme)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{posixpath.normpath(rest)}"


class UrlFolders:
    """``masks.list_pairs``'s folder operations at a URL (segmentation image/mask pairs)."""

    @staticmethod
    def join(folder: str, name: str) -> str:
        return f"{folder.rstrip('/')}/{name}"

    @staticmethod
    def isdir(path: str) -> bool:
        return _gfile().isdir(path)

    @staticmethod
    def isfile(path: str) -> bool:
        gfile = _gfile()
        return gfile.exists(path) and not gfile.isdir(path)

    @staticmethod
    def listdir(folder: str) -> List[str]:
        return sorted(n.rstrip("/") for n in _gfile().listdir(folder))

    @staticmethod
    def relpath(path: str, source: str) -> str:
        return path[len(source.rstrip("/")) + 1:]

    normpath = staticmethod(_scheme_normpath)
