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

The output folder holds only what ingest writes (``classes.txt``,
``rejects.csv``, ``summary.json``, ``SPLIT/images-*.tfrecord``); a folder is
replaced only when its ``summary.json`` is ours, and then only our files go:
anything else in it is moved into the new dataset.  A run that fails, or is
stopped by SIGINT, SIGTERM or SIGHUP, removes its temporary folder and leaves
the previous dataset as it was; one killed outright (SIGKILL) leaves it for
the next run into the same output to remove.  An empty split, a single class
or a test source that is the training source is an error, not a dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from visiontune import features
from visiontune.components import masks
from visiontune.components.class_names import check_distinct_labels, choose_classes, drop_unknown_labels, label_problem
from visiontune.components.dataset_folder import (
    METADATA_FILES,
    SPLIT_DIRS,
    foreign_entries,
    remove_ours,
    signals_deferred,
    stop_signals_raise,
    temporary_folder,
)
from visiontune.components.image_listing import (
    EVAL,
    TEST,
    TRAIN,
    Hidden,
    PrepareError,
    _collect_items,
    _inside,
)
from visiontune.components.shard_writer import _write_shards

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from visiontune.configs import DataConfig, SegmentationConfig

_SUMMARY_REJECTS_SHOWN = 5
_OUR_NAMES = SPLIT_DIRS + METADATA_FILES


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
    # Hidden files and folders (names starting with "."): skipped unread, counted.
    hidden: Hidden = dataclasses.field(default_factory=Hidden)

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
        if self.hidden.files or self.hidden.folders:
            lines.append(f"Skipped {self.hidden.describe()} (names starting with '.': not read)")
        return "\n".join(lines)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


@dataclasses.dataclass
class IngestPlan:
    """What ingest will read, decided before any image is opened (the same for every ingest path)."""

    items: List[Any]  # image_listing._Item, each with its split
    classes: List[str]
    splits: List[str]
    task: str
    rejects: List[Tuple[str, str]]  # files refused by listing (encoding adds its own)
    hidden: Hidden


def plan_ingest(data: "DataConfig", segmentation: Optional["SegmentationConfig"] = None) -> IngestPlan:
    """Checks the settings, lists the sources and picks the classes and splits.

    Raises ``PrepareError`` for what cannot become a dataset at all (an empty
    split, a single class, a test source that is the training source).
    """
    _check_settings(data, segmentation)
    _check_sources_apart(data)
    items, rejects, hidden = _collect_items(data, segmentation)
    if segmentation is not None:
        classes = segmentation_classes(data, segmentation)
    else:
        classes = choose_classes(data, items)
        items, label_rejects = drop_unknown_labels(items, classes, explicit=bool(data.classes))
        rejects.extend(label_rejects)
    if not items:
        raise PrepareError(_no_images_message(data, rejects))
    splits = [TRAIN, EVAL] + ([TEST] if data.test_source else [])
    task = "segmentation" if segmentation is not None else "classification"
    _check_listed(data, items, classes, task, rejects)
    return IngestPlan(items=items, classes=classes, splits=splits, task=task, rejects=rejects, hidden=hidden)


def prepare_dataset(data: "DataConfig", output_dir: Optional[str] = None,
                    progress: bool = True,
                    segmentation: Optional["SegmentationConfig"] = None) -> PrepareResult:
    """Converts ``data.source`` (and ``data.test_source``) into TFRecord shards.

    With ``segmentation`` (``task: segmentation``) the sources hold image/mask pairs.

    The output folder is built under a temporary name next to ``output_dir``
    and renamed into place at the end, so a killed run never leaves a folder
    that looks like a finished dataset, and a re-run replaces the old one
    (our files of it: see ``_replace_dir``).  Raises ``PrepareError`` before
    touching the old dataset when the new one would be unusable.
    """
    output_dir = output_dir or data.prepared_dir
    if not output_dir:
        raise PrepareError("no output folder: set data.prepared_dir or pass output_dir")
    plan = plan_ingest(data, segmentation)
    items, rejects, classes, splits, task = plan.items, plan.rejects, plan.classes, plan.splits, plan.task
    hidden = plan.hidden
    _check_output_dir(output_dir, data)

    counts = {s: {c: 0 for c in classes} for s in splits}
    totals = {s: 0 for s in splits}
    with stop_signals_raise(), temporary_folder(output_dir) as tmp_dir:
        encode_rejects = _write_shards(tmp_dir, items, splits, data, counts, progress, classes,
                                       segmentation, totals)
        rejects.extend(encode_rejects)
        check_written(data, items, encode_rejects, counts, totals, task, f"{output_dir} is left as it was")
        _write_metadata(tmp_dir, classes, counts, rejects, settings_fingerprint(data, segmentation),
                        totals, task, hidden)
        with signals_deferred():
            _replace_dir(tmp_dir, output_dir)
    return PrepareResult(output_dir=output_dir, classes=classes, counts=counts, rejects=rejects,
                         totals=totals, task=task, hidden=hidden)


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
    for key in ("prepared_dir", "workers", "example_gen"):
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
    summary = _our_summary(prepared_dir)
    if summary is None:
        return False
    return data is None or summary.get("settings") == settings_fingerprint(data, segmentation)


