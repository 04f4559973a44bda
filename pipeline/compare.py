"""``visiontune compare``: one config, several backbones, one comparison report.

Each backbone is a run of the *same* pipeline (same ``pipeline.name``, one
metadata database under ``<compare dir>/pipeline``), so TFX's cache serves
ImportExampleGen, StatisticsGen, SchemaGen, ExampleValidator and Transform to
every backbone after the first that shares its input size (Transform's
``custom_config`` holds the image size); only Trainer, Evaluator and Pusher run
again.  A second ``compare`` into the same folder with the same settings also
reuses the Trainers: add a backbone and only that one trains.

Blessing and pushing: the Resolver hands the Evaluator the last blessed model
of *any* backbone as baseline.  The comparison reads every backbone's own
evaluation (TFMA's metrics of the candidate, never the baseline's), and runs
with ``evaluation.max_regression: 1`` so that a backbone is blessed on the
accuracy floor alone, not on how it compares with the backbone that ran
before it.  Blessed models are pushed to ``<compare dir>/serving/<model_name>_<label>/``:
one servable model per backbone, the user's serving dir untouched.

Per backbone the table has: the weights actually used (a backbone whose
``imagenet`` weights cannot be had, no network and no Keras cache file, or
whose ``.h5`` file does not fit it, trains with ``weights: none`` and says so),
the input size, total and trainable parameters (after the last phase), the
median time per step and per epoch of the last training phase (as the
Trainer's ``EpochTimer`` records them: an epoch's wall time including its
validation pass; a step is that over the epoch's training steps), the total
training time, accuracy and macro-F1 on ``evaluation.split`` (the unweighted
mean of per-class F1, computed from TFMA's arg-max confusion matrix: TFMA's own
binarized ``F1Score`` with ``top_k: 1`` gives a class that is never predicted
recall 1 and precision = its prevalence instead of 0; both are in the JSON), the SavedModel's size on disk, and the median latency
of one ``serving_default`` call with one encoded image, measured in process
after every backbone has trained, backbones interleaved call by call.

Writes ``compare.html`` (self-contained), ``compare.json`` and ``compare.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import socket
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visiontune import features
from visiontune.errors import UserError
from visiontune.pipeline import machine

logger = logging.getLogger("visiontune.compare")

HTML_FILE = "compare.html"
JSON_FILE = "compare.json"
MARKDOWN_FILE = "compare.md"
PIPELINE_DIR = "pipeline"  # pipeline.output_dir of every backbone's run (one metadata DB)
SERVING_DIR = "serving"
DEFAULT_LATENCY_RUNS = 50
LATENCY_WARMUP = 5
DOWNLOAD_TIMEOUT_S = 30
COMPONENTS = ("ImportExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Transform",
              "Trainer", "Evaluator", "Pusher")
NO_IMAGENET = "no ImageNet weights reachable"


class CompareError(UserError, ValueError):
    """A backbone list or setting the user can fix (printed as one line)."""


# --------------------------------------------------------------------------- backbone specs

@dataclasses.dataclass
class BackboneSpec:
    """``NAME[:KEY=VALUE]...`` from the command line."""

    name: str
    settings: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (section.key, value)
    label: str = ""
    text: str = ""

    def given(self, dotted: str) -> bool:
        return any(k == dotted for k, _ in self.settings)


def split_top_level(text: str, sep: str = ",") -> List[str]:
    """Splits on ``sep`` outside brackets, so ``head.dense_units=[64,32]`` stays whole."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_spec(text: str) -> BackboneSpec:
    """``mobilenet_v2:alpha=0.35:weights=PATH`` -> BackboneSpec.

    A key without a dot is a ``model.`` setting (``alpha``, ``weights``,
    ``image_size``, ``contrast``, ...); a dotted key is any setting
    (``training.batch_size=16``); ``label=NAME`` names the row.
    """
    name, *items = split_top_level(text, ":")
    spec = BackboneSpec(name=name.strip().lower(), text=text)
    for item in items:
        if "=" not in item:
            raise CompareError(f"backbone {text!r}: {item!r} is not KEY=VALUE")
        key, value = (s.strip() for s in item.split("=", 1))
        if key == "label":
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
                raise CompareError(f"backbone {text!r}: label {value!r}: use letters, digits, _ . -")
            spec.label = value
            continue
        if key == "backbone" or key == "model.backbone":
            raise CompareError(f"backbone {text!r}: the backbone is the name before the first ':'")
        spec.settings.append((key if "." in key else f"model.{key}", value))
    return spec


