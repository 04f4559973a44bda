"""The run report's page: ``report.json``'s numbers through ``templates/report.html``."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from visiontune.pipeline import formatting, html_pages
from visiontune.pipeline.report_examples import MAX_SAMPLE_CLASSES

MAX_REJECTS_SHOWN = 50
# history.json keys and the training table's column for each.
HISTORY_COLUMNS = [("loss", "loss"), ("accuracy", "accuracy"), ("val_loss", "eval loss"),
                   ("val_accuracy", "eval accuracy"), ("learning_rate", "learning rate"),
                   ("epoch_seconds", "s/epoch"), ("step_seconds", "s/step"),
                   ("trainable_params", "trainable params")]

Facts = List[Tuple[str, Any]]  # (label, value); a pair whose value is None or "" is not shown


def _history_rows(history: Sequence[Dict[str, Any]]) -> List[List[str]]:
    rows = []
    for row in history:
        cells = [row.get("phase", ""), row.get("epoch", "")]
        for key, _ in HISTORY_COLUMNS:
            v = row.get(key, row.get("lr") if key == "learning_rate" else None)
            cells.append(f"{v:.3g}" if key == "learning_rate" and v is not None else
                         formatting.thousands(v) if key == "trainable_params" else formatting.num(v))
        rows.append(cells)
    return rows


def _training_facts(training: Dict[str, Any]) -> Facts:
    params = training.get("params", {})
    return [
        ("strategy", training.get("strategy")), ("precision", training.get("precision")),
        ("devices", ", ".join(training.get("devices", []))),
        ("epochs run", training.get("epochs_run", len(training.get("history", [])))),
        ("training time", f"{training['train_seconds']:.1f} s" if "train_seconds" in training else None),
        ("parameters (total / trainable at the end)",
         f"{params.get('total', 0):,} / {params.get('trainable', 0):,}" if params else None),
    ]


def _model_facts(model: Dict[str, Any]) -> Facts:
    params = model.get("params") or {}
    return [
        ("backbone", model.get("backbone")), ("width multiplier (alpha)", model.get("alpha")),
        ("weights", model.get("weights")),
        ("input size", f"{model['image_size']} × {model['image_size']} px" if model.get("image_size") else None),
        ("parameters, total", f"{params['total']:,}" if "total" in params else None),
        ("parameters, trainable", f"{params['trainable']:,}" if "trainable" in params else None),
        ("parameters, non-trainable", f"{params['non_trainable']:,}" if "non_trainable" in params else None),
        ("SavedModel size", formatting.size(model["saved_model_bytes"]) if "saved_model_bytes" in model else None),
        ("SavedModel", model.get("saved_model_dir")),
        ("signatures", ", ".join(model.get("signatures", []))),
    ]


def _baseline_rows(metrics: Dict[str, float], baseline: Dict[str, float]) -> List[List[str]]:
    """[metric, this model, baseline, change] for every metric of either; none without a baseline."""
    rows = []
    for k in sorted(set(metrics) | set(baseline)) if baseline else []:
        new, old = metrics.get(k), baseline.get(k)
        diff: Optional[float] = new - old if new is not None and old is not None else None
        rows.append([k, formatting.num(new), formatting.num(old), formatting.fmt(diff, "{:+.4f}")])
    return rows


def render_html(data: Dict[str, Any], figures: Dict[str, bytes]) -> str:
    """The report page of ``gather``'s data and figures ({file name: PNG bytes}, embedded)."""
    s = data["summary"]
    classes = data.get("classes", [])
    segmentation = data.get("task") == "segmentation"
    counts = data.get("counts")
    splits = list(counts or {})
    training = data.get("training")
    return html_pages.render(
        "report.html", data=data, s=s, figures=figures, classes=classes, segmentation=segmentation,
        accuracy=s["metrics"].get("pixel_accuracy" if segmentation else "sparse_categorical_accuracy"),
        counts=counts, splits=splits,
        count_rows=[[c] + [counts[sp].get(c, 0) for sp in splits] for c in classes] if counts else [],
        max_sample_classes=MAX_SAMPLE_CLASSES, rejects=data.get("rejects"), max_rejects_shown=MAX_REJECTS_SHOWN,
        training=training, training_facts=_training_facts(training) if training else [],
        history_columns=[label for _, label in HISTORY_COLUMNS],
        history_rows=_history_rows(training.get("history", [])) if training else [],
        timings=data.get("component_timings") or [],
        metrics=s["metrics"], per_class=data.get("per_class") or [], overlays=data.get("overlays") or [],
        pairs=data.get("confused_pairs") or [], mistakes=data.get("mistakes"),
        baseline_rows=_baseline_rows(s["metrics"], s["baseline_metrics"]),
        model_facts=_model_facts(data.get("model") or {}),
    )