def _our_summary(folder: str) -> Optional[Dict[str, Any]]:
    """``folder``'s ``summary.json`` if ``prepare_dataset`` wrote it (its keys, since the first), else None."""
    try:
        with open(os.path.join(folder, features.SUMMARY_FILE), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if (isinstance(summary, dict) and isinstance(summary.get("settings", ""), str)
            and isinstance(summary.get("classes"), list) and isinstance(summary.get("counts"), dict)):
        return summary
    return None


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
                         task=summary.get("task", "classification"),
                         hidden=Hidden(**summary.get("hidden", {})))


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
    for name in data.classes:
        problem = label_problem(name)
        if problem:
            raise PrepareError(f"data.classes: class name {name!r} {problem}")
    check_distinct_labels(data.classes, "data.classes names")


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


def _check_sources_apart(data: "DataConfig") -> None:
    """Refuses a test source that is (or holds, or is inside) the training source.

    Its images would be scored as test images after being trained on.  One
    folder may serve both only through two different label CSVs.
    """
    if not (data.test_source and os.path.isdir(data.source) and os.path.isdir(data.test_source)):
        return  # listing says what is missing
    train, test = os.path.realpath(data.source), os.path.realpath(data.test_source)
    if train == test:
        if data.labels_csv and data.test_labels_csv and (
                _csv_files(data.source, data.labels_csv) != _csv_files(data.test_source, data.test_labels_csv)):
            return
        raise PrepareError(f"data.test_source {data.test_source} is the training source {data.source} "
                           f"({train}): test images must not be training images")
    for inner, outer, outer_csv in ((test, data.source, data.labels_csv),
                                    (train, data.test_source, data.test_labels_csv)):
        if not outer_csv and _inside(inner, os.path.realpath(outer)):
            raise PrepareError(f"data.test_source {data.test_source} and data.source {data.source} "
                               f"overlap ({inner} is inside the class folder tree {outer}): "
                               "test images must not be training images")


def _csv_files(source: str, labels_csv: str) -> List[str]:
    pattern = labels_csv if os.path.isabs(labels_csv) else os.path.join(source, labels_csv)
    return sorted(os.path.realpath(p) for p in glob.glob(pattern))


def _required_splits(data: "DataConfig") -> List[str]:
    """Splits that must not be empty: eval unless ``eval_fraction`` is 0, test when given."""
    return [TRAIN] + ([EVAL] if data.eval_fraction > 0 else []) + ([TEST] if data.test_source else [])


def _check_listed(data: "DataConfig", items, classes: Sequence[str], task: str,
                  rejects: Sequence[Tuple[str, str]]) -> None:
    """Refuses, before any image is read, a dataset with an empty split or a single class."""
    if task == "classification" and len(classes) < 2:
        raise PrepareError(f"{data.source}: only one class ({', '.join(map(repr, classes))}): "
                           "classification needs at least 2 (class folders, or labels in the CSV)")
    for split in _required_splits(data):
        listed = sum(1 for i in items if i.split == split)
        if listed:
            continue
        if split == TEST:
            raise PrepareError(_no_images_message(data, rejects, data.test_source, "for the test split"))
        other = sum(1 for i in items if i.split != TEST)
        raise PrepareError(
            f"{data.source}: the {split} split would be empty: none of the {other} image(s) "
            f"falls in it at data.eval_fraction={data.eval_fraction}"
            + (" (by the groups of data.split_group_regex)" if data.split_group_regex else "")
            + "; add images or change data.eval_fraction")
    if task == "classification":
        trained = {i.label for i in items if i.split == TRAIN}
        if len(trained) < 2:
            raise PrepareError(f"{data.source}: only class {', '.join(map(repr, sorted(trained)))} has "
                               "training images: classification needs at least 2")


