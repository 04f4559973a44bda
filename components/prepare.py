"""Turns a folder of labelled images into sharded TFRecords for ImportExampleGen.

Why a separate step before the pipeline rather than a custom ExampleGen:

* The pipeline's Transform and Trainer only ever see bytes TensorFlow can
  decode (PNG or JPEG).  Formats TF cannot read (GTSRB's PPM, BMP, TIFF,
  WebP, CMYK JPEG) and images whose pixels are not plain RGB (alpha, palette,
  grayscale, 16 bit, EXIF rotation) are normalised here, once, with Pillow.
* Broken files are found here and listed in ``rejects.csv`` with a reason,
  instead of killing a Beam job halfway through training data.
* Splits are decided by a hash of each file's relative path, so adding images
  never moves an existing image between train and eval, and identical inputs
  give byte-identical shards: TFX's cache keys on input fingerprints, so a
  re-run of prepare on unchanged data must not invalidate the whole pipeline.

For ``task: segmentation`` the input is image/mask pairs instead
(``SOURCE/x/in000685.jpg`` with ``SOURCE/y/gt000685.png``; see ``components.masks``):
examples carry a lossless single-channel PNG ``mask`` and no label, and the
per-class counts are the number of images in which each class appears.

Two classification input layouts are accepted (the same for the main and the test source):

* a class-per-folder tree, ``source/<class>/**/<image>``, as
  ``tf.keras.utils.image_dataset_from_directory`` expects;
* images listed in CSV files (``data.labels_csv``, a path or glob relative to
  ``source``), each row giving a filename (relative to the CSV's folder, or
  else to ``source``) and a label, as GTSRB ships them.

The heavy part (decode, check, re-encode, serialise) runs in worker processes
that import only Pillow; they return serialised ``tf.train.Example`` bytes and
the parent, the only process that imports TensorFlow, writes the shards.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import csv
import dataclasses
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from visiontune import features
from visiontune.components import masks
from visiontune.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from visiontune.configs import DataConfig, SegmentationConfig

TRAIN, EVAL, TEST = "train", "eval", "test"
SHARD_PREFIX = "images"

# Items per task sent to a worker: big enough to amortise pickling, small
# enough that the progress bar moves and the work spreads evenly.
_MAX_CHUNK = 64
# Tasks in flight per worker: bounds the serialised images held in memory
# while one slow chunk blocks the ordered write.
_TASKS_PER_WORKER = 4
_EXIF_ORIENTATION = 0x0112
# EXIF orientations other than "upright" (1); other values are invalid and ignored.
_ROTATED = range(2, 9)
_SUMMARY_REJECTS_SHOWN = 5


class PrepareError(UserError, ValueError):
    """The data source or settings cannot be turned into a dataset at all.

    Problems with single files are not errors: they become rows of
    ``rejects.csv`` so that one bad image does not stop 50,000 good ones.
    """


@dataclasses.dataclass
class PrepareResult:
    """What ``prepare_dataset`` wrote, for the CLI to print and tests to check."""

    output_dir: str
    classes: List[str]
    # split -> class -> number of examples written, classes in ``classes`` order.
    counts: Dict[str, Dict[str, int]]
    # (file as given, reason) for every file that was not written.
    rejects: List[Tuple[str, str]]
    # Segmentation: ``counts`` are images in which each class appears, and these
    # are the images per split (classification: the sum of ``counts``).
    totals: Dict[str, int] = dataclasses.field(default_factory=dict)
    task: str = "classification"

    def summary(self) -> str:
        """A table a person reads after a run to see that nothing went missing."""
        splits = list(self.counts)
        width = max([len("class")] + [len(c) for c in self.classes])
        lines = [f"Prepared dataset in {self.output_dir}: {len(self.classes)} classes",
                 "  " + "class".ljust(width) + "".join(f"{s:>9}" for s in splits)]
        for name in self.classes:
            lines.append("  " + name.ljust(width)
                         + "".join(f"{self.counts[s].get(name, 0):>9}" for s in splits))
        totals = self.totals or {s: sum(self.counts[s].values()) for s in splits}
        lines.append("  " + ("images" if self.task == "segmentation" else "total").ljust(width)
                     + "".join(f"{totals.get(s, 0):>9}" for s in splits))
        if self.task == "segmentation":
            lines.append("  (per class: images whose mask has pixels of that class)")
        empty = [c for c in self.classes if not self.counts.get(TRAIN, {}).get(c)]
        if empty:
            lines.append(f"WARNING: {len(empty)} class(es) have no training images: "
                         + ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
        lines.append(f"Rejected files: {len(self.rejects)}"
                     + (f" (see {os.path.join(self.output_dir, features.REJECTS_FILE)})" if self.rejects else ""))
        for path, reason in self.rejects[:_SUMMARY_REJECTS_SHOWN]:
            lines.append(f"  {path}: {reason}")
        if len(self.rejects) > _SUMMARY_REJECTS_SHOWN:
            lines.append(f"  ... and {len(self.rejects) - _SUMMARY_REJECTS_SHOWN} more")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Item:
    """One candidate image: where to read it and what it will be called."""

    path: str  # as given (source joined with the relative name), used to read and report
    relpath: str  # posix path relative to the source root: hashed and stored as ``filename``
    label: str
    split: str
    mask: str = ""  # segmentation: the mask file paired with the image


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def prepare_dataset(data: "DataConfig", output_dir: Optional[str] = None,
                    progress: bool = True,
                    segmentation: Optional["SegmentationConfig"] = None) -> PrepareResult:
    """Converts ``data.source`` (and ``data.test_source``) into TFRecord shards.

    With ``segmentation`` (``task: segmentation``) the sources hold image/mask pairs.

    The output folder is built under a temporary name next to ``output_dir``
    and renamed into place at the end, so a killed run never leaves a folder
    that looks like a finished dataset, and a re-run replaces the old one.
    """
    output_dir = output_dir or data.prepared_dir
    if not output_dir:
        raise PrepareError("no output folder: set data.prepared_dir or pass output_dir")
    _check_settings(data, segmentation)
    items, rejects = _collect_items(data, segmentation)
    if segmentation is not None:
        classes = segmentation_classes(data, segmentation)
    else:
        classes = _choose_classes(data, items)
        items, label_rejects = _drop_unknown_labels(items, classes, explicit=bool(data.classes))
        rejects.extend(label_rejects)
    if not items:
        raise PrepareError(_no_images_message(data, rejects))
    _check_output_dir(output_dir, data)

    splits = [TRAIN, EVAL] + ([TEST] if data.test_source else [])
    counts = {s: {c: 0 for c in classes} for s in splits}
    totals = {s: 0 for s in splits}
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.tmp-",
                               dir=parent)
    try:
        encode_rejects = _write_shards(tmp_dir, items, splits, data, counts, progress, classes,
                                       segmentation, totals)
        rejects.extend(encode_rejects)
        task = "segmentation" if segmentation is not None else "classification"
        _write_metadata(tmp_dir, classes, counts, rejects, settings_fingerprint(data, segmentation),
                        totals, task)
        _replace_dir(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return PrepareResult(output_dir=output_dir, classes=classes, counts=counts, rejects=rejects,
                         totals=totals, task=task)


def read_classes(prepared_dir: str) -> List[str]:
    """The class order every later step must use: label index i is line i."""
    path = os.path.join(prepared_dir, features.CLASSES_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.rstrip("\r\n")]
    except FileNotFoundError:
        raise PrepareError(f"{path}: no class list; run `visiontune prepare` first") from None


def settings_fingerprint(data: "DataConfig", segmentation: Optional["SegmentationConfig"] = None) -> str:
    """Hash of the settings that decide a dataset's content (not where or how fast)."""
    values = dataclasses.asdict(data)
    for key in ("prepared_dir", "workers"):
        values.pop(key, None)
    if segmentation is not None:
        seg = dataclasses.asdict(segmentation)
        values["segmentation"] = {k: seg[k] for k in (
            "image_dir", "mask_dir", "mask_regex", "mask_template", "class_values", "void_values")}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def is_prepared(prepared_dir: str, data: Optional["DataConfig"] = None,
                segmentation: Optional["SegmentationConfig"] = None) -> bool:
    """Whether ``prepared_dir`` holds a finished dataset (the summary is written last).

    With ``data``, also whether it was prepared with these settings: a changed
    ``eval_fraction`` or source must not silently reuse the old split.
    """
    path = os.path.join(prepared_dir, features.SUMMARY_FILE)
    if not os.path.isfile(path):
        return False
    if data is None:
        return True
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("settings") == settings_fingerprint(data, segmentation)


