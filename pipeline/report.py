"""A run's report: one self-contained HTML page (images embedded) plus its PNGs.

Built only from what the run left behind, found through ML Metadata
(``<output_dir>/metadata.sqlite``), so ``visiontune report OUTPUT_DIR`` needs
nothing else:

* data: class counts per split and the rejects (the prepared dataset's
  ``summary.json`` and ``rejects.csv``, found from ImportExampleGen's
  ``input_base``), a few training images per class (ExampleGen's examples);
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
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import glob
import html
import io
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visiontune import features
from visiontune.errors import UserError

logger = logging.getLogger("visiontune.report")

REPORT_DIR = "report"
INDEX_FILE = "index.html"
DATA_FILE = "report.json"

SAMPLES_PER_CLASS = 4
MAX_SAMPLE_CLASSES = 60
MAX_EVAL_EXAMPLES = 1000
MAX_MISCLASSIFIED_SHOWN = 36
MAX_CONFUSED_PAIRS = 10
MAX_REJECTS_SHOWN = 50
MAX_OVERLAYS = 8
THUMBNAIL = 96
OVERLAY_SIZE = 256


class ReportError(UserError, FileNotFoundError):
    """The given path holds no run to report on (the CLI prints it as one line)."""


# --------------------------------------------------------------------------- locating the run

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


def _value(v):
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def _exec_prop(execution, name: str, default=None):
    for props in (execution.custom_properties, execution.properties):
        if name in props:
            return _value(props[name])
    return default


@dataclasses.dataclass
class RunArtifacts:
    """Where a run's pieces are, as ML Metadata records them."""

    eval_split: str = ""
    eval_examples_uri: str = ""  # ExampleGen's (raw) examples the Evaluator read
    train_examples_uri: str = ""  # ExampleGen's examples (Split-train)
    prepared_dir: str = ""
    model_run_dir: str = ""  # the Trainer's ModelRun: history.json, TensorBoard logs
    evaluator_state: str = ""


def _latest_execution(store, component: str):
    """Newest execution whose type name ends in ``component`` (e.g. ``Evaluator``)."""
    types = [t for t in store.get_execution_types() if t.name.rsplit(".", 1)[-1] == component]
    executions = [e for t in types for e in store.get_executions_by_type(t.name)]
    return max(executions, key=lambda e: e.id) if executions else None


def _linked(store, execution_id: int, kinds) -> Dict[str, List[Any]]:
    """{event key: [artifacts]} of an execution's events of the given kinds."""
    events = [e for e in store.get_events_by_execution_ids([execution_id]) if e.type in kinds]
    artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    out: Dict[str, List[Any]] = {}
    for event in events:
        key = event.path.steps[0].key if event.path.steps else ""
        if event.artifact_id in artifacts:
            out.setdefault(key, []).append(artifacts[event.artifact_id])
    return out


def _producer(store, artifact_id: int):
    from ml_metadata.proto import metadata_store_pb2

    outputs = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)
    for event in store.get_events_by_artifact_ids([artifact_id]):
        if event.type in outputs:
            return store.get_executions_by_id([event.execution_id])[0]
    return None