def check_written(data: "DataConfig", items, encode_rejects: Sequence[Tuple[str, str]],
                  counts: Dict[str, Dict[str, int]], totals: Dict[str, int], task: str, outcome: str) -> None:
    """Refuses a dataset whose images of a split, or of all classes but one, were all rejected.

    ``outcome`` ends the message: what became of the output.
    """
    kept = f"; {outcome}"
    split_of = {i.path: i.split for i in items}
    for split in _required_splits(data):
        if not totals[split]:
            first = next((r for r in encode_rejects if split_of.get(r[0]) == split), ("?", "?"))
            listed = sum(1 for i in items if i.split == split)
            raise PrepareError(f"no image of the {split} split could be used: all {listed} were rejected "
                               f"(first: {first[0]}: {first[1]}){kept}")
    trained = [c for c, n in counts[TRAIN].items() if n]
    if task == "classification" and len(trained) < 2:
        raise PrepareError(f"only class {', '.join(map(repr, trained))} has training images left after "
                           f"rejecting {len(encode_rejects)} unusable file(s): classification needs "
                           f"at least 2{kept}")


def _no_images_message(data: "DataConfig", rejects: Sequence[Tuple[str, str]],
                       where: str = "", purpose: str = "") -> str:
    where = where or data.source + (f" and {data.test_source}" if data.test_source else "")
    message = f"{where}: no images found" + (f" {purpose}" if purpose else "")
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
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise PrepareError(f"{output_dir}: exists and is not a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if _our_summary(output_dir) is None:
            raise PrepareError(f"{output_dir}: exists and is not a prepared dataset (no {features.SUMMARY_FILE} "
                               "written by visiontune prepare); refusing to replace it")
        stuck = [n for n in foreign_entries(output_dir) if n.split("/")[0] in _OUR_NAMES]
        if stuck:
            raise PrepareError(f"{os.path.join(output_dir, stuck[0])}: not written by visiontune prepare, "
                               "where the new dataset's files go (ExampleGen reads every file of a split "
                               "folder); move it away: refusing to delete it")


# --------------------------------------------------------------------------
# Metadata and the swap into place
# --------------------------------------------------------------------------


def metadata_files(classes: Sequence[str], counts: Dict[str, Dict[str, int]],
                   rejects: Sequence[Tuple[str, str]], settings: str,
                   totals: Dict[str, int], task: str, hidden: Hidden) -> Dict[str, bytes]:
    """The bytes of ``classes.txt``, ``rejects.csv`` and ``summary.json``, by file name."""
    rows = io.StringIO(newline="")
    writer = csv.writer(rows, lineterminator="\n")
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
    if hidden.files or hidden.folders:  # only then: summary.json stays as it was without any
        summary["hidden"] = dataclasses.asdict(hidden)
    return {
        features.CLASSES_FILE: "".join(f"{c}\n" for c in classes).encode("utf-8"),
        features.REJECTS_FILE: rows.getvalue().encode("utf-8"),
        features.SUMMARY_FILE: (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
    }


def _write_metadata(out_dir: str, *args) -> None:
    for name, content in metadata_files(*args).items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(content)


def _replace_dir(tmp_dir: str, output_dir: str) -> None:
    """Moves the finished folder into place; the old one goes only once the new one is there.

    Entries of the old folder that ingest did not write move into the new one;
    then only our own files of the old dataset are deleted.
    """
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; a dataset is meant to be shared
    if not os.path.lexists(output_dir):
        os.rename(tmp_dir, output_dir)
        return
    carried = [n for n in foreign_entries(output_dir) if "/" not in n]
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.old-",
                           dir=os.path.dirname(os.path.abspath(output_dir)))
    os.rmdir(old)
    os.rename(output_dir, old)
    moved: List[str] = []
    try:
        for name in carried:
            os.rename(os.path.join(old, name), os.path.join(tmp_dir, name))
            moved.append(name)
        os.rename(tmp_dir, output_dir)
    except BaseException:
        for name in moved:
            os.rename(os.path.join(tmp_dir, name), os.path.join(old, name))
        os.rename(old, output_dir)
        raise
    remove_ours(old)
