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

This module is the orchestration and the dataset folder's contract (settings
checks, the output folder swapped in whole, ``classes.txt``, ``rejects.csv``
and the summary, reading them back); the steps live in their own modules:

* ``components.image_listing``: the input layouts (class folders, CSV lists),
  class order and splits;
* ``components.image_encoding``: Pillow checks and re-encoding of one image;
* ``components.example_records``: ``tf.train.Example`` and TFRecord bytes
  without TensorFlow;
* ``components.shard_writer``: the worker pool and the ordered shard writes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from visiontune import features
from visiontune.components import masks
from visiontune.components.image_listing import (
    EVAL,
    TEST,
    TRAIN,
    PrepareError,
    _choose_classes,
    _collect_items,
    _drop_unknown_labels,
    segmentation_classes,
)
from visiontune.components.shard_writer import _write_shards

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from visiontune.configs import DataConfig, SegmentationConfig

_SUMMARY_REJECTS_SHOWN = 5


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


# --------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------


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
# Metadata and the swap into place
# --------------------------------------------------------------------------


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
