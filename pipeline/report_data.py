"""What the run report shows, gathered from what the run left behind.

``find_artifacts`` locates the run's pieces through ML Metadata;
``gather`` reads them (the prepared dataset, the Trainer's history, TFMA's
evaluation, the exported model), runs the model over the eval examples
(``report_examples``) and draws the figures (``figures``).  A piece that
cannot be read is listed under ``problems`` instead of failing the report.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from typing import Any, Dict, List, Sequence

from visiontune import features
from visiontune.pipeline import figures as plots, results, run_files, run_metadata
from visiontune.pipeline.report_examples import (
    MAX_EVAL_EXAMPLES,
    find_mistakes,
    sample_images,
    segmentation_overlays,
)

logger = logging.getLogger("visiontune.report")

MAX_MISCLASSIFIED_SHOWN = 36
MAX_CONFUSED_PAIRS = 10


@dataclasses.dataclass
class RunArtifacts:
    """Where a run's pieces are, as ML Metadata records them."""

    eval_split: str = ""
    eval_examples_uri: str = ""  # ExampleGen's (raw) examples the Evaluator read
    train_examples_uri: str = ""  # ExampleGen's examples (Split-train)
    prepared_dir: str = ""  # ImportExampleGen's input (visiontune prepare's folder)
    ingest_report_uri: str = ""  # ImageExampleGen's report: rejects.csv, summary.json
    classes_uri: str = ""  # ImageExampleGen's class list
    model_run_dir: str = ""  # the Trainer's ModelRun: history.json, TensorBoard logs
    evaluator_state: str = ""


def find_artifacts(metadata_path: str, model_uri: str = "") -> RunArtifacts:
    """The evaluated split, the examples, the prepared dir and the Trainer's run dir."""
    store = run_metadata.open_store(metadata_path)
    found = RunArtifacts()

    example_gen = None
    evaluator = run_metadata.latest_execution(store, "Evaluator")
    if evaluator is not None:
        found.evaluator_state = run_metadata.state_name(evaluator)
        splits = run_metadata.prop(evaluator, "example_splits", "") or ""
        try:
            found.eval_split = (json.loads(splits) or [""])[0] if splits else ""
        except (ValueError, TypeError):
            found.eval_split = ""
        examples = run_metadata.inputs(store, evaluator.id).get("examples", [])
        if examples:
            found.eval_examples_uri = examples[0].uri
            example_gen = run_metadata.producer(store, examples[0].id)
    for name in ("ImageExampleGen", "ImportExampleGen"):
        example_gen = example_gen or run_metadata.latest_execution(store, name)
    if example_gen is not None:
        found.prepared_dir = run_metadata.prop(example_gen, "input_base", "") or ""
        outputs = run_metadata.outputs(store, example_gen.id)
        found.ingest_report_uri = outputs["report"][0].uri if outputs.get("report") else ""
        found.classes_uri = outputs["classes"][0].uri if outputs.get("classes") else ""
        examples = outputs.get("examples", [])
        if examples:
            found.train_examples_uri = examples[0].uri
            found.eval_examples_uri = found.eval_examples_uri or examples[0].uri
    found.eval_split = found.eval_split or "eval"

    # The Trainer execution that produced the model: its ModelRun holds history.json.
    trainer = None
    if model_uri:
        models = list(store.get_artifacts_by_uri(model_uri))
        trainer = run_metadata.producer(store, models[0].id) if models else None
    trainer = trainer or run_metadata.latest_execution(store, "Trainer")
    if trainer is not None:
        runs = run_metadata.outputs(store, trainer.id).get("model_run", [])
        if runs:
            found.model_run_dir = runs[0].uri
    return found


def confused_pairs(matrix: Sequence[Sequence[int]], classes: Sequence[str], limit: int = MAX_CONFUSED_PAIRS):
    """[(true, predicted, count, share of the true class)], most frequent first."""
    pairs = []
    for t, row in enumerate(matrix):
        total = sum(row)
        for p, n in enumerate(row):
            if t != p and n:
                pairs.append((classes[t], classes[p], int(n), n / total if total else 0.0))
    pairs.sort(key=lambda x: (-x[2], -x[3], x[0], x[1]))
    return pairs[:limit]


