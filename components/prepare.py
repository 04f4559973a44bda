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

Two input layouts are accepted (the same for the main and the test source):

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
import sys
import tempfile
import warnings
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from pipeline.configs import DataConfig

# Feature names of every Example; the Transform and the tests depend on them.
IMAGE_KEY = "image"
IMAGE_FORMAT_KEY = "image_format"
FILENAME_KEY = "filename"
HEIGHT_KEY = "height"
WIDTH_KEY = "width"
LABEL_KEY = "label"

TRAIN, EVAL, TEST = "train", "eval", "test"
CLASSES_FILE = "classes.txt"
REJECTS_FILE = "rejects.csv"
SUMMARY_FILE = "summary.json"
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


class PrepareError(ValueError):
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

    def summary(self) -> str:
        """A table a person reads after a run to see that nothing went missing."""
        splits = list(self.counts)
        width = max([len("class")] + [len(c) for c in self.classes])
        lines = [f"Prepared dataset in {self.output_dir}: {len(self.classes)} classes",
                 "  " + "class".ljust(width) + "".join(f"{s:>9}" for s in splits)]
        for name in self.classes:
            lines.append("  " + name.ljust(width)
                         + "".join(f"{self.counts[s].get(name, 0):>9}" for s in splits))
        lines.append("  " + "total".ljust(width)
                     + "".join(f"{sum(self.counts[s].values()):>9}" for s in splits))
        empty = [c for c in self.classes if not self.counts.get(TRAIN, {}).get(c)]
        if empty:
            lines.append(f"WARNING: {len(empty)} class(es) have no training images: "
                         + ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
        lines.append(f"Rejected files: {len(self.rejects)}"
                     + (f" (see {os.path.join(self.output_dir, REJECTS_FILE)})" if self.rejects else ""))
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


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def prepare_dataset(data: "DataConfig", output_dir: Optional[str] = None,
                    progress: bool = True) -> PrepareResult:
    """Converts ``data.source`` (and ``data.test_source``) into TFRecord shards.

    The output folder is built under a temporary name next to ``output_dir``
    and renamed into place at the end, so a killed run never leaves a folder
    that looks like a finished dataset, and a re-run replaces the old one.
    """
    output_dir = output_dir or data.prepared_dir
    if not output_dir:
        raise PrepareError("no output folder: set data.prepared_dir or pass output_dir")
    _check_settings(data)
    items, rejects = _collect_items(data)
    classes = _choose_classes(data, items)
    items, label_rejects = _drop_unknown_labels(items, classes, explicit=bool(data.classes))
    rejects.extend(label_rejects)
    if not items:
        raise PrepareError(_no_images_message(data, rejects))
    _check_output_dir(output_dir, data)

    splits = [TRAIN, EVAL] + ([TEST] if data.test_source else [])
    counts = {s: {c: 0 for c in classes} for s in splits}
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.tmp-",
                               dir=parent)
    try:
        encode_rejects = _write_shards(tmp_dir, items, splits, data, counts, progress)
        rejects.extend(encode_rejects)
        _write_metadata(tmp_dir, classes, counts, rejects, settings_fingerprint(data))
        _replace_dir(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return PrepareResult(output_dir=output_dir, classes=classes, counts=counts, rejects=rejects)


def read_classes(prepared_dir: str) -> List[str]:
    """The class order every later step must use: label index i is line i."""
    path = os.path.join(prepared_dir, CLASSES_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.rstrip("\r\n")]
    except FileNotFoundError:
        raise PrepareError(f"{path}: no class list; run `visiontune prepare` first") from None


def settings_fingerprint(data: "DataConfig") -> str:
    """Hash of the settings that decide a dataset's content (not where or how fast)."""
    values = dataclasses.asdict(data)
    for key in ("prepared_dir", "workers"):
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def is_prepared(prepared_dir: str, data: Optional["DataConfig"] = None) -> bool:
    """Whether ``prepared_dir`` holds a finished dataset (the summary is written last).

    With ``data``, also whether it was prepared with these settings: a changed
    ``eval_fraction`` or source must not silently reuse the old split.
    """
    path = os.path.join(prepared_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return False
    if data is None:
        return True
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("settings") == settings_fingerprint(data)


def load_result(prepared_dir: str) -> PrepareResult:
    """The ``PrepareResult`` of an earlier ``prepare_dataset`` into ``prepared_dir``."""
    with open(os.path.join(prepared_dir, SUMMARY_FILE), encoding="utf-8") as f:
        summary = json.load(f)
    rejects: List[Tuple[str, str]] = []
    rejects_path = os.path.join(prepared_dir, REJECTS_FILE)
    if os.path.exists(rejects_path):
        with open(rejects_path, encoding="utf-8", newline="") as f:
            rejects = [(row["file"], row["reason"]) for row in csv.DictReader(f)]
    return PrepareResult(output_dir=prepared_dir, classes=read_classes(prepared_dir),
                         counts=summary["counts"], rejects=rejects)


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


def _check_settings(data: "DataConfig") -> None:
    """Fails before any work on settings that would fail late or silently."""
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


def _collect_items(data: "DataConfig") -> Tuple[List[_Item], List[Tuple[str, str]]]:
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
        if labels_csv:
            found, bad = _list_csv_source(source, labels_csv, data)
        else:
            found, bad = _list_tree_source(source)
        rejects.extend(bad)
        for path, relpath, label in found:
            key = split_key(relpath, data.split_group_regex)
            item_split = split or (EVAL if split_fraction(key) < data.eval_fraction else TRAIN)
            items.append(_Item(path, relpath, label, item_split))
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
    for label in class_dirs:
        class_root = os.path.join(source, label)
        for path in _walk_files(class_root):
            relpath = os.path.relpath(path, source).replace(os.sep, "/")
            found.append((path, relpath, label))
    return found, rejects


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
    for csv_path in csv_paths:
        for filename, label, line in _read_label_rows(csv_path, data):
            where = f"{csv_path} line {line}"
            if not filename:
                rejects.append((csv_path, f"{where}: empty {data.filename_column}"))
                continue
            path = _resolve_listed_file(filename, csv_path, source)
            if path is None:
                rejects.append((os.path.join(os.path.dirname(csv_path), filename),
                                f"file listed in {where} not found (looked next to the CSV "
                                f"and in {source})"))
                continue
            if not label or "\n" in label or "\r" in label:
                rejects.append((path, f"{where}: label {label!r} is empty or not a single line"))
                continue
            key = os.path.realpath(path)
            if key in seen:
                first_csv, first_label = seen[key]
                rejects.append((path, f"listed again in {where} (first listed in {first_csv}"
                                      + (f" with label {first_label!r})" if first_label != label
                                         else ")")))
                continue
            seen[key] = (csv_path, label)
            relpath = os.path.relpath(path, source).replace(os.sep, "/")
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


def _resolve_listed_file(filename: str, csv_path: str, source: str) -> Optional[str]:
    """A CSV's filename, next to the CSV first (GTSRB train), else under ``source``."""
    for base in (os.path.dirname(csv_path), source):
        path = os.path.normpath(os.path.join(base, filename))
        if os.path.isfile(path):
            return path
    return None


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
            os.path.exists(os.path.join(output_dir, SUMMARY_FILE))
            or os.path.exists(os.path.join(output_dir, CLASSES_FILE))):
        raise PrepareError(f"{output_dir}: exists and is not a prepared dataset (no {SUMMARY_FILE}); "
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


def _encode_chunk(task: Tuple[Sequence[Tuple[str, str, str]], int, int]
                  ) -> List[Tuple[Optional[bytes], Optional[str]]]:
    """Worker entry point: (serialised Example, None) or (None, reject reason) per item."""
    entries, max_file_bytes, max_pixels = task
    results: List[Tuple[Optional[bytes], Optional[str]]] = []
    for path, relpath, label in entries:
        try:
            encoded, fmt, height, width = encode_image(path, max_file_bytes, max_pixels)
        except ImageRejected as e:
            results.append((None, str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - any other failure is this file's, not the run's
            results.append((None, f"cannot process image: {_describe(e)}"))
            continue
        results.append((serialize_example(encoded, fmt, relpath, height, width, label), None))
    return results


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
                      width: int, label: str) -> bytes:
    """The bytes of ``tf.train.Example(...).SerializeToString(deterministic=True)``.

    Importing TensorFlow in every worker would cost seconds and hundreds of MB
    per process; the Example format is five nested length-delimited fields.
    Map entries are written in sorted key order, as protobuf's deterministic
    mode does, so the bytes match TensorFlow's own serialisation (tested).
    """
    features = {
        FILENAME_KEY: _bytes_feature(filename.encode("utf-8")),
        HEIGHT_KEY: _int64_feature(height),
        IMAGE_KEY: _bytes_feature(image),
        IMAGE_FORMAT_KEY: _bytes_feature(image_format.encode("ascii")),
        LABEL_KEY: _bytes_feature(label.encode("utf-8")),
        WIDTH_KEY: _int64_feature(width),
    }
    entries = b"".join(_field(1, _field(1, key.encode("utf-8")) + _field(2, value))
                       for key, value in sorted(features.items()))
    return _field(1, entries)  # Example.features { feature: map entries }


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _num_workers(data: "DataConfig") -> int:
    return data.workers if data.workers and data.workers > 0 else (os.cpu_count() or 1)


def _chunks(items: Sequence[_Item], size: int, data: "DataConfig"
            ) -> List[Tuple[List[Tuple[str, str, str]], int, int]]:
    return [([(i.path, i.relpath, i.label) for i in items[start:start + size]],
             data.max_file_bytes, data.max_pixels)
            for start in range(0, len(items), size)]


def _ordered_results(tasks: Sequence, workers: int) -> Iterator[List]:
    """Results of ``_encode_chunk`` in task order, with few tasks in flight.

    One worker runs in this process: no pool start-up, and the single-core
    baseline benchmarks compare against.  The pool uses ``spawn`` because
    the parent has TensorFlow loaded, and forking a process with TF's threads
    running can deadlock the child.
    """
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _encode_chunk(task)
        return
    context = multiprocessing.get_context("spawn")
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


def _shard_name(index: int, count: int) -> str:
    return f"{SHARD_PREFIX}-{index:05d}-of-{count:05d}.tfrecord"


def _write_shards(out_dir: str, items: Sequence[_Item], splits: Sequence[str],
                  data: "DataConfig", counts: Dict[str, Dict[str, int]], progress: bool
                  ) -> List[Tuple[str, str]]:
    """Encodes all items and streams them into their shards; returns the rejects.

    Items are processed in (split, relpath) order and results come back in
    that order, so each shard's content is independent of worker count and
    timing: the same inputs give byte-identical files.
    """
    import tensorflow as tf
    from tqdm import tqdm

    items = sorted(items, key=lambda i: (splits.index(i.split), i.relpath))
    per_split = {s: sum(1 for i in items if i.split == s) for s in splits}
    shard_counts = {s: max(1, min(data.num_shards, per_split[s])) for s in splits}
    workers = _num_workers(data)
    chunk = max(1, min(_MAX_CHUNK, -(-len(items) // (workers * 8))))
    tasks = _chunks(items, chunk, data)
    rejects: List[Tuple[str, str]] = []
    writers: Dict[Tuple[str, int], "tf.io.TFRecordWriter"] = {}
    try:
        for split in splits:
            os.makedirs(os.path.join(out_dir, split))
            for index in range(shard_counts[split]):
                path = os.path.join(out_dir, split, _shard_name(index, shard_counts[split]))
                writers[split, index] = tf.io.TFRecordWriter(path)
        bar = tqdm(total=len(items), desc="prepare", unit="img", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        position = 0
        with bar:
            for results in _ordered_results(tasks, workers):
                for example, reason in results:
                    item = items[position]
                    position += 1
                    if example is None:
                        rejects.append((item.path, reason))
                        continue
                    shard = shard_index(item.relpath, shard_counts[item.split])
                    writers[item.split, shard].write(example)
                    counts[item.split][item.label] += 1
                bar.update(len(results))
    finally:
        for writer in writers.values():
            writer.close()
    return rejects


def _write_metadata(out_dir: str, classes: Sequence[str], counts: Dict[str, Dict[str, int]],
                    rejects: Sequence[Tuple[str, str]], settings: str) -> None:
    with open(os.path.join(out_dir, CLASSES_FILE), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{c}\n" for c in classes)
    with open(os.path.join(out_dir, REJECTS_FILE), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "reason"])
        writer.writerows(rejects)
    summary = {
        "classes": list(classes),
        "counts": counts,
        "totals": {split: sum(per_class.values()) for split, per_class in counts.items()},
        "rejects": len(rejects),
        "settings": settings,
    }
    with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
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
