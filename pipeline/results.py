"""What a pipeline run produced, read back from ML Metadata and TFMA's output.

The run ends by telling the user where the pushed model is, or why nothing
was pushed (which blessing check failed, with the numbers), and the evaluation
with class names rather than TFMA's class ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from visiontune.pipeline import run_files, run_metadata


@dataclasses.dataclass
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    iou: Optional[float] = None  # segmentation only


@dataclasses.dataclass
class RunSummary:
    pushed: bool
    pushed_dir: str = ""
    blessed: bool = False
    reasons: List[str] = dataclasses.field(default_factory=list)
    model_dir: str = ""
    evaluation_dir: str = ""
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    per_class: List[ClassMetrics] = dataclasses.field(default_factory=list)
    baseline_metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    classes: List[str] = dataclasses.field(default_factory=list)
    # confusion_matrix[true][predicted] = count, rows and columns in ``classes`` order.
    confusion_matrix: List[List[int]] = dataclasses.field(default_factory=list)

    def message(self) -> str:
        lines = []
        if self.metrics:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.metrics.items()))
            lines.append(f"evaluation: {shown}")
        if self.baseline_metrics:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.baseline_metrics.items()))
            lines.append(f"baseline (last blessed model): {shown}")
        if self.confusion_matrix:
            pairs = sorted(((n, t, p) for t, row in enumerate(self.confusion_matrix)
                            for p, n in enumerate(row) if t != p and n), reverse=True)[:3]
            if pairs:
                lines.append("most confused (true -> predicted): " + ", ".join(
                    f"{self.classes[t]} -> {self.classes[p]} ({n})" for n, t, p in pairs))
        if self.per_class:
            worst = sorted(self.per_class, key=lambda c: c.f1)[:5]
            lines.append("lowest F1: " + ", ".join(f"{c.name} {c.f1:.3f}" for c in worst))
        if self.pushed:
            lines.append(f"pushed: {self.pushed_dir}")
        else:
            why = "; ".join(self.reasons) or "the model was not blessed"
            lines.append(f"not pushed: {why}")
        return "\n".join(lines)

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def read_metrics(evaluation_uri: str, classes: List[str]):
    """Overall metrics, per-class metrics (with names) and baseline metrics of a ModelEvaluation."""
    import tensorflow_model_analysis as tfma

    overall: Dict[str, float] = {}
    baseline: Dict[str, float] = {}
    per_class: Dict[int, Dict[str, float]] = {}
    try:
        result = tfma.load_metrics(evaluation_uri)
    except Exception:  # noqa: BLE001 - no metrics written: the Evaluator failed
        return overall, [], baseline
    for slice_metrics in result:
        if slice_metrics.slice_key.single_slice_keys:
            continue  # only the overall slice is reported here
        for kv in slice_metrics.metric_keys_and_values:
            key = kv.key
            if key.is_diff or not kv.value.HasField("double_value"):
                continue
            value = kv.value.double_value.value
            is_baseline = key.model_name == "baseline"
            if key.sub_key.HasField("class_id"):
                if not is_baseline:
                    per_class.setdefault(key.sub_key.class_id.value, {})[key.name] = value
            else:
                (baseline if is_baseline else overall)[key.name] = value
    rows = [ClassMetrics(name=classes[i] if i < len(classes) else str(i),
                         precision=m.get("precision", 0.0), recall=m.get("recall", 0.0),
                         f1=m.get("f1_score", 0.0), iou=m.get("iou"))
            for i, m in sorted(per_class.items())]
    return overall, rows, baseline


def read_confusion_matrix(evaluation_uri: str, num_classes: int) -> List[List[int]]:
    """The overall slice's arg-max confusion matrix from TFMA's plots."""
    import tensorflow_model_analysis as tfma

    matrix = [[0] * num_classes for _ in range(num_classes)]
    try:
        plots = tfma.load_plots(evaluation_uri)
    except Exception:  # noqa: BLE001 - no plots written
        return []
    for slice_plots in plots:
        if slice_plots.slice_key.single_slice_keys:
            continue
        for kv in slice_plots.plot_keys_and_values:
            if kv.key.model_name == "baseline":
                continue
            matrices = kv.value.multi_class_confusion_matrix_at_thresholds.matrices
            if not matrices:
                continue
            for entry in matrices[0].entries:  # threshold 0: the predicted class is the arg-max
                if entry.actual_class_id < num_classes and entry.predicted_class_id < num_classes:
                    matrix[entry.actual_class_id][entry.predicted_class_id] += int(entry.num_weighted_examples)
    return matrix


def per_class_from_confusion(matrix: List[List[int]], classes: List[str]) -> List[ClassMetrics]:
    """Arg-max precision, recall and F1 per class from TFMA's confusion matrix (``[true][predicted]``).

    Preferred over TFMA's own binarized Precision/Recall/F1Score (``top_k: 1``):
    TFMA 0.47 credits a class that is never the arg-max with recall 1 and
    precision = its share of the examples.  A class never predicted (or never
    present) gets 0 for the undefined ratio, as scikit-learn's ``zero_division=0``.
    """
    n = len(matrix)
    rows = []
    for i in range(n):
        tp = matrix[i][i]
        predicted = sum(matrix[t][i] for t in range(n))
        actual = sum(matrix[i])
        denominator = predicted + actual
        rows.append(ClassMetrics(name=classes[i] if i < len(classes) else str(i),
                                 precision=tp / predicted if predicted else 0.0,
                                 recall=tp / actual if actual else 0.0,
                                 f1=2 * tp / denominator if denominator else 0.0))
    return rows


def blessing_failures(evaluation_uri: str, baseline: Optional[Dict[str, float]] = None) -> List[str]:
    """Why TFMA did not bless the model: one line per failed threshold, with the numbers compared.

    ``baseline``: the last blessed model's metrics, so that a failed change
    threshold (TFMA records only the difference) names both models' values.
    """
    import tensorflow_model_analysis as tfma

    try:
        validation = tfma.load_validation_result(evaluation_uri)
    except Exception as e:  # noqa: BLE001 - reported to the user as the reason
        return [f"no validation result in {evaluation_uri}: {e}"]
    return [failure_reason(f, baseline or {})
            for per_slice in validation.metric_validations_per_slice for f in per_slice.failures]


def failure_reason(failure, baseline: Dict[str, float]) -> str:
    """One TFMA ``ValidationFailure`` in words: the metric, its value, and the bound it missed.

    The thresholds are ``evaluation.min_accuracy`` (a value threshold) and
    ``evaluation.max_regression`` (a change threshold against the baseline);
    see ``components.evaluation``.
    """
    name = failure.metric_key.name
    threshold = failure.metric_threshold
    if not failure.metric_value.HasField("double_value"):
        return f"{name}: {failure.message.strip() or 'not computed'}"
    value = failure.metric_value.double_value.value
    if threshold.HasField("change_threshold") and threshold.change_threshold.HasField("absolute"):
        allowed = -threshold.change_threshold.absolute.value
        then = baseline.get(name)
        if then is None:
            return (f"{name} changed by {value:+.4f} against the last blessed model, more than "
                    f"evaluation.max_regression {allowed:g} allows")
        return (f"{name} {then + value:.4f} is {-value:.4f} below the last blessed model's {then:.4f}, "
                f"more than evaluation.max_regression {allowed:g} allows")
    if threshold.HasField("value_threshold"):
        bounds = threshold.value_threshold
        if bounds.HasField("lower_bound") and value < bounds.lower_bound.value:
            return f"{name} {value:.4f} is below evaluation.min_accuracy {bounds.lower_bound.value:g}"
        if bounds.HasField("upper_bound") and value > bounds.upper_bound.value:
            return f"{name} {value:.4f} is above the bound {bounds.upper_bound.value:g}"
    return f"{name} {value:.4f} failed {threshold}".replace("\n", " ")


# What summarize_run reads: (component, output key, artifact type).
RUN_OUTPUTS = (("Pusher", "pushed_model", "PushedModel"), ("Evaluator", "blessing", "ModelBlessing"),
               ("Evaluator", "evaluation", "ModelEvaluation"), ("Trainer", "model", "Model"))


def run_artifacts(store) -> List[Any]:
    """The pushed model, blessing, evaluation and model of the newest pipeline run (None where it made none).

    A cached component is linked to the artifacts it reused, so a cached re-run
    names the model it reused, not the newest model trained (which may be a
    refused one of a later run).  Metadata without run contexts: the newest of each type.
    """
    newest = run_metadata.newest_run(store)
    if newest is None:
        return [run_metadata.latest_artifact(store, kind) for _, _, kind in RUN_OUTPUTS]
    produced = {c.component: run_metadata.outputs(store, c.execution.id)
                for c in run_metadata.run_components(store, newest.id) if c.state in ("COMPLETE", "CACHED")}
    found = []
    for component, key, _ in RUN_OUTPUTS:
        artifacts = produced.get(component, {}).get(key, [])
        found.append(artifacts[0] if artifacts else None)
    return found


def summarize_run(metadata_path: str) -> RunSummary:
    """What the newest run of the pipeline in ``metadata_path`` ended with."""
    store = run_metadata.open_store(metadata_path)
    pushed, blessing, evaluation, model = run_artifacts(store)
    summary = RunSummary(pushed=bool(pushed and run_metadata.prop(pushed, "pushed", 0)))
    if pushed is not None:
        summary.pushed_dir = run_metadata.prop(pushed, "pushed_destination", "") or ""
    if blessing is not None:
        summary.blessed = bool(run_metadata.prop(blessing, "blessed", 0))
    classes: List[str] = []
    if model is not None:
        summary.model_dir = run_files.serving_model_dir(model.uri)
        classes = (run_files.model_metadata(summary.model_dir) or {}).get("classes", [])
    if evaluation is not None:
        summary.evaluation_dir = evaluation.uri
        summary.metrics, summary.per_class, summary.baseline_metrics = read_metrics(evaluation.uri, classes)
        summary.classes = classes
        summary.confusion_matrix = read_confusion_matrix(evaluation.uri, len(classes))
        if summary.confusion_matrix and sum(map(sum, summary.confusion_matrix)):
            summary.per_class = per_class_from_confusion(summary.confusion_matrix, classes)
        if not summary.blessed:
            summary.reasons = blessing_failures(evaluation.uri, summary.baseline_metrics)
    if blessing is None:
        summary.reasons = ["the pipeline stopped before the Evaluator"]
    return summary
