"""A run's report: one self-contained HTML page (images embedded) plus its PNGs.

Built only from what the run left behind, found through ML Metadata
(``<output_dir>/metadata.sqlite``), so ``visiontune report OUTPUT_DIR`` needs
nothing else:

* data: class counts per split and the rejects (``summary.json`` and
  ``rejects.csv`` of ImageExampleGen's ``report`` artifact, or of the prepared
  folder that ImportExampleGen read), a few training images per class (ExampleGen's examples);
* training: the Trainer's ``history.json`` (loss, accuracy, learning rate,
  time per epoch and per step for both phases; strategy, precision, devices);
* evaluation: TFMA's metrics, per-class figures and confusion matrix
  (``results.summarize_run``), and the misclassified images of the evaluated
  split, found by running the SavedModel's ``serving_examples`` signature over
  (at most ``max_eval_examples`` of) the Evaluator's examples;
* segmentation runs: per-class IoU next to precision/recall/F1, and a grid of
  eval images with their ground truth and the predicted mask overlaid
  (``segmentation_overlays``), instead of misclassified images;
* the blessing decision against the baseline, and model facts
  (``assets.extra/visiontune.json``, SavedModel size).

Writes ``<output_dir>/report/index.html``, ``report.json`` (the numbers shown)
and the PNGs.  A section whose inputs are missing says so instead of failing.

This module is the entry point; the work is done by ``report_data`` (finding
and reading the run's pieces), ``report_examples`` (the model over the eval
examples), ``figures`` (the PNGs) and ``report_html`` (the page, from
``templates/report.html``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from visiontune import features
from visiontune.components import local_files
from visiontune.errors import UserError
from visiontune.pipeline import run_files
from visiontune.pipeline.figures import THUMBNAIL
from visiontune.pipeline.report_data import (
    MAX_CONFUSED_PAIRS,
    MAX_MISCLASSIFIED_SHOWN,
    RunArtifacts,
    confused_pairs,
    find_artifacts,
    gather,
)
from visiontune.pipeline.report_examples import (
    MAX_EVAL_EXAMPLES,
    MAX_OVERLAYS,
    MAX_SAMPLE_CLASSES,
    SAMPLES_PER_CLASS,
)
from visiontune.pipeline.report_html import MAX_REJECTS_SHOWN, render_html

__all__ = [
    "REPORT_DIR", "INDEX_FILE", "DATA_FILE", "ReportError", "resolve_output_dir", "is_current", "write_report",
    "gather", "find_artifacts", "RunArtifacts", "confused_pairs", "render_html",
    "SAMPLES_PER_CLASS", "MAX_SAMPLE_CLASSES", "MAX_EVAL_EXAMPLES", "MAX_MISCLASSIFIED_SHOWN",
    "MAX_CONFUSED_PAIRS", "MAX_REJECTS_SHOWN", "MAX_OVERLAYS", "THUMBNAIL",
]

REPORT_DIR = "report"
INDEX_FILE = "index.html"
DATA_FILE = "report.json"


class ReportError(UserError, FileNotFoundError):
    """The given path holds no run to report on (the CLI prints it as one line)."""


def resolve_output_dir(path: str) -> str:
    """A run's output dir from the dir itself, its ``metadata.sqlite``, or a YAML config."""
    if os.path.isfile(path) and path.endswith((".yaml", ".yml")):
        from visiontune import configs

        path = configs.load_config(path, []).pipeline.output_dir
    if os.path.isfile(path) and os.path.basename(path) == features.METADATA_DB_FILE:
        path = os.path.dirname(path)
    path = os.path.abspath(path)
    if not os.path.exists(os.path.join(path, features.METADATA_DB_FILE)):
        raise ReportError(f"{path}: no {features.METADATA_DB_FILE}; pass a run's output dir "
                          "(pipeline.output_dir), its metadata.sqlite, or the run's config file")
    return path


def is_current(output_dir: str, summary: Dict[str, Any]) -> bool:
    """Whether ``<output_dir>/report`` was built for a run with exactly this outcome and no problems."""
    data = run_files.read_json(os.path.join(output_dir, REPORT_DIR, DATA_FILE))
    return bool(data) and not data.get("problems") and data.get("summary") == json.loads(
        json.dumps(summary, default=str)) and os.path.exists(os.path.join(output_dir, REPORT_DIR, INDEX_FILE))


def write_report(output_dir: str, report_dir: str = "", max_eval_examples: int = MAX_EVAL_EXAMPLES) -> str:
    """Builds the report of the run in ``output_dir``; returns the path of ``index.html``.

    Every file is written aside and renamed into place, ``index.html`` last, so a
    reader (or a run killed mid-report) never sees a half-written page.  Figures
    that the previous report listed in its ``report.json`` and this one lacks are
    removed; nothing else in ``report_dir`` is touched (``--output`` may be a
    folder of the user's).
    """
    output_dir = resolve_output_dir(output_dir)
    report_dir = os.path.abspath(report_dir or os.path.join(output_dir, REPORT_DIR))
    built = gather(output_dir, max_eval_examples=max_eval_examples)
    data, figures = built["data"], built["figures"]
    os.makedirs(report_dir, exist_ok=True)
    previous = run_files.read_json(os.path.join(report_dir, DATA_FILE)) or {}
    data = {**data, "figure_files": sorted(figures)}
    for name, png in figures.items():
        local_files.write_atomically(os.path.join(report_dir, name), png)
    local_files.write_atomically(os.path.join(report_dir, DATA_FILE), json.dumps(data, indent=2, default=str))
    index = os.path.join(report_dir, INDEX_FILE)
    local_files.write_atomically(index, render_html(data, figures))
    for name in previous.get("figure_files") or ():
        # Only names our own earlier report wrote, and only plain file names inside report_dir.
        if name not in figures and name == os.path.basename(name) and name.endswith(".png"):
            try:
                os.remove(os.path.join(report_dir, name))
            except FileNotFoundError:
                pass
    return index