def parse_backbones(values: Sequence[str]) -> List[BackboneSpec]:
    """Specs from one or more ``--backbones`` values, each a comma-separated list."""
    specs = [parse_spec(item) for value in values for item in split_top_level(value, ",")]
    if not specs:
        raise CompareError("no backbones given (--backbones mobilenet_v2,resnet50v2,...)")
    return specs


# --------------------------------------------------------------------------- planning

@dataclasses.dataclass
class Plan:
    """One backbone's run: its settings and the weights it will really use."""

    spec: BackboneSpec
    label: str
    config: Any  # configs.Config
    weights_requested: str
    weights_note: str  # what the table shows
    weights_fallback: bool


class _Unreachable(Exception):
    pass


@contextlib.contextmanager
def _watch_keras_downloads(timeout: float = DOWNLOAD_TIMEOUT_S):
    """Wraps Keras' ``get_file``: notes a cache hit, bounds and tags a failed download."""
    from tf_keras.src.utils import data_utils

    original = data_utils.get_file
    seen: Dict[str, Any] = {}

    def get_file(fname=None, origin=None, *args, **kwargs):
        home = kwargs.get("cache_dir") or os.environ.get("KERAS_HOME") or os.path.join(
            os.path.expanduser("~"), ".keras")
        subdir = kwargs.get("cache_subdir", "datasets")
        seen["cached"] = bool(fname) and any(
            os.path.exists(os.path.join(d, subdir, fname)) for d in (home, "/tmp/.keras"))
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            return original(fname, origin, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - Keras raises a bare Exception on URL failures
            raise _Unreachable(f"{origin}: {e}") from e
        finally:
            socket.setdefaulttimeout(old)

    data_utils.get_file = get_file
    try:
        yield seen
    finally:
        data_utils.get_file = original


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def probe_weights(model_cfg) -> Tuple[str, str, bool]:
    """(weights to train with, note for the table, fell back?) for a model config.

    Builds the headless backbone once with the requested weights: ``imagenet``
    that Keras can neither find in its cache nor download, or an ``.h5`` file
    that does not fit the architecture, falls back to ``none``.  A file that
    does not exist is an error (a typo, not a missing download).
    """
    import tf_keras

    from visiontune.components import backbones

    weights = model_cfg.weights or "none"
    if weights.lower() == "none":
        return "none", "none", False
    size = backbones.input_size(model_cfg.backbone, model_cfg.image_size)
    if weights.lower() != "imagenet" and "://" not in weights and not os.path.isfile(weights):
        raise CompareError(f"{model_cfg.backbone}: weights {weights}: no such file")
    try:
        with _watch_keras_downloads() as seen:
            backbones.create_backbone(model_cfg.backbone, size, weights, model_cfg.alpha)
    except _Unreachable:
        return "none", f"none ({NO_IMAGENET})", True
    except Exception as e:  # noqa: BLE001 - Keras says why the weights do not fit
        what = "ImageNet weights do" if weights.lower() == "imagenet" else f"{os.path.basename(weights)} does"
        return "none", f"none ({what} not fit: {_first_line(e)})", True
    finally:
        tf_keras.backend.clear_session()
    if weights.lower() == "imagenet":
        return "imagenet", "imagenet (Keras cache)" if seen.get("cached") else "imagenet (downloaded)", False
    return weights, f"file {os.path.basename(weights)}", False


def default_output_dir(config) -> str:
    """``compare`` beside the config's run folder (``outputs/gtsrb/run`` -> ``outputs/gtsrb/compare``)."""
    return os.path.join(os.path.dirname(os.path.abspath(config.pipeline.output_dir)), "compare")


def _label(spec: BackboneSpec, config) -> str:
    from visiontune.components import backbones

    if spec.label:
        return spec.label
    label = spec.name
    if backbones.get_backbone(spec.name).has_alpha:
        label += f"_{config.model.alpha:g}"
    if spec.given("model.image_size"):
        label += f"_{config.model.image_size}px"
    return label


def plan_comparison(config_path: Optional[str], specs: Sequence[BackboneSpec],
                    overrides: Sequence[str], output_dir: str, probe: bool = True) -> List[Plan]:
    """Every backbone's config, checked (names, sizes, weights) before anything trains.

    Settings a spec does not give: the config's ``model.alpha`` and
    ``model.weights`` when the spec names the config's own backbone at the
    config's alpha; otherwise alpha 1.0 and ``imagenet``.
    """
    from visiontune import configs
    from visiontune.components import backbones

    base = configs.load_config(config_path, overrides)
    if base.task != "classification":
        raise CompareError(f"compare supports classification configs; this one is task: {base.task}")
    plans: List[Plan] = []
    labels: Dict[str, int] = {}
    for spec in specs:
        try:
            backbone = backbones.get_backbone(spec.name)
        except ValueError as e:
            raise CompareError(str(e)) from None
        per = [f"model.backbone={spec.name}"] + [f"{k}={v}" for k, v in spec.settings]
        config = configs.load_config(config_path, list(overrides) + per)
        inherit = spec.name == base.model.backbone and (
            not backbone.has_alpha or config.model.alpha == base.model.alpha)
        if not inherit:
            defaults = [f"{k}={v}" for k, v in (("model.alpha", "1.0"), ("model.weights", "imagenet"))
                        if not spec.given(k)]
            per = per[:1] + defaults + per[1:]
        config = configs.load_config(config_path, list(overrides) + per)
        try:
            size = backbones.input_size(spec.name, config.model.image_size)
        except ValueError as e:
            raise CompareError(str(e)) from None
        label = _label(spec, config)
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:
            label = f"{label}_{labels[label]}"
        requested = config.model.weights
        weights, note, fallback = probe_weights(config.model) if probe else (requested, requested, False)
        model_name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{base.pipeline.model_name}_{label}")
        config = configs.load_config(config_path, list(overrides) + per + [
            f"model.weights={weights}",
            f"model.image_size={size}",
            f"pipeline.output_dir={os.path.join(output_dir, PIPELINE_DIR)}",
            f"pipeline.serving_dir={os.path.join(output_dir, SERVING_DIR)}",
            f"pipeline.model_name={model_name}",
            # Blessed on the accuracy floor alone: the baseline is whichever backbone ran before.
            "evaluation.max_regression=1.0",
        ])
        plans.append(Plan(spec=spec, label=label, config=config, weights_requested=requested,
                          weights_note=note, weights_fallback=fallback))
        logger.info("%s: %s px, weights %s", label, size, note)
    return plans


# --------------------------------------------------------------------------- reading a run back

def _pipeline_runs(metadata_path: str) -> Dict[int, Any]:
    from visiontune.pipeline import results

    if not os.path.exists(metadata_path):
        return {}
    return {c.id: c for c in results._store(metadata_path).get_contexts_by_type("pipeline_run")}


def read_backbone_run(metadata_path: str, context_id: int, classes: Sequence[str]) -> Dict[str, Any]:
    """What one pipeline run (one ``pipeline_run`` context) produced, from ML Metadata.

    Cached executions are linked to their (reused) output artifacts too, so a
    cached Trainer still names the model this backbone trained earlier.
    """
    from ml_metadata.proto import metadata_store_pb2

    from visiontune.pipeline import report, results

    store = results._store(metadata_path)
    names = {t.id: t.name.rsplit(".", 1)[-1] for t in store.get_execution_types()}
    outputs = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)
    row: Dict[str, Any] = {"components": []}
    linked: Dict[str, Dict[str, List[Any]]] = {}
    for execution in sorted(store.get_executions_by_context(context_id), key=lambda e: e.id):
        component = names.get(execution.type_id, "?")
        state = metadata_store_pb2.Execution.State.Name(execution.last_known_state)
        row["components"].append({
            "component": component, "state": state,
            "seconds": (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000.0})
        if state in ("COMPLETE", "CACHED"):
            linked[component] = report._linked(store, execution.id, outputs)

    def uri(component: str, key: str) -> str:
        artifacts = linked.get(component, {}).get(key, [])
        return artifacts[0].uri if artifacts else ""

    row["examples_uri"] = uri("ImportExampleGen", "examples")
    row["transform_graph_uri"] = uri("Transform", "transform_graph")
    model_uri = uri("Trainer", "model")
    row["model_dir"] = os.path.join(model_uri, "Format-Serving") if model_uri else ""
    row["model_run_dir"] = uri("Trainer", "model_run")
    row["evaluation_dir"] = uri("Evaluator", "evaluation")

    blessing = linked.get("Evaluator", {}).get("blessing", [])
    row["blessed"] = bool(blessing and results._prop(blessing[0], "blessed", 0))
    pushed = linked.get("Pusher", {}).get("pushed_model", [])
    row["pushed"] = bool(pushed and results._prop(pushed[0], "pushed", 0))
    row["pushed_dir"] = (results._prop(pushed[0], "pushed_destination", "") or "") if row["pushed"] else ""

    history = report._read_json(os.path.join(row["model_run_dir"], "history.json")) \
        if row["model_run_dir"] else None
    row.update(training_figures(history))
    if row["model_dir"] and os.path.isdir(row["model_dir"]):
        row["model_bytes"] = report._dir_size(row["model_dir"])
        meta = report._read_json(os.path.join(row["model_dir"], "assets.extra", "visiontune.json")) or {}
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


# --------------------------------------------------------------------------- latency

def sample_image(examples_uri: str, split: str) -> bytes:
    """The first encoded image of a split of ExampleGen's (raw) examples: what a client sends."""
    import glob

    import tensorflow as tf

    from visiontune.pipeline import report

    files = sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*")))
    for record in report.iter_examples(files, limit=1):
        return tf.train.Example.FromString(record).features.feature["image"].bytes_list.value[0]
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
                fn(image_bytes=image)["probabilities"].numpy()
            live.append((row, fn, image, []))
        except Exception as e:  # noqa: BLE001 - the other backbones' figures still count
            logger.warning("%s: latency not measured: %s: %s", row.get("label"), type(e).__name__, e)
            row.setdefault("problems", []).append(f"latency: {type(e).__name__}: {e}")
    for _ in range(runs):
        for row, fn, image, times in live:
            start = time.perf_counter()
            fn(image_bytes=image)["probabilities"].numpy()
            times.append((time.perf_counter() - start) * 1000.0)
    for row, _, _, times in live:
        times.sort()
        row["latency_ms"] = statistics.median(times)
        row["latency_p90_ms"] = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
        row["latency_runs"] = len(times)


# --------------------------------------------------------------------------- running

def run_backbone(plan: Plan) -> Dict[str, Any]:
    """Runs the pipeline for one backbone; its row (``error`` set when the run failed)."""
    from tfx import v1 as tfx

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
        prepared = local_runner.ensure_prepared(config)
        os.makedirs(config.pipeline.output_dir, exist_ok=True)
        before = set(_pipeline_runs(metadata_path))
        logger.info("%s: running pipeline %s", plan.label, config.pipeline.name)
        error = None
        try:
            tfx.orchestration.LocalDagRunner().run(local_runner.create_local_pipeline(config, prepared))
        except Exception as e:  # noqa: BLE001 - reported in the table; the next backbone runs
            error = f"{type(e).__name__}: {_first_line(e, 300)}"
            logger.error("%s: pipeline failed: %s", plan.label, error)
        row["run_seconds"] = time.time() - start
        new = sorted(set(_pipeline_runs(metadata_path)) - before)
        if new:
            row.update(read_backbone_run(metadata_path, new[-1], prepared.classes))
        if error:
            row["error"] = error
        elif row.get("accuracy") is None:
            row["error"] = "no evaluation (the Evaluator did not finish)"
    except (CompareError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {_first_line(e, 300)}"
        row["run_seconds"] = time.time() - start
        logger.error("%s: %s", plan.label, row["error"])
    return row


def run_comparison(config_path: Optional[str], backbones: Sequence[Any],
                   overrides: Sequence[str] = (), output_dir: str = "",
                   latency_runs: int = DEFAULT_LATENCY_RUNS, command: str = "") -> Dict[str, Any]:
    """Trains and evaluates every backbone, measures latency, writes the three files; returns the data."""
    from visiontune import configs

    specs = [b if isinstance(b, BackboneSpec) else parse_spec(b) for b in backbones]
    if not specs:
        raise CompareError("no backbones given")
    base = configs.load_config(config_path, overrides)
    output_dir = os.path.abspath(output_dir or default_output_dir(base))
    os.makedirs(output_dir, exist_ok=True)
    plans = plan_comparison(config_path, specs, overrides, output_dir)
    started = datetime.datetime.now()
    load_before = machine.load_average()
    rows = [run_backbone(plan) for plan in plans]
    split = base.evaluation.split
    measure_latency(rows, split, latency_runs)
    data = {
        "created": started.isoformat(timespec="seconds"),
        "command": command,
        "config": os.path.abspath(config_path) if config_path else "",
        "overrides": list(overrides),
        "output_dir": output_dir,
        "pipeline_dir": os.path.join(output_dir, PIPELINE_DIR),
        "pipeline_name": base.pipeline.name,
        "eval_split": split,
        "machine": machine.describe(),
        "load": {"before": load_before, "after": machine.load_average()},
        "wall_seconds": (datetime.datetime.now() - started).total_seconds(),
        "latency_runs": latency_runs,
        "classes": next((r["classes"] for r in rows if r.get("classes")), []),
        "rows": rows,
    }
    write_outputs(data, output_dir)
    return data


# --------------------------------------------------------------------------- output

TABLE_COLUMNS = ["backbone", "weights", "input px", "epochs", "total params", "trainable params",
                 "time/step", "time/epoch", "total train time", "accuracy", "macro-F1",
                 "model size", "latency (1 image)"]


def _fmt_int(v) -> str:
    return "" if v is None else f"{int(v):,}"


def _fmt(v, pattern: str) -> str:
    return "" if v is None else pattern.format(v)


def table_cells(row: Dict[str, Any]) -> List[str]:
    """The main table's cells of a row, as plain text (Markdown and HTML alike)."""
    from visiontune.pipeline import report

    if row.get("error") and row.get("accuracy") is None:
        return [row["label"], row["weights"], _fmt_int(row.get("image_size"))] + \
            [""] * (len(TABLE_COLUMNS) - 4) + [f"failed: {row['error']}"]
    return [
        row["label"], row["weights"], _fmt_int(row.get("image_size")), _fmt_int(row.get("epochs")),
        _fmt_int(row.get("params_total")), _fmt_int(row.get("params_trainable")),
        _fmt(None if row.get("step_seconds") is None else row["step_seconds"] * 1000, "{:.0f} ms"),
        _fmt(row.get("epoch_seconds"), "{:.1f} s"), _fmt(row.get("train_seconds"), "{:.0f} s"),
        _fmt(row.get("accuracy"), "{:.4f}"), _fmt(row.get("macro_f1"), "{:.4f}"),
        report._size(row["model_bytes"]) if row.get("model_bytes") is not None else "",
        _fmt(row.get("latency_ms"), "{:.1f} ms"),
    ]


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def per_class_rows(data: Dict[str, Any]) -> Tuple[List[str], List[List[Optional[float]]]]:
    """(labels, [[F1 per backbone] per class]) in class order."""
    rows = [r for r in data["rows"] if r.get("per_class_f1")]
    labels = [r["label"] for r in rows]
    return labels, [[r["per_class_f1"].get(c) for r in rows] for c in data["classes"]]


def _notes(data: Dict[str, Any]) -> List[str]:
    notes = [
        f"accuracy and macro-F1 on the `{data['eval_split']}` split, from each backbone's own "
        "Evaluator run; macro-F1 = unweighted mean of per-class F1 from TFMA's arg-max confusion matrix",
        "time/step and time/epoch: medians over the epochs of the last training phase "
        "(epoch wall time including its validation pass; step = that / training steps); "
        "total train time: both phases",
        "trainable params: in the last phase; model size: the exported SavedModel on disk",
        f"latency: median of {data['latency_runs']} single-image `serving_default` calls "
        "in process (encoded image in, after warm-up; backbones interleaved)",
    ]
    cached = [r["label"] for r in data["rows"]
              if any(c["component"] == "Trainer" and c["state"] == "CACHED" for c in r.get("components", []))]
    if cached:
        notes.append("trained by an earlier compare into this folder (Trainer cached; its timings are "
                     "from then): " + ", ".join(cached))
    if any(r.get("weights_fallback") for r in data["rows"]):
        notes.append("weights `none (...)`: the requested weights could not be used; "
                     "the backbone trained from scratch")
    return notes


def render_markdown(data: Dict[str, Any]) -> str:
    parts = [f"Machine: {data['machine']} (load before/after {data['load']['before']} / "
             f"{data['load']['after']}); {data['created'][:10]}; compare wall time "
             f"{data['wall_seconds']:.0f} s.", ""]
    if data.get("command"):
        parts += ["    " + data["command"], ""]
    parts.append(_md_table(TABLE_COLUMNS, [table_cells(r) for r in data["rows"]]))
    parts.append("")
    parts += [f"* {n}" for n in _notes(data)]
    labels, per_class = per_class_rows(data)
    if labels:
        parts += ["", "Per-class F1:", ""]
        parts.append(_md_table(["class"] + labels,
                               [[c] + [_fmt(v, "{:.3f}") for v in vals]
                                for c, vals in zip(data["classes"], per_class)]))
    return "\n".join(parts) + "\n"


def plot_accuracy_latency(rows: Sequence[Dict[str, Any]]) -> Optional[bytes]:
    from visiontune.pipeline import report

    points = [(r["latency_ms"], r["accuracy"], r["label"]) for r in rows
              if r.get("latency_ms") is not None and r.get("accuracy") is not None]
    if not points:
        return None
    fig = report._figure(7, 4.5)
    ax = fig.add_subplot()
    for x, y, label in points:
        ax.scatter([x], [y], s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel("single-image latency, ms (median)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs latency")
    ax.grid(alpha=0.3)
    return report._png(fig)


_CSS = """
code{white-space:pre-wrap;overflow-wrap:anywhere}table.cmp,table.runs{font-size:85%}
.scroll{overflow-x:auto}table.cmp td{white-space:nowrap}table.runs td:first-child{white-space:nowrap}
table.cmp td:nth-child(2){white-space:normal;min-width:10em;max-width:16em;overflow-wrap:anywhere}
table.runs td{overflow-wrap:anywhere}
"""


def render_html(data: Dict[str, Any], figures: Optional[Dict[str, bytes]] = None) -> str:
    from visiontune.pipeline import report

    e, table = report._e, report._table
    figures = figures or {}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>visiontune compare: {e(data['output_dir'])}</title><style>{report._CSS}{_CSS}</style></head><body>",
        "<h1>visiontune backbone comparison</h1>",
        f"<p class='muted'>{e(data['output_dir'])} · {e(data['created'])} · {e(data['machine'])} · "
        f"load {e(data['load']['before'])} → {e(data['load']['after'])} · "
        f"{data['wall_seconds']:.0f} s</p>",
    ]
    if data.get("command"):
        parts.append(f"<p><code>{e(data['command'])}</code></p>")
    rows = []
    for r in data["rows"]:
        cells = [e(c) for c in table_cells(r)]
        if r.get("weights_fallback"):
            cells[1] = f"<span class='bad'>{cells[1]}</span>"
        rows.append(cells)
    valid = [r for r in data["rows"] if r.get("accuracy") is not None]
    if valid:
        best = max(valid, key=lambda r: r["accuracy"])["label"]
        for cells, r in zip(rows, data["rows"]):
            if r["label"] == best:
                cells[9] = f"<b>{cells[9]}</b>"
    parts.append(f"<h2>Backbones ({e(data['eval_split'])} split)</h2>")
    parts.append("<div class='scroll'>" + table(TABLE_COLUMNS, rows, left=2, cls="cmp") + "</div>")
    parts.append("<ul>" + "".join("<li>%s</li>" % re.sub(r"`([^`]*)`", r"<code>\1</code>", e(n))
                                  for n in _notes(data)) + "</ul>")
    parts.append(report._img(figures, "accuracy_latency.png", "accuracy vs latency"))

    labels, per_class = per_class_rows(data)
    if labels:
        parts.append("<h2>Per-class F1</h2>")
        body = []
        for c, vals in zip(data["classes"], per_class):
            top = max((v for v in vals if v is not None), default=None)
            body.append([e(c)] + [("<b>%s</b>" if v is not None and v == top and len(vals) > 1 else "%s")
                                  % _fmt(v, "{:.3f}") for v in vals])
        parts.append(table(["class"] + labels, body))

    parts.append("<h2>Runs</h2>")
    parts.append("<p>One pipeline (<code>%s</code>, metadata in <code>%s</code>); a component shown "
                 "as CACHED reused an earlier backbone's (or an earlier compare's) output.</p>"
                 % (e(data["pipeline_name"]), e(os.path.join(data["pipeline_dir"], "metadata.sqlite"))))
    comp_rows = []
    for r in data["rows"]:
        by = {c["component"]: c for c in r.get("components", [])}
        cells = [e(r["label"])]
        for name in COMPONENTS:
            c = by.get(name)
            cells.append("" if c is None else "CACHED" if c["state"] == "CACHED" else
                         f"{c['seconds']:.0f} s" if c["state"] == "COMPLETE" else e(c["state"]))
        cells.append(_fmt(r.get("run_seconds"), "{:.0f} s"))
        comp_rows.append(cells)
    parts.append(table(["backbone"] + list(COMPONENTS) + ["wall"], comp_rows, cls="runs"))
    detail = []
    for r in data["rows"]:
        detail.append([e(r["label"]), e(r.get("spec", "")), e(r.get("weights_requested", "")),
                       "yes" if r.get("blessed") else "no",
                       f"<code>{e(r['pushed_dir'])}</code>" if r.get("pushed_dir") else "",
                       f"<code>{e(r.get('model_dir', ''))}</code>", e(r.get("error", ""))])
    parts.append(table(["backbone", "spec", "weights asked for", "blessed", "pushed to", "SavedModel",
                        "error"], detail, left=7, cls="runs"))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(data: Dict[str, Any], output_dir: str) -> Dict[str, str]:
    """Writes compare.json, compare.md and compare.html; returns their paths."""
    figures = {}
    try:
        png = plot_accuracy_latency(data["rows"])
        if png:
            figures["accuracy_latency.png"] = png
    except Exception as e:  # noqa: BLE001 - the tables matter more than the figure
        logger.warning("accuracy/latency figure: %s: %s", type(e).__name__, e)
    paths = {"json": os.path.join(output_dir, JSON_FILE), "markdown": os.path.join(output_dir, MARKDOWN_FILE),
             "html": os.path.join(output_dir, HTML_FILE)}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(render_markdown(data))
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write(render_html(data, figures))
    return paths