def find_artifacts(metadata_path: str, model_uri: str = "") -> RunArtifacts:
    """The evaluated split, the examples, the prepared dir and the Trainer's run dir."""
    from ml_metadata.proto import metadata_store_pb2

    from visiontune.pipeline import results

    store = results._store(metadata_path)
    inputs = (metadata_store_pb2.Event.INPUT, metadata_store_pb2.Event.DECLARED_INPUT)
    outputs = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)
    found = RunArtifacts()

    example_gen = None
    evaluator = _latest_execution(store, "Evaluator")
    if evaluator is not None:
        found.evaluator_state = metadata_store_pb2.Execution.State.Name(evaluator.last_known_state)
        splits = _exec_prop(evaluator, "example_splits", "") or ""
        try:
            found.eval_split = (json.loads(splits) or [""])[0] if splits else ""
        except (ValueError, TypeError):
            found.eval_split = ""
        examples = _linked(store, evaluator.id, inputs).get("examples", [])
        if examples:
            found.eval_examples_uri = examples[0].uri
            example_gen = _producer(store, examples[0].id)
    if example_gen is None:
        example_gen = _latest_execution(store, "ImportExampleGen")
    if example_gen is not None:
        found.prepared_dir = _exec_prop(example_gen, "input_base", "") or ""
        examples = _linked(store, example_gen.id, outputs).get("examples", [])
        if examples:
            found.train_examples_uri = examples[0].uri
            found.eval_examples_uri = found.eval_examples_uri or examples[0].uri
    found.eval_split = found.eval_split or "eval"

    # The Trainer execution that produced the model: its ModelRun holds history.json.
    trainer = None
    if model_uri:
        models = [a for a in store.get_artifacts_by_uri(model_uri)]
        trainer = _producer(store, models[0].id) if models else None
    trainer = trainer or _latest_execution(store, "Trainer")
    if trainer is not None:
        runs = _linked(store, trainer.id, outputs).get("model_run", [])
        if runs:
            found.model_run_dir = runs[0].uri
    return found


# --------------------------------------------------------------------------- reading examples

def _split_files(examples_uri: str, split: str) -> List[str]:
    return sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*")))


def iter_examples(files: Sequence[str], limit: int = 0):
    """Serialized tf.Examples of gzipped TFRecord files (at most ``limit`` when > 0)."""
    import tensorflow as tf

    count = 0
    for path in files:
        compression = "GZIP" if path.endswith(".gz") else ""
        for record in tf.data.TFRecordDataset(path, compression_type=compression):
            yield record.numpy()
            count += 1
            if limit and count >= limit:
                return


def _feature(example, name: str):
    feature = example.features.feature.get(name)
    if feature is None:
        return None
    values = getattr(feature, feature.WhichOneof("kind")).value if feature.WhichOneof("kind") else []
    return values[0] if values else None


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def sample_images(examples_uri: str, classes: Sequence[str], per_class: int = SAMPLES_PER_CLASS,
                  max_classes: int = MAX_SAMPLE_CLASSES, max_read: int = 20000
                  ) -> Dict[str, List[bytes]]:
    """A few encoded training images per class ({class: [image bytes]}), first found first."""
    import tensorflow as tf

    wanted = list(classes)[:max_classes]
    samples: Dict[str, List[bytes]] = {c: [] for c in wanted}
    files = _split_files(examples_uri, "train")
    for record in iter_examples(files, limit=max_read):
        example = tf.train.Example.FromString(record)
        label = _text(_feature(example, "label"))
        if label in samples and len(samples[label]) < per_class:
            samples[label].append(_feature(example, "image"))
            if all(len(v) >= per_class for v in samples.values()):
                break
    return samples


@dataclasses.dataclass
class Mistake:
    image: bytes
    filename: str
    true: str
    predicted: str
    confidence: float


def find_mistakes(model_dir: str, examples_uri: str, split: str,
                  max_examples: int = MAX_EVAL_EXAMPLES, batch_size: int = 64
                  ) -> Tuple[int, int, List[Mistake]]:
    """Runs ``serving_examples`` over the split: (examples checked, total in split or -1, mistakes).

    Mistakes are sorted most confident first.
    """
    import tensorflow as tf


    files = _split_files(examples_uri, split)
    if not files:
        raise FileNotFoundError(f"no examples in {examples_uri}/Split-{split}")
    model = tf.saved_model.load(model_dir)
    predict = model.signatures[features.SERVING_EXAMPLES]
    mistakes: List[Mistake] = []
    checked = 0

    def flush(batch):
        out = predict(examples=tf.constant([r for r, _ in batch]))
        names = [_text(c) for c in out["classes"].numpy()]
        scores = out["scores"].numpy()
        for (_, example), name, score in zip(batch, names, scores):
            true = _text(_feature(example, "label"))
            if name != true:
                mistakes.append(Mistake(image=_feature(example, "image"),
                                        filename=_text(_feature(example, "filename") or b""),
                                        true=true, predicted=name, confidence=float(score)))

    batch = []
    for record in iter_examples(files, limit=max_examples):
        batch.append((record, tf.train.Example.FromString(record)))
        checked += 1
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    total = checked
    if max_examples and checked >= max_examples:  # there may be more: count them without predicting
        total = sum(1 for _ in iter_examples(files))
    mistakes.sort(key=lambda m: -m.confidence)
    return checked, total, mistakes


