"""Finding a dataset's images: which files, with which label, in which split.

Listing runs in the parent process, before any image is opened, and is the
serial part of ingest (the encoding runs in the worker pool, see
``components.shard_writer``).  It only reads folders and CSV files: a file that
cannot be an image of the dataset (outside a class folder, missing from the
disk, listed twice) becomes a reject here, a file that is not a good image is
found later by ``components.image_encoding``.

Two classification input layouts are accepted (the same for the main and the test source):

* a class-per-folder tree, ``source/<class>/**/<image>``, as
  ``tf.keras.utils.image_dataset_from_directory`` expects;
* images listed in CSV files (``data.labels_csv``, a path or glob relative to
  ``source``), each row giving a filename (relative to the CSV's folder, or
  else to ``source``) and a label, as GTSRB ships them.

Segmentation sources hold image/mask pairs instead, paired by
``components.masks.list_pairs``.

Splits are decided by a hash of each file's relative path (or of the group
``data.split_group_regex`` finds in it), so adding images never moves an
existing image between train and eval.  Without ``data.classes`` the classes
are every label found, in natural order ("class2" before "class10").
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import os
import re
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

from visiontune.components import masks
from visiontune.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from visiontune.configs import DataConfig, SegmentationConfig

TRAIN, EVAL, TEST = "train", "eval", "test"


# Defined here, not in ``prepare`` (which re-exports it): listing raises most of
# them and ``shard_writer`` one, and neither may import ``prepare``, which imports both.
class PrepareError(UserError, ValueError):
    """The data source or settings cannot be turned into a dataset at all.

    Problems with single files are not errors: they become rows of
    ``rejects.csv`` so that one bad image does not stop 50,000 good ones.
    """


@dataclasses.dataclass(frozen=True)
class _Item:
    """One candidate image: where to read it and what it will be called."""

    path: str  # as given (source joined with the relative name), used to read and report
    relpath: str  # posix path relative to the source root: hashed and stored as ``filename``
    label: str
    split: str
    mask: str = ""  # segmentation: the mask file paired with the image


# --------------------------------------------------------------------------
# Class order and splits
# --------------------------------------------------------------------------


def natural_key(name: str) -> Tuple:
    """Sort key putting "2" before "10" and "class2" before "class10".

    Digit runs compare as numbers and the rest case-insensitively; the raw
    string breaks ties so that "2" and "02" still have a fixed order.
    """
    parts = re.split(r"([0-9]+)", name)
    return tuple((int(p) if i % 2 else p.casefold()) for i, p in enumerate(parts)), name


def split_fraction(relpath: str) -> float:
    """Where a file falls in [0, 1): a pure function of its relative path.

    Depending on nothing but the path is what keeps existing files in their
    split when files are added or removed around them.
    """
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    # The top 53 of the first 64 bits: exactly representable, so never 1.0.
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0 ** 53


def split_key(relpath: str, group_regex: str = "") -> str:
    """What decides a file's split: its path, or the group a regex finds in it.

    Near-duplicates (several video frames of one physical sign, as GTSRB's
    ``TTTTT_FFFFF.ppm`` tracks) must fall on the same side, or the eval split
    measures memory instead of generalisation.  With ``group_regex`` the
    regex's first group (or whole match) is hashed instead of the path; files
    it does not match keep their own path as the key.
    """
    if group_regex:
        match = re.search(group_regex, relpath)
        if match:
            group = match.group(1) if match.groups() else match.group(0)
            return f"group:{group}"
    return relpath


def segmentation_classes(data: "DataConfig", segmentation: "SegmentationConfig") -> List[str]:
    """Class names of a segmentation dataset: ``data.classes``, else background/foreground."""
    from visiontune.configs import SEGMENTATION_CLASSES
    count = len(segmentation.class_values)
    if data.classes:
        if len(data.classes) != count:
            raise PrepareError(f"data.classes names {len(data.classes)} classes but "
                               f"segmentation.class_values maps {count}")
        return list(data.classes)
    if count != len(SEGMENTATION_CLASSES):
        raise PrepareError(f"segmentation.class_values maps {count} classes: name them in data.classes")
    return list(SEGMENTATION_CLASSES)


# --------------------------------------------------------------------------
# Finding the images
# --------------------------------------------------------------------------


def _collect_items(data: "DataConfig", segmentation: Optional["SegmentationConfig"] = None
                   ) -> Tuple[List[_Item], List[Tuple[str, str]]]:
    """All candidate images with their split, and the files already known to be bad."""
    items: List[_Item] = []
    rejects: List[Tuple[str, str]] = []
    sources = [(data.source, data.labels_csv, None)]
    if data.test_source:
        sources.append((data.test_source, data.test_labels_csv, TEST))
    for source, labels_csv, split in sources:
        if not os.path.isdir(source):
            raise PrepareError(f"{source}: data source folder does not exist"
                               if not os.path.exists(source) else
                               f"{source}: data source is not a folder")
        mask_of: Dict[str, str] = {}
        if segmentation is not None:
            try:
                pairs, bad = masks.list_pairs(source, segmentation.image_dir, segmentation.mask_dir,
                                              segmentation.mask_regex, segmentation.mask_template,
                                              lambda name: not _is_skipped_file(name))
            except FileNotFoundError as e:
                raise PrepareError(str(e)) from None
            found = [(path, relpath, "") for path, relpath, _ in pairs]
            mask_of = {path: mask for path, _, mask in pairs}
        elif labels_csv:
            found, bad = _list_csv_source(source, labels_csv, data)
        else:
            found, bad = _list_tree_source(source)
        rejects.extend(bad)
        for path, relpath, label in found:
            key = split_key(relpath, data.split_group_regex)
            item_split = split or (EVAL if split_fraction(key) < data.eval_fraction else TRAIN)
            items.append(_Item(path, relpath, label, item_split, mask_of.get(path, "")))
    return items, rejects


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_tree_source(source: str) -> Tuple[List[Tuple[str, str, str]], List[Tuple[str, str]]]:
    """(path, relpath, label) for every file under a class-per-folder tree.

    CSV and hidden files are skipped as obviously not images; every other
    file is listed, so a stray ``notes.txt`` shows up as a reject rather than
    vanishing.  Files directly in ``source`` have no class and are rejected.
    """
    found: List[Tuple[str, str, str]] = []
    rejects: List[Tuple[str, str]] = []
    class_dirs = []
    for name in sorted(os.listdir(source)):
        full = os.path.join(source, name)
        if _is_hidden(name):
            continue
        if os.path.isdir(full):
            class_dirs.append(name)
        elif not _is_skipped_file(name):
            rejects.append((full, "not inside a class folder (expected source/<class>/<image>)"))
    if not class_dirs:
        raise PrepareError(f"{source}: no class folders (expected {source}/<class>/<image>); "
                           "set data.labels_csv if the labels are in CSV files")
    paths = _PathResolver(source)
    for label in class_dirs:
        class_root = os.path.join(source, label)
        for path in _walk_files(class_root):
            found.append((path, paths.rel(path), label))
    return found, rejects


class _PathResolver:
    """Paths of listed files, with each folder's part (real path, relative path,
    directory listing) computed once.

    Listing is the serial part of ingest (the encoding runs in the worker pool).
    Resolving, normalising and ``stat``-ing every listed file from the root made
    it a third of a 2-worker GTSRB run; per folder, a listed name costs a set
    lookup and two joins.  Same results as ``os.path.normpath``,
    ``os.path.isfile``, ``os.path.realpath`` and ``os.path.relpath`` per file
    (a linked file is still resolved on its own).
    """

    def __init__(self, source: str):
        self._source = source
        self._rel: Dict[str, str] = {}  # folder -> "" or "a/b/"
        self._listing: Dict[str, Tuple[frozenset, frozenset, str]] = {}  # files, links, real path

    def _rel_prefix(self, folder: str) -> str:
        if folder not in self._rel:
            rel = os.path.relpath(folder or ".", self._source).replace(os.sep, "/")
            self._rel[folder] = "" if rel == "." else rel + "/"
        return self._rel[folder]

    def rel(self, path: str) -> str:
        """The posix path relative to the source (what is hashed and stored as ``filename``)."""
        folder, name = os.path.split(os.path.normpath(path))
        return self._rel_prefix(folder) + name

    def _listed(self, folder: str) -> Tuple[frozenset, frozenset, str]:
        if folder not in self._listing:
            try:
                with os.scandir(folder or ".") as entries:
                    listed = [(e.name, e.is_file(), e.is_symlink()) for e in entries]
            except OSError:
                listed = []
            self._listing[folder] = (frozenset(n for n, is_file, _ in listed if is_file),
                                     frozenset(n for n, _, is_link in listed if is_link),
                                     os.path.realpath(folder or "."))
        return self._listing[folder]

    def find(self, filename: str, bases: Sequence[str]) -> Optional[Tuple[str, str, str]]:
        """(path, real path, relpath) of ``filename`` in the first of ``bases`` holding it as a file."""
        plain = os.sep not in filename and not (os.altsep and os.altsep in filename) \
            and "/" not in filename and filename not in (".", "..")
        for base in bases:
            if plain:  # the common case: no need to normalise the joined path
                folder, name = os.path.normpath(base), filename
                folder = "" if folder == "." else folder
            else:
                folder, name = os.path.split(os.path.normpath(os.path.join(base, filename)))
            files, links, real_folder = self._listed(folder)
            if name in files:
                path = os.path.join(folder, name)
                real = os.path.realpath(path) if name in links else os.path.join(real_folder, name)
                return path, real, self._rel_prefix(folder) + name
        return None


def _is_skipped_file(name: str) -> bool:
    return _is_hidden(name) or name.lower().endswith(".csv")


def _walk_files(root: str) -> Iterator[str]:
    """Files below ``root`` in sorted order, without hidden files and folders.

    Linked folders are followed (datasets are often assembled from links),
    each real folder once, so a link cycle cannot loop forever.
    """
    visited = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        visited.add(os.path.realpath(dirpath))
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d)
                             and os.path.realpath(os.path.join(dirpath, d)) not in visited)
        for name in sorted(filenames):
            if not _is_skipped_file(name):
                yield os.path.join(dirpath, name)


def _list_csv_source(source: str, labels_csv: str, data: "DataConfig"
                     ) -> Tuple[List[Tuple[str, str, str]], List[Tuple[str, str]]]:
    """(path, relpath, label) for every row of every CSV matching ``labels_csv``."""
    pattern = labels_csv if os.path.isabs(labels_csv) else os.path.join(source, labels_csv)
    csv_paths = sorted(glob.glob(pattern))
    if not csv_paths:
        raise PrepareError(f"{pattern}: no labels CSV matches (data.labels_csv={labels_csv!r}, "
                           f"relative to {source})")
    found: List[Tuple[str, str, str]] = []
    rejects: List[Tuple[str, str]] = []
    seen: Dict[str, Tuple[str, str]] = {}  # real path -> (csv, label) of its first row
    paths = _PathResolver(source)
    for csv_path in csv_paths:
        for filename, label, line in _read_label_rows(csv_path, data):
            where = f"{csv_path} line {line}"
            if not filename:
                rejects.append((csv_path, f"{where}: empty {data.filename_column}"))
                continue
            # Next to the CSV first (GTSRB train), else under ``source``.
            found_at = paths.find(filename, (os.path.dirname(csv_path), source))
            if found_at is None:
                rejects.append((os.path.join(os.path.dirname(csv_path), filename),
                                f"file listed in {where} not found (looked next to the CSV "
                                f"and in {source})"))
                continue
            path, key, relpath = found_at
            if not label or "\n" in label or "\r" in label:
                rejects.append((path, f"{where}: label {label!r} is empty or not a single line"))
                continue
            if key in seen:
                first_csv, first_label = seen[key]
                rejects.append((path, f"listed again in {where} (first listed in {first_csv}"
                                      + (f" with label {first_label!r})" if first_label != label
                                         else ")")))
                continue
            seen[key] = (csv_path, label)
            found.append((path, relpath, label))
    return found, rejects


def _read_label_rows(csv_path: str, data: "DataConfig") -> Iterator[Tuple[str, str, int]]:
    """(filename, label, line number) per data row; names the columns it has if one is missing."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=data.csv_delimiter)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in (data.filename_column, data.label_column) if c not in header]
        if missing:
            raise PrepareError(
                f"{csv_path}: no column {', '.join(repr(c) for c in missing)}; its columns are "
                f"{header!r} (delimiter {data.csv_delimiter!r}; see data.filename_column, "
                "data.label_column, data.csv_delimiter)")
        fi, li = header.index(data.filename_column), header.index(data.label_column)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            cells = row + [""] * (max(fi, li) + 1 - len(row))
            yield cells[fi].strip(), cells[li].strip(), reader.line_num


def _choose_classes(data: "DataConfig", items: Sequence[_Item]) -> List[str]:
    """The given class list, else every label found, sorted naturally."""
    if data.classes:
        return list(data.classes)
    return sorted({item.label for item in items}, key=natural_key)


def _drop_unknown_labels(items: List[_Item], classes: Sequence[str], explicit: bool
                         ) -> Tuple[List[_Item], List[Tuple[str, str]]]:
    if not explicit:
        return items, []
    known = set(classes)
    kept = [i for i in items if i.label in known]
    rejects = [(i.path, f"label {i.label!r} is not in data.classes") for i in items
               if i.label not in known]
    return kept, rejects
