"""The artifacts ingest records in ML Metadata beside its examples: the class list and the rejects report.

``ClassList`` holds ``classes.txt`` (one class name a line: label index i is
line i), the one class order Transform, the Trainer and the Evaluator use; they
read it at run time from this artifact (``components.class_aware``), so a
pipeline is compiled without knowing its classes.  ``IngestReport`` holds
``rejects.csv`` (every input image that is not in the examples, with the
reason) and ``summary.json`` (classes, per-split and per-class counts, the
settings fingerprint): what a person reads to see that nothing went missing.

Read and written through TFX's ``fileio``, so the artifacts may live on any
filesystem TensorFlow knows (``gs://``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from tfx.dsl.io import fileio
from tfx.types import artifact, artifact_utils

from visiontune import features
from visiontune.errors import UserError


class ClassList(artifact.Artifact):
    """``classes.txt``: the ordered class names of a dataset."""

    TYPE_NAME = "visiontune.ClassList"


class IngestReport(artifact.Artifact):
    """``rejects.csv`` and ``summary.json`` of one ingest."""

    TYPE_NAME = "visiontune.IngestReport"


def write_files(uri: str, files: Dict[str, bytes]) -> None:
    """Writes each file aside, then renames it into place (a reader never sees half a file)."""
    fileio.makedirs(uri)
    for name, content in files.items():
        path = os.path.join(uri, name)
        with fileio.open(path + ".incomplete", "wb") as f:
            f.write(content)
        fileio.rename(path + ".incomplete", path, overwrite=True)


def read_classes_uri(uri: str) -> List[str]:
    path = os.path.join(uri, features.CLASSES_FILE)
    try:
        with fileio.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except Exception as e:  # noqa: BLE001 - NotFoundError and friends differ per filesystem
        raise UserError(f"{path}: cannot read the class list: {e}") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]


def read_classes(artifacts: Sequence[artifact.Artifact]) -> List[str]:
    """The class list of a ``ClassList`` channel's one artifact."""
    return read_classes_uri(artifact_utils.get_single_uri(list(artifacts)))


def read_report(uri: str) -> Tuple[Dict[str, Any], List[Tuple[str, str]]]:
    """(summary, rejects) of an ``IngestReport`` artifact's folder."""
    with fileio.open(os.path.join(uri, features.SUMMARY_FILE), "rb") as f:
        summary = json.loads(f.read().decode("utf-8"))
    with fileio.open(os.path.join(uri, features.REJECTS_FILE), "rb") as f:
        rows = csv.DictReader(io.StringIO(f.read().decode("utf-8"), newline=""))
        rejects = [(row["file"], row["reason"]) for row in rows]
    return summary, rejects


def load_result(report_uri: str, classes_uri: str):
    """A ``prepare.PrepareResult`` (classes, counts, rejects) from ImageExampleGen's two artifacts."""
    from visiontune.components import prepare

    summary, rejects = read_report(report_uri)
    return prepare.PrepareResult(
        output_dir=report_uri, classes=read_classes_uri(classes_uri) if classes_uri else summary["classes"],
        counts=summary["counts"], rejects=rejects, totals=summary.get("totals", {}),
        task=summary.get("task", "classification"), hidden=prepare.Hidden(**summary.get("hidden", {})))