@dataclasses.dataclass
class Overlay:
    filename: str
    image: bytes  # encoded input image
    truth: Any  # [h, w] class ids, -1 = void
    predicted: Any  # [h, w] class ids
    pixel_accuracy: float  # non-void pixels


def segmentation_overlays(model_dir: str, examples_uri: str, split: str,
                          class_values: Sequence[Sequence[int]], limit: int = MAX_OVERLAYS
                          ) -> List[Overlay]:
    """Ground truth and prediction (``serving_examples``' full-size ``masks``) of the first eval images."""
    import numpy as np
    import tensorflow as tf

    from visiontune.components import masks

    files = _split_files(examples_uri, split)
    if not files:
        raise FileNotFoundError(f"no examples in {examples_uri}/Split-{split}")
    lookup = np.array(masks.lookup_table(class_values, -1), dtype=np.int64)
    predict = tf.saved_model.load(model_dir).signatures[features.SERVING_EXAMPLES]
    found: List[Overlay] = []
    for record in iter_examples(files, limit=limit):
        example = tf.train.Example.FromString(record)
        out = predict(examples=tf.constant([record]))
        truth = lookup[tf.io.decode_png(_feature(example, features.MASK_KEY), channels=1).numpy()[..., 0]]
        predicted = lookup[tf.io.decode_png(out["mask_bytes"][0], channels=1).numpy()[..., 0]]
        valid = truth >= 0
        accuracy = float((predicted[valid] == truth[valid]).mean()) if valid.any() else float("nan")
        found.append(Overlay(filename=_text(_feature(example, "filename") or b""),
                             image=_feature(example, "image"), truth=truth, predicted=predicted,
                             pixel_accuracy=accuracy))
    return found


# --------------------------------------------------------------------------- figures

def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas: no display, no global state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _thumbnail(image_bytes: bytes, size: int = THUMBNAIL):
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    image.thumbnail((size, size))
    return np.asarray(image)


def plot_class_counts(counts: Dict[str, Dict[str, int]], classes: Sequence[str]) -> bytes:
    import numpy as np

    splits = [s for s in counts if sum(counts[s].values())]
    n = len(classes)
    fig = _figure(10, max(3.0, 0.22 * n * max(1, len(splits)) / 1.5 + 1.5))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(splits))
    y = np.arange(n)
    for i, split in enumerate(splits):
        ax.barh(y + i * height, [counts[split].get(c, 0) for c in classes], height, label=split)
    ax.set_yticks(y + height * (len(splits) - 1) / 2, labels=list(classes), fontsize=8 if n > 20 else 10)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title("Images per class and split")
    ax.legend()
    return _png(fig)