def load_result(prepared_dir: str) -> PrepareResult:
    """The ``PrepareResult`` of an earlier ``prepare_dataset`` into ``prepared_dir``."""
    with open(os.path.join(prepared_dir, features.SUMMARY_FILE), encoding="utf-8") as f:
        summary = json.load(f)
    rejects: List[Tuple[str, str]] = []
    rejects_path = os.path.join(prepared_dir, features.REJECTS_FILE)
    if os.path.exists(rejects_path):
        with open(rejects_path, encoding="utf-8", newline="") as f:
            rejects = [(row["file"], row["reason"]) for row in csv.DictReader(f)]
    return PrepareResult(output_dir=prepared_dir, classes=read_classes(prepared_dir),
                         counts=summary["counts"], rejects=rejects, totals=summary.get("totals", {}),
                         task=summary.get("task", "classification"))


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


def shard_index(relpath: str, num_shards: int) -> int:
    """The shard of a file, from hash bytes independent of those that pick the split."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[8:16], "big") % num_shards


# --------------------------------------------------------------------------
# Finding the images
# --------------------------------------------------------------------------


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


def _check_settings(data: "DataConfig", segmentation: Optional["SegmentationConfig"] = None) -> None:
    """Fails before any work on settings that would fail late or silently."""
    if segmentation is not None:
        problems = masks.check_class_values(segmentation.class_values, segmentation.void_values)
        if problems:
            raise PrepareError("; ".join(problems))
        try:
            re.compile(segmentation.mask_regex)
        except re.error as e:
            raise PrepareError(f"segmentation.mask_regex {segmentation.mask_regex!r}: {e}") from None
    if not data.source:
        raise PrepareError("data.source is not set: point it at the image folder")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise PrepareError(f"data.eval_fraction: {data.eval_fraction} is not in [0, 1)")
    if data.num_shards < 1:
        raise PrepareError(f"data.num_shards: {data.num_shards} must be at least 1")
    if data.test_labels_csv and not data.test_source:
        raise PrepareError("data.test_labels_csv is set but data.test_source is not: "
                           "the test CSV's filenames need a source folder")
    duplicates = sorted({c for c in data.classes if data.classes.count(c) > 1})
    if duplicates:
        raise PrepareError(f"data.classes lists {', '.join(duplicates)} more than once")
    bad = [c for c in data.classes if not c or "\n" in c or "\r" in c]
    if bad:
        raise PrepareError(f"data.classes: class names must be non-empty single lines, got {bad!r}")


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


def _no_images_message(data: "DataConfig", rejects: Sequence[Tuple[str, str]]) -> str:
    where = data.source + (f" and {data.test_source}" if data.test_source else "")
    message = f"{where}: no images found"
    if rejects:
        message += (f"; {len(rejects)} file(s) rejected, first: "
                    f"{rejects[0][0]}: {rejects[0][1]}")
    return message


def _check_output_dir(output_dir: str, data: "DataConfig") -> None:
    """Refuses output folders whose replacement would delete or re-read the inputs."""
    out = os.path.realpath(output_dir)
    for source, labels_csv in ((data.source, data.labels_csv),
                               (data.test_source, data.test_labels_csv)):
        if not source:
            continue
        src = os.path.realpath(source)
        if src == out or src.startswith(out + os.sep):
            raise PrepareError(f"{output_dir}: output folder contains the data source {source}; "
                               "replacing it would delete the images")
        if not labels_csv and out.startswith(src + os.sep):
            raise PrepareError(f"{output_dir}: output folder is inside the class folder tree "
                               f"{source}; the next run would read it as images")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not (
            os.path.exists(os.path.join(output_dir, features.SUMMARY_FILE))
            or os.path.exists(os.path.join(output_dir, features.CLASSES_FILE))):
        raise PrepareError(f"{output_dir}: exists and is not a prepared dataset (no {features.SUMMARY_FILE}); "
                           "refusing to replace it")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise PrepareError(f"{output_dir}: exists and is not a folder")


# --------------------------------------------------------------------------
# Decoding and encoding (runs in worker processes: Pillow only, no TensorFlow)
# --------------------------------------------------------------------------


class ImageRejected(Exception):
    """A file that cannot go into the dataset; the message is the reason."""


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Pillow settings for checking, restored afterwards.

    Truncated images must raise (Pillow's LOAD_TRUNCATED_IMAGES would pad them
    with grey), and Pillow's own decompression-bomb limit is lifted because
    ``max_pixels`` is checked from the header instead, with a clearer reason.
    """
    from PIL import Image, ImageFile
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/metadata chatter; real problems raise
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _read_checked(path: str, max_file_bytes: int) -> bytes:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageRejected(f"cannot read file: {e.strerror}") from None
    if size == 0:
        raise ImageRejected("empty file (0 bytes)")
    if size > max_file_bytes:
        raise ImageRejected(f"file too large: {size} bytes > data.max_file_bytes={max_file_bytes}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageRejected(f"cannot read file: {e.strerror}") from None


def _open_checked(raw: bytes, max_pixels: int):
    """Opens and fully decodes, checking the pixel count from the header first."""
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise ImageRejected("not an image (Pillow cannot identify the file format)") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad headers
        raise ImageRejected(f"corrupt image header: {_describe(e)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(f"image too large: {width}x{height} = {width * height} pixels > "
                      f"data.max_pixels={max_pixels}")
    if width == 0 or height == 0:
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, struct.error, EOFError ...
        message = _describe(e)
        kind = "truncated image" if "truncat" in message.lower() else "corrupt image"
        raise ImageRejected(f"{kind}: {message}") from None
    return img


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__


def _orientation(img) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject a good image
        return 1


def _keeps_original_bytes(img) -> bool:
    """Whether TF already decodes the file to the right RGB pixels, upright.

    Keeping those bytes avoids a lossy JPEG re-encode and keeps the dataset
    small; everything else is normalised to a lossless PNG.
    """
    if img.mode != "RGB" or _orientation(img) in _ROTATED or "transparency" in img.info:
        return False
    return img.format in ("JPEG", "MPO", "PNG")


def _to_rgb(img):
    """RGB pixels: transparency composited onto white, 16-bit scaled to 8-bit."""
    from PIL import Image
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    return img.convert("RGB")


def _high_depth_to_rgb(img):
    """16-bit (or 32-bit) grayscale to 8-bit: Pillow's convert would clip at 255."""
    import numpy as np
    from PIL import Image
    pixels = np.asarray(img.convert("I") if img.mode != "F" else img, dtype=np.float64)
    if img.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels / 257.0  # 65535 -> 255
    gray = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def encode_image(path: str, max_file_bytes: int, max_pixels: int) -> Tuple[bytes, str, int, int]:
    """(encoded bytes, "png"/"jpeg", height, width) of an image fit for TF.

    Serving clients call this too, so a model sees the same pixels in production
    as in training.  Raises ``ImageRejected`` with the reason for a bad file.
    """
    from PIL import ImageOps
    raw = _read_checked(path, max_file_bytes)
    with _strict_pillow():
        img = _open_checked(raw, max_pixels)
        if _keeps_original_bytes(img):
            fmt = "png" if img.format == "PNG" else "jpeg"
            return raw, fmt, img.height, img.width
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - unusable EXIF: keep the stored orientation
            pass
        rgb = _to_rgb(img)
        out = io.BytesIO()
        rgb.save(out, format="PNG")
        return out.getvalue(), "png", rgb.height, rgb.width


def encode_mask_file(path: str, height: int, width: int, max_file_bytes: int, max_pixels: int):
    """(PNG bytes, values) of the mask at ``path`` for an image of ``height`` x ``width``."""
    raw = _read_checked(path, max_file_bytes)
    with _strict_pillow():
        try:
            img = _open_checked(raw, max_pixels)
        except ImageRejected as e:
            raise masks.MaskRejected(f"mask {path}: {e}") from None
        if (img.height, img.width) != (height, width):
            raise masks.MaskRejected(f"mask {path} is {img.width}x{img.height}, its image is "
                                     f"{width}x{height}")
        try:
            values = masks.mask_values(img)
        except masks.MaskRejected as e:
            raise masks.MaskRejected(f"mask {path}: {e}") from None
    return masks.encode_mask(values), values


# What a worker sends back for one chunk: the chunk's framed TFRecord bytes per
# (split, shard), and per item (reject reason or None, labels it counts for).
_ChunkResult = Tuple[Dict[Tuple[str, int], bytes], List[Tuple[Optional[str], List[str]]]]


def _encode_chunk(task: Tuple[Sequence[Tuple[str, str, str, str, str, int]], int, int, Optional[Sequence]]
                  ) -> _ChunkResult:
    """Worker entry point: encodes, serializes and frames one chunk of items.

    The worker frames the records itself (length, CRCs) and joins them per
    shard, so the parent only appends a few large byte strings per chunk
    instead of unpickling, checksumming and writing every record: the parent's
    CPU time in a 2-worker flowers run fell from 0.083 s to 0.064 s, time the
    two workers get on a 2-core machine.
    ``class_values`` (the fourth task element) is set for segmentation: the
    labels an image counts for are then the classes present in its mask.
    """
    entries, max_file_bytes, max_pixels, class_values = task
    framed: Dict[Tuple[str, int], List[bytes]] = {}
    outcomes: List[Tuple[Optional[str], List[str]]] = []
    for path, relpath, label, mask_path, split, shard in entries:
        try:
            encoded, fmt, height, width = encode_image(path, max_file_bytes, max_pixels)
            if class_values is None:
                example = serialize_example(encoded, fmt, relpath, height, width, label)
                labels = [label]
            else:
                mask_png, values = encode_mask_file(mask_path, height, width, max_file_bytes,
                                                    max_pixels)
                example = serialize_example(encoded, fmt, relpath, height, width, mask=mask_png)
                labels = [str(i) for i in masks.classes_present(values, class_values)]
        except (ImageRejected, masks.MaskRejected) as e:
            outcomes.append((str(e), []))
            continue
        except Exception as e:  # noqa: BLE001 - any other failure is this file's, not the run's
            outcomes.append((f"cannot process image: {_describe(e)}", []))
            continue
        framed.setdefault((split, shard), []).append(frame_record(example))
        outcomes.append((None, labels))
    return {key: b"".join(records) for key, records in framed.items()}, outcomes


# --------------------------------------------------------------------------
# tf.train.Example wire format, written by hand so workers need no TensorFlow
# --------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    return _field(1, _field(1, value))  # Feature.bytes_list { value: ... }


def _int64_feature(value: int) -> bytes:
    return _field(3, _field(1, _varint(value)))  # Feature.int64_list { packed value }


def serialize_example(image: bytes, image_format: str, filename: str, height: int,
                      width: int, label: Optional[str] = None, mask: Optional[bytes] = None) -> bytes:
    """The bytes of ``tf.train.Example(...).SerializeToString(deterministic=True)``.

    Importing TensorFlow in every worker would cost seconds and hundreds of MB
    per process; the Example format is five nested length-delimited fields.
    Map entries are written in sorted key order, as protobuf's deterministic
    mode does, so the bytes match TensorFlow's own serialisation (tested).
    """
    fields = {
        features.FILENAME_KEY: _bytes_feature(filename.encode("utf-8")),
        features.HEIGHT_KEY: _int64_feature(height),
        features.IMAGE_KEY: _bytes_feature(image),
        features.IMAGE_FORMAT_KEY: _bytes_feature(image_format.encode("ascii")),
        features.WIDTH_KEY: _int64_feature(width),
    }
    if label is not None:
        fields[features.LABEL_KEY] = _bytes_feature(label.encode("utf-8"))
    if mask is not None:
        fields[features.MASK_KEY] = _bytes_feature(mask)
    entries = b"".join(_field(1, _field(1, key.encode("utf-8")) + _field(2, value))
                       for key, value in sorted(fields.items()))
    return _field(1, entries)  # Example.features { feature: map entries }


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _num_workers(data: "DataConfig") -> int:
    return data.workers if data.workers and data.workers > 0 else (os.cpu_count() or 1)


def _chunks(items: Sequence[_Item], size: int, data: "DataConfig", shard_counts: Dict[str, int],
            class_values: Optional[Sequence] = None) -> List[Tuple]:
    return [([(i.path, i.relpath, i.label, i.mask, i.split,
               shard_index(i.relpath, shard_counts[i.split])) for i in items[start:start + size]],
             data.max_file_bytes, data.max_pixels, class_values)
            for start in range(0, len(items), size)]


def _ordered_results(tasks: Sequence, workers: int) -> Iterator[_ChunkResult]:
    """Results of ``_encode_chunk`` in task order, with few tasks in flight.

    One worker runs in this process: no pool start-up, and the single-core
    baseline benchmarks compare against.  The pool forks when this process
    has not loaded TensorFlow (``visiontune prepare``: shards are written
    without it), which starts workers in milliseconds; otherwise (inside
    ``visiontune run``) it uses ``spawn``, because forking a process with TF's
    threads running can deadlock the child, and spawned workers take a few
    tenths of a second to start (a new interpreter importing Pillow).
    """
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _encode_chunk(task)
        return
    context = multiprocessing.get_context(_start_method())
    window = workers * _TASKS_PER_WORKER
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(tasks)),
                                                mp_context=context) as pool:
        pending: List[concurrent.futures.Future] = []
        next_task = 0
        try:
            while next_task < len(tasks) or pending:
                while next_task < len(tasks) and len(pending) < window:
                    pending.append(pool.submit(_encode_chunk, tasks[next_task]))
                    next_task += 1
                yield pending.pop(0).result()
        except concurrent.futures.process.BrokenProcessPool as e:
            raise PrepareError(
                "an image worker process died (out of memory, or the main script could not be "
                "re-imported by multiprocessing's spawn start method: run it from a file guarded "
                "by `if __name__ == '__main__':`), or set data.workers=1") from e
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _start_method() -> str:
    if "tensorflow" not in sys.modules and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