def gather(output_dir: str, max_eval_examples: int = MAX_EVAL_EXAMPLES) -> Dict[str, Any]:
    """Everything the report shows: ``{"data": numbers and text, "figures": {file name: PNG bytes}}``."""
    from visiontune.components import ingest_artifacts, prepare

    metadata_path = os.path.join(output_dir, features.METADATA_DB_FILE)
    summary = results.summarize_run(metadata_path)
    arts = find_artifacts(metadata_path, os.path.dirname(summary.model_dir) if summary.model_dir else "")
    data: Dict[str, Any] = {
        "output_dir": output_dir,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "summary": summary.to_json(),
        "eval_split": arts.eval_split,
        "problems": [],
    }
    figures: Dict[str, bytes] = {}
    problems: List[str] = data["problems"]

    def attempt(what: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one missing piece must not lose the whole report
            logger.warning("report: %s: %s: %s", what, type(e).__name__, e)
            problems.append(f"{what}: {type(e).__name__}: {e}")
            return None

    # Model facts first: the class list comes from the exported model.
    meta = run_files.model_metadata(summary.model_dir) if summary.model_dir else None
    classes = list(summary.classes or (meta or {}).get("classes", []))
    # ---- data
    prepared = None
    if arts.ingest_report_uri:
        prepared = attempt("ingest report", lambda: ingest_artifacts.load_result(
            arts.ingest_report_uri, arts.classes_uri))
    elif arts.prepared_dir and os.path.exists(os.path.join(arts.prepared_dir, features.SUMMARY_FILE)):
        prepared = attempt("prepared dataset", lambda: prepare.load_result(arts.prepared_dir))
    elif arts.prepared_dir:
        problems.append(f"prepared dataset: no {features.SUMMARY_FILE} in {arts.prepared_dir}")
    classes = classes or (prepared.classes if prepared else [])
    data["classes"] = classes
    data["prepared_dir"] = arts.prepared_dir or arts.ingest_report_uri
    if prepared is not None:
        data["counts"] = prepared.counts
        data["rejects"] = [list(r) for r in prepared.rejects]
        figures["class_counts.png"] = attempt(
            "class counts figure", lambda: plots.plot_class_counts(prepared.counts, classes))
    segmentation = (meta or {}).get("task") == "segmentation"
    data["task"] = "segmentation" if segmentation else "classification"
    if arts.train_examples_uri and classes and not segmentation:
        samples = attempt("sample images", lambda: sample_images(arts.train_examples_uri, classes))
        if samples:
            data["sample_classes"] = [c for c, v in samples.items() if v]
            figures["samples.png"] = attempt("sample images figure", lambda: plots.plot_samples(samples))

    # ---- training
    history = run_files.training_history(arts.model_run_dir) if arts.model_run_dir else None
    if history is None:
        problems.append("training history: no history.json from the Trainer"
                        + (f" in {arts.model_run_dir}" if arts.model_run_dir else ""))
    else:
        data["training"] = history
        if history.get("history"):
            figures["training.png"] = attempt("training curves", lambda: plots.plot_history(history["history"]))
    data["model_run_dir"] = arts.model_run_dir
    data["component_timings"] = attempt("component timings",
                                        lambda: run_metadata.component_timings(metadata_path)) or []

    # ---- evaluation
    matrix = summary.confusion_matrix
    support = [int(sum(row)) for row in matrix] if matrix else []
    data["per_class"] = [
        {"name": c.name, "precision": c.precision, "recall": c.recall, "f1": c.f1, "iou": c.iou,
         "support": support[i] if i < len(support) else None}
        for i, c in enumerate(summary.per_class)]
    data["confused_pairs"] = [list(p) for p in confused_pairs(matrix, classes)] if matrix else []
    if matrix and classes and not segmentation:
        figures["confusion_counts.png"] = attempt(
            "confusion matrix", lambda: plots.plot_confusion(matrix, classes, normalise=False))
        figures["confusion_normalised.png"] = attempt(
            "confusion matrix", lambda: plots.plot_confusion(matrix, classes, normalise=True))
    if segmentation and summary.model_dir and arts.eval_examples_uri:
        overlays = attempt("segmentation overlays", lambda: segmentation_overlays(
            summary.model_dir, arts.eval_examples_uri, arts.eval_split, meta["class_values"]))
        if overlays:
            data["overlays"] = [{"filename": o.filename, "pixel_accuracy": o.pixel_accuracy}
                                for o in overlays]
            figures["overlays.png"] = attempt("overlay figure", lambda: plots.plot_overlays(overlays, classes))
    elif summary.model_dir and arts.eval_examples_uri:
        found = attempt("misclassified images", lambda: find_mistakes(
            summary.model_dir, arts.eval_examples_uri, arts.eval_split, max_eval_examples))
        if found is not None:
            checked, total, mistakes = found
            shown = mistakes[:MAX_MISCLASSIFIED_SHOWN]
            data["mistakes"] = {"checked": checked, "total": total, "wrong": len(mistakes),
                                "shown": [dict(filename=m.filename, true=m.true, predicted=m.predicted,
                                               confidence=m.confidence) for m in shown]}
            if shown:
                figures["misclassified.png"] = attempt("misclassified figure", lambda: plots.plot_mistakes(shown))

    # ---- model
    model = dict(meta or {})
    model.pop("classes", None)
    if summary.model_dir and os.path.isdir(summary.model_dir):
        model["saved_model_bytes"] = run_files.saved_model_size(summary.model_dir)
        model["saved_model_dir"] = summary.model_dir
    data["model"] = model
    return {"data": data, "figures": {k: v for k, v in figures.items() if v}}
