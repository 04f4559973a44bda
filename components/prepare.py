"""``visiontune prepare``: a folder of labelled images into sharded TFRecords, outside the pipeline.

The pipeline reads images itself (ImageExampleGen); this writes the same
records into a folder, for ``data.example_gen: tfrecords`` (ImportExampleGen)
or any other reader of ``tf.Example`` TFRecords.  The same code does the work:

* the rules (``components.ingest_plan``): formats TF cannot read and pixels
  that are not plain RGB normalised once with Pillow, broken files listed in
  ``rejects.csv`` with a reason, splits by a hash of each file's relative path
  (adding images never moves one between train and eval), byte-identical
  shards for identical inputs;
* the work, on Beam's DirectRunner (``components.ingest_beam``).

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
* ``components.example_records``: ``tf.train.Example`` bytes without TensorFlow;
* ``components.ingest_beam``: encoding and writing the shards on Beam (the
  DirectRunner here; the same code runs inside ImageExampleGen).

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
import json
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from visiontune import features
from visiontune.components.dataset_folder import (
    METADATA_FILES,
    OUTCOME_FILE,
    SPLIT_DIRS,
    foreign_entries,
    remove_ours,
    shard_name,
    signals_deferred,
    stop_signals_raise,
    temporary_folder,
)
from visiontune.components.image_listing import (
    TRAIN,
    Hidden,
    PrepareError,
)
from visiontune.components.ingest_plan import (
    IngestPlan,
    check_written,
    metadata_files,
    plan_ingest,
    settings_fingerprint,
)
from visiontune.errors import Interrupted, UserError, disk_problem, was_interrupted

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
    try:
        plan = plan_ingest(data, segmentation)  # listing: nothing is written yet
    except KeyboardInterrupt:
        raise Interrupted(f"{output_dir} is left as it was (stopped while listing the images)") from None
    items, rejects, classes, task = plan.items, plan.rejects, plan.classes, plan.task
    hidden = plan.hidden
    _check_output_dir(output_dir, data)
    _make_parent(output_dir)

    swapped = False
    try:
        with stop_signals_raise(), temporary_folder(output_dir) as tmp_dir:
            counts, totals, encode_rejects = _write_shards(tmp_dir, plan, data, segmentation, progress)
            rejects.extend(encode_rejects)
            check_written(data, items, encode_rejects, counts, totals, task, f"{output_dir} is left as it was")
            _write_metadata(tmp_dir, classes, counts, rejects, settings_fingerprint(data, segmentation),
                            totals, task, hidden)
            with signals_deferred():
                _replace_dir(tmp_dir, output_dir)
                swapped = True
    except KeyboardInterrupt:
        raise Interrupted(f"the new dataset is in {output_dir}" if swapped
                          else f"{output_dir} is left as it was, no temporary folder stays") from None
    except UserError:
        raise
    except Exception as e:
        if was_interrupted(e):  # in Beam's wrapper: see visiontune.errors
            raise Interrupted(f"{output_dir} is left as it was, no temporary folder stays") from None
        # Beam re-raises a worker's OSError as a RuntimeError holding its text: see visiontune.errors.
        problem = None if swapped else disk_problem(e, [output_dir])
        if problem is None:
            raise
        raise PrepareError(f"{problem}; {output_dir} is left as it was") from e
    return PrepareResult(output_dir=output_dir, classes=classes, counts=counts, rejects=rejects,
                         totals=totals, task=task, hidden=hidden)


def _write_shards(out_dir: str, plan: IngestPlan, data: "DataConfig",
                  segmentation: Optional["SegmentationConfig"], progress: bool = False):
    """The shards, written by ImageExampleGen's Beam code on the DirectRunner: (counts, totals, rejects).

    Uncompressed and named ``SPLIT/images-00000-of-00004.tfrecord``; each holds
    the records of ImageExampleGen's shard of the same index, in the same order.
    """
    from visiontune.components import ingest_beam

    for split in plan.splits:
        os.makedirs(os.path.join(out_dir, split))

    def shard_path(split: str, index: int, count: int) -> str:
        return os.path.join(out_dir, split, shard_name(index, count))

    tasks = ingest_beam.shard_tasks(plan.items, plan.splits, data.num_shards, shard_path)
    outcome = os.path.join(out_dir, OUTCOME_FILE)
    class_values = [list(v) for v in segmentation.class_values] if segmentation is not None else None
    workers = ingest_beam.ingest_workers(data.workers, len(plan.items), len(tasks))
    if progress:
        print(f"prepare: {len(plan.items)} images into {len(tasks)} shards, {workers} Beam worker(s)",
              file=sys.stderr, flush=True)
    ingest_beam.write_local(tasks, outcome, workers, data.max_file_bytes, data.max_pixels, class_values,
                            gzip=False)
    try:
        return ingest_beam.read_outcome(outcome, plan.classes, plan.splits, segmentation is not None)
    finally:
        os.remove(outcome)


def read_classes(prepared_dir: str) -> List[str]:
    """The class order every later step must use: label index i is line i."""
    path = os.path.join(prepared_dir, features.CLASSES_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.rstrip("\r\n")]
    except FileNotFoundError:
        raise PrepareError(f"{path}: no class list; run `visiontune prepare` first") from None


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


def _make_parent(output_dir: str) -> None:
    """The folder the output goes into (its temporary folder goes beside it), or one line why not."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    existing = parent
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PrepareError(f"{output_dir}: cannot create the output folder: {existing} is a file, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"{output_dir}: cannot create the output folder: {e.strerror} ({parent})") from None


# --------------------------------------------------------------------------
# Checks of the output folder, metadata and the swap into place
# --------------------------------------------------------------------------


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