def _masked_crc(data: bytes) -> bytes:
    import google_crc32c
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_record(record: bytes) -> bytes:
    """One TFRecord entry, byte-identical to what ``tf.io.TFRecordWriter`` writes.

    Little-endian uint64 length, masked CRC32C of those 8 bytes, the data,
    masked CRC32C of the data.  Written by hand: not importing TensorFlow here
    saves seconds per ``visiontune prepare`` and lets the worker pool fork.
    """
    header = struct.pack("<Q", len(record))
    return header + _masked_crc(header) + record + _masked_crc(record)


def _shard_name(index: int, count: int) -> str:
    return f"{SHARD_PREFIX}-{index:05d}-of-{count:05d}.tfrecord"


def _write_shards(out_dir: str, items: Sequence[_Item], splits: Sequence[str],
                  data: "DataConfig", counts: Dict[str, Dict[str, int]], progress: bool,
                  classes: Sequence[str] = (),
                  segmentation: Optional["SegmentationConfig"] = None,
                  totals: Optional[Dict[str, int]] = None) -> List[Tuple[str, str]]:
    """Encodes all items and streams them into their shards; returns the rejects.

    Items are processed in (split, relpath) order and results come back in
    that order, so each shard's content is independent of worker count and
    timing: the same inputs give byte-identical files.
    """
    from tqdm import tqdm

    items = sorted(items, key=lambda i: (splits.index(i.split), i.relpath))
    per_split = {s: sum(1 for i in items if i.split == s) for s in splits}
    shard_counts = {s: max(1, min(data.num_shards, per_split[s])) for s in splits}
    workers = _num_workers(data)
    chunk = max(1, min(_MAX_CHUNK, -(-len(items) // (workers * 8))))
    class_values = ([list(v) for v in segmentation.class_values] if segmentation is not None
                    else None)
    tasks = _chunks(items, chunk, data, shard_counts, class_values)
    rejects: List[Tuple[str, str]] = []
    files: Dict[Tuple[str, int], Any] = {}
    try:
        for split in splits:
            os.makedirs(os.path.join(out_dir, split))
            for index in range(shard_counts[split]):
                path = os.path.join(out_dir, split, _shard_name(index, shard_counts[split]))
                files[split, index] = open(path, "wb")
        bar = tqdm(total=len(items), desc="prepare", unit="img", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        position = 0
        with bar:
            for framed, outcomes in _ordered_results(tasks, workers):
                for key, records in framed.items():
                    files[key].write(records)
                for reason, labels in outcomes:
                    item = items[position]
                    position += 1
                    if reason is not None:
                        rejects.append((item.path, reason))
                        continue
                    if totals is not None:
                        totals[item.split] += 1
                    for label in labels:
                        # Segmentation counts class indices (classes present in the mask).
                        name = classes[int(label)] if class_values is not None else label
                        counts[item.split][name] += 1
                bar.update(len(outcomes))
    finally:
        for f in files.values():
            f.close()
    return rejects


def _write_metadata(out_dir: str, classes: Sequence[str], counts: Dict[str, Dict[str, int]],
                    rejects: Sequence[Tuple[str, str]], settings: str,
                    totals: Dict[str, int], task: str) -> None:
    with open(os.path.join(out_dir, features.CLASSES_FILE), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{c}\n" for c in classes)
    with open(os.path.join(out_dir, features.REJECTS_FILE), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "reason"])
        writer.writerows(rejects)
    summary = {
        "classes": list(classes),
        "counts": counts,
        "totals": totals,
        "rejects": len(rejects),
        "settings": settings,
        "task": task,
    }
    with open(os.path.join(out_dir, features.SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _replace_dir(tmp_dir: str, output_dir: str) -> None:
    """Moves the finished folder into place; the old one goes only once the new one is there."""
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; a dataset is meant to be shared
    old = None
    if os.path.exists(output_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.old-",
                               dir=os.path.dirname(os.path.abspath(output_dir)))
        os.rmdir(old)
        os.rename(output_dir, old)
    try:
        os.rename(tmp_dir, output_dir)
    except BaseException:
        if old:
            os.rename(old, output_dir)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