def plot_image_grid(cells: List[Tuple[bytes, str]], columns: int, title: str,
                    color_fn=None) -> bytes:
    """A grid of (image bytes, caption) cells."""
    rows = max(1, -(-len(cells) // columns))
    fig = _figure(1.6 * columns, 1.85 * rows + 0.4)
    fig.suptitle(title)
    for i, (image, caption) in enumerate(cells):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.axis("off")
        try:
            ax.imshow(_thumbnail(image))
        except Exception:  # noqa: BLE001 - an undecodable image is shown as its caption only
            pass
        ax.set_title(caption, fontsize=7, color=color_fn(i) if color_fn else "black")
    return _png(fig)


def plot_samples(samples: Dict[str, List[bytes]]) -> bytes:
    per_class = max((len(v) for v in samples.values()), default=0) or 1
    cells: List[Tuple[bytes, str]] = []
    columns = per_class * (2 if len(samples) > 12 else 1)
    for name, images in samples.items():
        row = [(img, name) for img in images] + [(b"", "")] * (per_class - len(images))
        cells.extend(row)
    return plot_image_grid(cells, columns, "Training images per class")


def plot_mistakes(mistakes: Sequence[Mistake], columns: int = 6) -> bytes:
    cells = [(m.image, f"true {m.true}\npred {m.predicted} ({m.confidence:.2f})") for m in mistakes]
    return plot_image_grid(cells, min(columns, max(1, len(cells))),
                           "Misclassified evaluation images (most confident first)",
                           color_fn=lambda i: "darkred")


def _overlay(image, ids, colours, alpha: float = 0.5):
    """``image`` with each non-background class id painted in its colour; void (-1) hatched grey."""
    import numpy as np

    out = image.astype(np.float64)
    for class_id, colour in enumerate(colours):
        if colour is None:
            continue
        sel = ids == class_id
        out[sel] = (1 - alpha) * out[sel] + alpha * np.array(colour, dtype=np.float64)
    out[ids < 0] = 0.5 * out[ids < 0] + 0.5 * 128.0
    return out.astype(np.uint8)


def plot_overlays(overlays: Sequence[Overlay], classes: Sequence[str]) -> bytes:
    """One row per image: input | ground truth | prediction (class colours over the input)."""
    import numpy as np
    from PIL import Image

    palette = [(255, 40, 40), (40, 200, 255), (255, 220, 0), (160, 60, 255), (60, 255, 120)]
    # Class 0 (background) stays unpainted so the scene shows through.
    colours = [None] + [palette[(i - 1) % len(palette)] for i in range(1, len(classes))]
    fig = _figure(9, 2.6 * len(overlays) + 0.4)
    axes = fig.subplots(len(overlays), 3, squeeze=False)
    for row, o in zip(axes, overlays):
        image = np.asarray(Image.open(io.BytesIO(o.image)).convert("RGB"))
        panels = [(image, f"{o.filename}"), (_overlay(image, o.truth, colours), "ground truth (grey: void)"),
                  (_overlay(image, o.predicted, colours), f"prediction · pixel acc {o.pixel_accuracy:.4f}")]
        for ax, (pixels, title) in zip(row, panels):
            ax.imshow(pixels)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return _png(fig)


def plot_history(history: List[Dict[str, Any]]) -> bytes:
    """Loss, accuracy, learning rate and seconds per epoch, phases shaded."""
    x = list(range(1, len(history) + 1))
    fig = _figure(11, 7.5)
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0][0], "loss", [("loss", "train"), ("val_loss", "eval")], False),
        (axes[0][1], "accuracy", [("accuracy", "train"), ("val_accuracy", "eval")], False),
        (axes[1][0], "learning rate", [("learning_rate", "learning rate")], True),
        # Log scale: a phase's first epoch includes tracing and is often 100x the others.
        (axes[1][1], "seconds", [("epoch_seconds", "per epoch"), ("step_seconds", "per step")], True),
    ]
    phases = _phase_spans(history)
    for ax, title, series, log in panels:
        for key, label in series:
            values = [row.get(key, row.get("lr")) if key == "learning_rate" else row.get(key)
                      for row in history]
            points = [(xi, v) for xi, v in zip(x, values) if v is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for i, (phase, start, end) in enumerate(phases):
            ax.axvspan(start - 0.5, end + 0.5, alpha=0.08, color=f"C{i + 2}", label=phase)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return _png(fig)


def _phase_spans(history: List[Dict[str, Any]]) -> List[Tuple[str, int, int]]:
    spans: List[Tuple[str, int, int]] = []
    for i, row in enumerate(history, start=1):
        phase = str(row.get("phase", ""))
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], i)
        else:
            spans.append((phase, i, i))
    return spans


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], normalise: bool) -> bytes:
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    if normalise:
        rows = m.sum(axis=1, keepdims=True)
        m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = len(classes)
    side = min(24.0, max(5.0, 0.32 * n + 2.5))
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalise else max(1.0, m.max()))
    fig.colorbar(image, ax=ax, shrink=0.8)
    font = 9 if n <= 60 else 6 if n <= 150 else 3  # cells are >= 0.32 in (23 pt) up to 60 classes
    ax.set_xticks(range(n), labels=list(classes), rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels=list(classes), fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix, " + ("share of each true class" if normalise else "counts"))
    if n <= 30:
        threshold = (1 if normalise else max(1.0, m.max())) / 2
        for t in range(n):
            for p in range(n):
                if m[t, p]:
                    text = f"{m[t, p]:.2f}" if normalise else f"{int(m[t, p])}"
                    ax.text(p, t, text, ha="center", va="center", fontsize=font - 1,
                            color="white" if m[t, p] > threshold else "black")
    return _png(fig)


# --------------------------------------------------------------------------- gathering

def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


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
    from visiontune.components import prepare
    from visiontune.pipeline import results

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
    meta = _read_json(os.path.join(summary.model_dir, "assets.extra", "visiontune.json")) \
        if summary.model_dir else None
    classes = list(summary.classes or (meta or {}).get("classes", []))
    # ---- data
    prepared = None
    if arts.prepared_dir and os.path.exists(os.path.join(arts.prepared_dir, features.SUMMARY_FILE)):
        prepared = attempt("prepared dataset", lambda: prepare.load_result(arts.prepared_dir))
    elif arts.prepared_dir:
        problems.append(f"prepared dataset: no {features.SUMMARY_FILE} in {arts.prepared_dir}")
    classes = classes or (prepared.classes if prepared else [])
    data["classes"] = classes
    data["prepared_dir"] = arts.prepared_dir
    if prepared is not None:
        data["counts"] = prepared.counts
        data["rejects"] = [list(r) for r in prepared.rejects]
        figures["class_counts.png"] = attempt(
            "class counts figure", lambda: plot_class_counts(prepared.counts, classes))
    segmentation = (meta or {}).get("task") == "segmentation"
    data["task"] = "segmentation" if segmentation else "classification"
    if arts.train_examples_uri and classes and not segmentation:
        samples = attempt("sample images", lambda: sample_images(arts.train_examples_uri, classes))
        if samples:
            data["sample_classes"] = [c for c, v in samples.items() if v]
            figures["samples.png"] = attempt("sample images figure", lambda: plot_samples(samples))

    # ---- training
    history = _read_json(os.path.join(arts.model_run_dir, "history.json")) if arts.model_run_dir else None
    if history is None:
        problems.append("training history: no history.json from the Trainer"
                        + (f" in {arts.model_run_dir}" if arts.model_run_dir else ""))
    else:
        data["training"] = history
        if history.get("history"):
            figures["training.png"] = attempt("training curves", lambda: plot_history(history["history"]))
    data["model_run_dir"] = arts.model_run_dir
    data["component_timings"] = attempt("component timings",
                                        lambda: results.component_timings(metadata_path)) or []

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
            "confusion matrix", lambda: plot_confusion(matrix, classes, normalise=False))
        figures["confusion_normalised.png"] = attempt(
            "confusion matrix", lambda: plot_confusion(matrix, classes, normalise=True))
    if segmentation and summary.model_dir and arts.eval_examples_uri:
        overlays = attempt("segmentation overlays", lambda: segmentation_overlays(
            summary.model_dir, arts.eval_examples_uri, arts.eval_split, meta["class_values"]))
        if overlays:
            data["overlays"] = [{"filename": o.filename, "pixel_accuracy": o.pixel_accuracy}
                                for o in overlays]
            figures["overlays.png"] = attempt("overlay figure", lambda: plot_overlays(overlays, classes))
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
                figures["misclassified.png"] = attempt("misclassified figure", lambda: plot_mistakes(shown))

    # ---- model
    model = dict(meta or {})
    model.pop("classes", None)
    if summary.model_dir and os.path.isdir(summary.model_dir):
        model["saved_model_bytes"] = _dir_size(summary.model_dir)
        model["saved_model_dir"] = summary.model_dir
    data["model"] = model
    return {"data": data, "figures": {k: v for k, v in figures.items() if v}}


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1150px;color:#222;padding:0 1em;background:#fff}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
img{max-width:100%;height:auto;display:block;margin:.6em 0;border:1px solid #eee}
.ok{color:#1a7f37;font-weight:bold}.bad{color:#b42318;font-weight:bold}.muted{color:#777}
.kv td:first-child{text-align:left;color:#555}.problems{background:#fff4e5;padding:.5em 1em}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else _e(value)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _img(figures: Dict[str, bytes], name: str, alt: str) -> str:
    if name not in figures:
        return f'<p class="muted">({_e(alt)}: not available)</p>'
    b64 = base64.b64encode(figures[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}" title="{_e(name)}">'


def _table(header: Optional[Sequence[str]], rows: Sequence[Sequence[Any]], left: int = 1,
           cls: str = "") -> str:
    """A table; ``rows`` hold HTML (escape text with ``_e``), ``header`` plain text."""
    head = "" if header is None else "<tr>" + "".join(
        f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header)) + "</tr>"
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}{body}</table>'


def _kv(pairs: Sequence[Tuple[str, Any]]) -> str:
    return _table(None, [(_e(k), _e(v)) for k, v in pairs if v not in (None, "")], cls="kv")


def render_html(data: Dict[str, Any], figures: Dict[str, bytes]) -> str:
    s = data["summary"]
    classes = data.get("classes", [])
    parts: List[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>visiontune report: {_e(data['output_dir'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>visiontune run report</h1><p class='muted'>{_e(data['output_dir'])} · "
        f"built {_e(data['created'])}</p>",
    ]
    verdict = ("<span class='ok'>blessed and pushed</span>" if s["pushed"] else
               "<span class='ok'>blessed</span>, not pushed" if s["blessed"] else
               "<span class='bad'>not blessed</span>")
    segmentation = data.get("task") == "segmentation"
    headline = "pixel_accuracy" if segmentation else "sparse_categorical_accuracy"
    acc = s["metrics"].get(headline)
    shown_acc = "" if acc is None else \
        (f" · {'pixel accuracy (void excluded)' if segmentation else 'accuracy'} <b>{_num(acc)}</b> "
         f"on the <b>{_e(data['eval_split'])}</b> split")
    parts.append(f"<p>Outcome: {verdict}{shown_acc} · {len(classes)} classes</p>")
    if data["problems"]:
        parts.append("<div class='problems'><b>Parts of this report could not be built:</b><ul>"
                     + "".join(f"<li>{_e(p)}</li>" for p in data["problems"]) + "</ul></div>")

    # ---- data
    parts.append("<h2 id='data'>Data</h2>")
    counts = data.get("counts")
    if counts:
        splits = list(counts)
        rows = [[_e(c)] + [str(counts[sp].get(c, 0)) for sp in splits] for c in classes]
        if segmentation:
            parts.append("<p class='muted'>Segmentation: images whose mask has pixels of each class.</p>")
        else:
            rows.append(["<b>total</b>"] + [f"<b>{sum(counts[sp].values())}</b>" for sp in splits])
        parts.append(f"<p>Prepared dataset: <code>{_e(data.get('prepared_dir', ''))}</code></p>")
        parts.append(_table(["class"] + splits, rows))
    parts.append(_img(figures, "class_counts.png", "images per class and split"))
    parts.append(_img(figures, "samples.png", "sample training images per class"))
    if len(classes) > MAX_SAMPLE_CLASSES:
        parts.append(f"<p class='muted'>Samples of the first {MAX_SAMPLE_CLASSES} classes.</p>")
    rejects = data.get("rejects")
    if rejects is not None:
        parts.append(f"<h3>Rejected at ingest: {len(rejects)}</h3>")
        if rejects:
            parts.append(_table(["file", "reason"], [(_e(f), _e(r)) for f, r in rejects[:MAX_REJECTS_SHOWN]],
                                left=2))
            if len(rejects) > MAX_REJECTS_SHOWN:
                parts.append(f"<p class='muted'>... and {len(rejects) - MAX_REJECTS_SHOWN} more "
                             "in rejects.csv</p>")

    # ---- training
    parts.append("<h2 id='training'>Training</h2>")
    training = data.get("training")
    if training:
        history = training.get("history", [])
        params = training.get("params", {})
        parts.append(_kv([
            ("strategy", training.get("strategy")), ("precision", training.get("precision")),
            ("devices", ", ".join(training.get("devices", []))),
            ("epochs run", training.get("epochs_run", len(history))),
            ("training time", f"{training['train_seconds']:.1f} s" if "train_seconds" in training else None),
            ("parameters (total / trainable at the end)",
             f"{params.get('total', 0):,} / {params.get('trainable', 0):,}" if params else None),
        ]))
        parts.append(_img(figures, "training.png", "loss, accuracy, learning rate and time per epoch"))
        keys = [("loss", "loss"), ("accuracy", "accuracy"), ("val_loss", "eval loss"),
                ("val_accuracy", "eval accuracy"), ("learning_rate", "learning rate"),
                ("epoch_seconds", "s/epoch"), ("step_seconds", "s/step"),
                ("trainable_params", "trainable params")]
        rows = []
        for row in history:
            cells = [_e(row.get("phase", "")), _e(row.get("epoch", ""))]
            for key, _ in keys:
                v = row.get(key, row.get("lr") if key == "learning_rate" else None)
                cells.append(f"{v:.3g}" if key == "learning_rate" and v is not None else
                             f"{int(v):,}" if key == "trainable_params" and v is not None else _num(v))
            rows.append(cells)
        parts.append(_table(["phase", "epoch"] + [k[1] for k in keys], rows))
    else:
        parts.append("<p class='muted'>No training history.</p>")
    timings = data.get("component_timings") or []
    if timings:
        parts.append("<h3>Pipeline steps (newest run)</h3>")
        parts.append(_table(["component", "state", "seconds"],
                            [(_e(t["component"]), _e(t["state"]), f"{t['seconds']:.1f}") for t in timings],
                            left=2))

    # ---- evaluation
    parts.append(f"<h2 id='evaluation'>Evaluation ({_e(data['eval_split'])} split)</h2>")
    metrics = s["metrics"]
    if metrics:
        parts.append(_table(["metric", "value"], [(_e(k), _num(v)) for k, v in sorted(metrics.items())]))
    else:
        parts.append("<p class='bad'>No evaluation metrics (the Evaluator did not run or failed).</p>")
    per_class = data.get("per_class") or []
    if per_class and segmentation:
        parts.append("<h3>Per class (pixels, void excluded)</h3>")
        parts.append(_table(["class", "IoU", "precision", "recall", "F-measure"],
                            [(_e(c["name"]), _num(c["iou"]), _num(c["precision"]), _num(c["recall"]),
                              _num(c["f1"])) for c in per_class]))
    elif per_class:
        parts.append("<h3>Per class</h3>")
        parts.append(_table(["class", "precision", "recall", "F1", "support"],
                            [(_e(c["name"]), _num(c["precision"]), _num(c["recall"]), _num(c["f1"]),
                              _e(c["support"] if c["support"] is not None else ""))
                             for c in per_class]))
    if segmentation:
        overlays = data.get("overlays") or []
        parts.append("<h3>Input / ground truth / prediction</h3>")
        parts.append(f"<p>The first {len(overlays)} {_e(data['eval_split'])} images through the exported "
                     "model's <code>serving_examples</code> signature (masks at full size).</p>")
        parts.append(_img(figures, "overlays.png", "input, ground truth and predicted masks"))
    else:
        parts.append(_img(figures, "confusion_counts.png", "confusion matrix (counts)"))
        parts.append(_img(figures, "confusion_normalised.png", "confusion matrix (row-normalised)"))
    pairs = data.get("confused_pairs") or []
    if pairs:
        parts.append("<h3>Most confused (true → predicted)</h3>")
        parts.append(_table(["true", "predicted", "count", "share of true class"],
                            [(_e(t), _e(p), str(n), f"{share:.1%}") for t, p, n, share in pairs], left=2))
    mistakes = data.get("mistakes")
    if mistakes is not None:
        parts.append("<h3>Misclassified images</h3>")
        scope = (f"all {mistakes['checked']}" if mistakes["checked"] >= mistakes["total"]
                 else f"the first {mistakes['checked']} of {mistakes['total']}")
        parts.append(f"<p>{mistakes['wrong']} wrong among {scope} {_e(data['eval_split'])} examples "
                     f"(the exported model's <code>serving_examples</code> signature); "
                     f"{len(mistakes['shown'])} shown, most confident first.</p>")
        parts.append(_img(figures, "misclassified.png", "misclassified evaluation images"))
        if mistakes["shown"]:
            parts.append(_table(["file", "true", "predicted", "confidence"],
                                [(_e(m["filename"]), _e(m["true"]), _e(m["predicted"]),
                                  _num(m["confidence"], 3)) for m in mistakes["shown"]], left=3))

    # ---- blessing
    parts.append("<h2 id='blessing'>Blessing</h2>")
    parts.append(f"<p>Blessed: <b>{'yes' if s['blessed'] else 'no'}</b> · pushed: "
                 f"<b>{'yes' if s['pushed'] else 'no'}</b>"
                 + (f" to <code>{_e(s['pushed_dir'])}</code>" if s["pushed_dir"] else "") + "</p>")
    if s["reasons"]:
        parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in s["reasons"]) + "</ul>")
    baseline = s["baseline_metrics"]
    if baseline:
        names = sorted(set(metrics) | set(baseline))
        rows = []
        for k in names:
            new, old = metrics.get(k), baseline.get(k)
            diff = new - old if new is not None and old is not None else None
            rows.append((_e(k), _num(new), _num(old), "" if diff is None else f"{diff:+.4f}"))
        parts.append("<p>Compared with the baseline (the last blessed model):</p>")
        parts.append(_table(["metric", "this model", "baseline", "change"], rows))
    else:
        parts.append("<p class='muted'>No baseline: no model had been blessed before this one.</p>")

    # ---- model
    parts.append("<h2 id='model'>Model</h2>")
    model = data.get("model") or {}
    params = model.get("params") or {}
    parts.append(_kv([
        ("backbone", model.get("backbone")), ("width multiplier (alpha)", model.get("alpha")),
        ("weights", model.get("weights")),
        ("input size", f"{model['image_size']} × {model['image_size']} px"
         if model.get("image_size") else None),
        ("parameters, total", f"{params['total']:,}" if "total" in params else None),
        ("parameters, trainable", f"{params['trainable']:,}" if "trainable" in params else None),
        ("parameters, non-trainable", f"{params['non_trainable']:,}" if "non_trainable" in params else None),
        ("SavedModel size", _size(model["saved_model_bytes"]) if "saved_model_bytes" in model else None),
        ("SavedModel", model.get("saved_model_dir")),
        ("signatures", ", ".join(model.get("signatures", []))),
    ]))
    parts.append("</body></html>")
    return "\n".join(parts)


def is_current(output_dir: str, summary: Dict[str, Any]) -> bool:
    """Whether ``<output_dir>/report`` was built for a run with exactly this outcome and no problems."""
    data = _read_json(os.path.join(output_dir, REPORT_DIR, DATA_FILE))
    return bool(data) and not data.get("problems") and data.get("summary") == json.loads(
        json.dumps(summary, default=str)) and os.path.exists(os.path.join(output_dir, REPORT_DIR, INDEX_FILE))


def write_report(output_dir: str, report_dir: str = "", max_eval_examples: int = MAX_EVAL_EXAMPLES) -> str:
    """Builds the report of the run in ``output_dir``; returns the path of ``index.html``."""
    output_dir = resolve_output_dir(output_dir)
    report_dir = os.path.abspath(report_dir or os.path.join(output_dir, REPORT_DIR))
    built = gather(output_dir, max_eval_examples=max_eval_examples)
    data, figures = built["data"], built["figures"]
    os.makedirs(report_dir, exist_ok=True)
    for old in glob.glob(os.path.join(report_dir, "*.png")):
        os.remove(old)  # figures of an earlier report that this one lacks must not linger
    for name, png in figures.items():
        with open(os.path.join(report_dir, name), "wb") as f:
            f.write(png)
    with open(os.path.join(report_dir, DATA_FILE), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    index = os.path.join(report_dir, INDEX_FILE)
    with open(index, "w", encoding="utf-8") as f:
        f.write(render_html(data, figures))
    return index
