"""Running a comparison's backbones and reading each one's row back; latency of every model.

Each backbone is a run of the same pipeline; its row is what ML Metadata says
that run (its ``pipeline_run`` context) produced: cached executions are linked
to their reused output artifacts, so a cached Trainer still names the model
this backbone trained earlier.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

from visiontune import features
from visiontune.components import ingest_artifacts
from visiontune.pipeline import results, run_files, run_metadata
from visiontune.pipeline.compare_plan import Plan, first_line
from visiontune.pipeline.compare_specs import CompareError

logger = logging.getLogger("visiontune.compare")

DEFAULT_LATENCY_RUNS = 50
LATENCY_WARMUP = 5


def run_backbone(plan: Plan) -> Dict[str, Any]:
    """Runs the pipeline for one backbone; its row (``error`` set when the run failed)."""

    from visiontune.pipeline import local_runner

    config = plan.config
    row: Dict[str, Any] = {
        "label": plan.label, "backbone": config.model.backbone, "alpha": config.model.alpha,
        "spec": plan.spec.text, "weights": plan.weights_note, "weights_requested": plan.weights_requested,
        "weights_used": config.model.weights, "weights_fallback": plan.weights_fallback,
        "image_size": config.model.image_size, "model_name": config.pipeline.model_name,
    }
    metadata_path = local_runner.metadata_path(config)
    start = time.time()
    try:
        prepared = local_runner.ensure_prepared(config) if config.data.example_gen == "tfrecords" else None
        os.makedirs(config.pipeline.output_dir, exist_ok=True)
        before = set(run_metadata.pipeline_runs(metadata_path))
        logger.info("%s: running pipeline %s", plan.label, config.pipeline.name)
        error = None
        try:
            local_runner.run_pipeline(local_runner.create_local_pipeline(config, prepared))
        except Exception as e:  # noqa: BLE001 - reported in the table; the next backbone runs
            error = f"{type(e).__name__}: {first_line(e, 300)}"
            logger.error("%s: pipeline failed: %s", plan.label, error)
        row["run_seconds"] = time.time() - start
        new = sorted(set(run_metadata.pipeline_runs(metadata_path)) - before)
        if new:
            row.update(read_backbone_run(metadata_path, new[-1], prepared.classes if prepared else ()))
        if error:
            row["error"] = error
        elif row.get("accuracy") is None:
            row["error"] = "no evaluation (the Evaluator did not finish)"
    except (CompareError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {first_line(e, 300)}"
        row["run_seconds"] = time.time() - start
        logger.error("%s: %s", plan.label, row["error"])
    return row


def read_backbone_run(metadata_path: str, context_id: int, classes: Sequence[str]) -> Dict[str, Any]:
    """What one pipeline run (one ``pipeline_run`` context) produced, from ML Metadata.

    ``classes``: the class order when the run read TFRecords; with images it is ImageExampleGen's class list.
    """
    store = run_metadata.open_store(metadata_path)
    components = run_metadata.run_components(store, context_id)
    row: Dict[str, Any] = {"components": [c.timing() for c in components]}
    outputs = {c.component: run_metadata.outputs(store, c.execution.id)
               for c in components if c.state in ("COMPLETE", "CACHED")}

    def uri(component: str, key: str) -> str:
        artifacts = outputs.get(component, {}).get(key, [])
        return artifacts[0].uri if artifacts else ""

    row["examples_uri"] = uri("ImageExampleGen", "examples") or uri("ImportExampleGen", "examples")
    if uri("ImageExampleGen", "classes"):
        classes = ingest_artifacts.read_classes_uri(uri("ImageExampleGen", "classes"))
    row["transform_graph_uri"] = uri("Transform", "transform_graph")
    model_uri = uri("Trainer", "model")
    row["model_dir"] = run_files.serving_model_dir(model_uri) if model_uri else ""
    row["model_run_dir"] = uri("Trainer", "model_run")
    row["evaluation_dir"] = uri("Evaluator", "evaluation")

    blessing = outputs.get("Evaluator", {}).get("blessing", [])
    row["blessed"] = bool(blessing and run_metadata.prop(blessing[0], "blessed", 0))
    pushed = outputs.get("Pusher", {}).get("pushed_model", [])
    row["pushed"] = bool(pushed and run_metadata.prop(pushed[0], "pushed", 0))
    row["pushed_dir"] = (run_metadata.prop(pushed[0], "pushed_destination", "") or "") if row["pushed"] else ""

    history = run_files.training_history(row["model_run_dir"]) if row["model_run_dir"] else None
    row.update(training_figures(history))
    if row["model_dir"] and os.path.isdir(row["model_dir"]):
        row["model_bytes"] = run_files.saved_model_size(row["model_dir"])
        meta = run_files.model_metadata(row["model_dir"]) or {}
        classes = meta.get("classes") or list(classes)
        row["image_size"] = meta.get("image_size")
    row["classes"] = list(classes)
    if row["evaluation_dir"]:
        overall, per_class, _ = results.read_metrics(row["evaluation_dir"], list(classes))
        row["metrics"] = overall
        row["accuracy"] = overall.get("sparse_categorical_accuracy")
        row["top_k_accuracy"] = overall.get("top_k_accuracy")
        row["example_count"] = overall.get("example_count")
        # TFMA's binarized F1Score (top_k 1) credits a class that is never the arg-max with
        # recall 1 and precision = its prevalence; its arg-max confusion matrix is right.
        row["per_class_f1_tfma_metric"] = {c.name: c.f1 for c in per_class}
        matrix = results.read_confusion_matrix(row["evaluation_dir"], len(classes))
        if matrix and sum(map(sum, matrix)):
            row["confusion_matrix"] = matrix
            f1 = [c.f1 for c in results.per_class_from_confusion(matrix, classes)]
            row["per_class_f1"] = dict(zip(classes, f1))
            row["macro_f1"] = statistics.fmean(f1) if f1 else None
            row["f1_source"] = "confusion matrix"
        else:
            row["per_class_f1"] = dict(row["per_class_f1_tfma_metric"])
            row["macro_f1"] = statistics.fmean(c.f1 for c in per_class) if per_class else None
            row["f1_source"] = "F1Score metric"
    return row


def training_figures(history: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Parameters and timings from the Trainer's ``history.json``.

    Time per step and per epoch: medians over the epochs of the last phase that
    ran (normally fine-tuning, where the backbone trains; the median leaves out
    the first epoch's tracing), and per phase in ``phases``.
    """
    if not history:
        return {}
    rows = history.get("history", [])
    phases: Dict[str, Dict[str, Any]] = {}
    for name in dict.fromkeys(r.get("phase", "") for r in rows):
        epochs = [r for r in rows if r.get("phase", "") == name]
        steps = [r["step_seconds"] for r in epochs if "step_seconds" in r]
        secs = [r["epoch_seconds"] for r in epochs if "epoch_seconds" in r]
        phases[name] = {"epochs": len(epochs),
                        "step_seconds": statistics.median(steps) if steps else None,
                        "epoch_seconds": statistics.median(secs) if secs else None,
                        "seconds": sum(secs),
                        "trainable_params": epochs[-1].get("trainable_params") if epochs else None}
    last = phases[list(phases)[-1]] if phases else {}
    params = history.get("params", {})
    return {
        "params_total": params.get("total"),
        "params_trainable": params.get("trainable"),
        "train_seconds": history.get("train_seconds"),
        "epochs": history.get("epochs_run", len(rows)),
        "step_seconds": last.get("step_seconds"),
        "epoch_seconds": last.get("epoch_seconds"),
        "timed_phase": list(phases)[-1] if phases else "",
        "phases": phases,
        "devices": history.get("devices", []),
        "precision": history.get("precision"),
    }


