"""What ingest will read, and the rules that refuse a dataset: shared by ``visiontune prepare`` and ImageExampleGen.

``plan_ingest`` checks the settings, lists the sources (``image_listing``,
``remote_listing``) and picks the classes and splits, before any image is
opened; ``check_written`` refuses a dataset whose split was emptied by
rejected files; ``metadata_files`` are the bytes of ``classes.txt``,
``rejects.csv`` and ``summary.json``.  An empty split, a single class or a
test source that is the training source is an error, not a dataset.
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
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from visiontune import features
from visiontune.components import masks
from visiontune.components.class_names import check_distinct_labels, choose_classes, drop_unknown_labels, label_problem
from visiontune.components.image_listing import (
    EVAL,
    TEST,
    TRAIN,
    Hidden,
    PrepareError,
    _collect_items,
    _inside,
)

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from visiontune.configs import DataConfig, SegmentationConfig


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