def sample_image(examples_uri: str, split: str) -> bytes:
    """The first encoded image of a split of ExampleGen's (raw) examples: what a client sends."""
    import tensorflow as tf

    for record in run_files.iter_examples(run_files.split_files(examples_uri, split), limit=1):
        return tf.train.Example.FromString(record).features.feature[features.IMAGE_KEY].bytes_list.value[0]
    raise FileNotFoundError(f"no examples in {examples_uri}/Split-{split}")


def measure_latency(rows: List[Dict[str, Any]], split: str, runs: int = DEFAULT_LATENCY_RUNS) -> None:
    """Median and p90 ms of single-image ``serving_default`` calls, into each row.

    Every model is loaded first; after a warm-up, the calls go round-robin
    (one per model per round) so that load from other processes hits all alike.
    """
    import tensorflow as tf

    if runs <= 0:
        return
    live = []
    for row in rows:
        if not row.get("model_dir") or not row.get("examples_uri"):
            continue
        try:
            image = tf.constant([sample_image(row["examples_uri"], split)])
            fn = tf.saved_model.load(row["model_dir"]).signatures[features.SERVING_DEFAULT]
            for _ in range(LATENCY_WARMUP):
                fn(image_bytes=image)[features.PROBABILITIES_OUTPUT].numpy()
            live.append((row, fn, image, []))
        except Exception as e:  # noqa: BLE001 - the other backbones' figures still count
            logger.warning("%s: latency not measured: %s: %s", row.get("label"), type(e).__name__, e)
            row.setdefault("problems", []).append(f"latency: {type(e).__name__}: {e}")
    for _ in range(runs):
        for row, fn, image, times in live:
            start = time.perf_counter()
            fn(image_bytes=image)[features.PROBABILITIES_OUTPUT].numpy()
            times.append((time.perf_counter() - start) * 1000.0)
    for row, _, _, times in live:
        times.sort()
        row["latency_ms"] = statistics.median(times)
        row["latency_p90_ms"] = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
        row["latency_runs"] = len(times)
