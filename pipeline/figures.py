"""The report's and the comparison's figures, drawn with matplotlib's Agg canvas, as PNG bytes.

Class counts, sample and misclassified images, segmentation overlays,
training curves and confusion matrices (the run report); accuracy against
latency (the comparison).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from visiontune.pipeline.report_examples import Mistake, Overlay

THUMBNAIL = 96  # px, the longer side of an image in a grid


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas: no display, no global state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def thumbnail(image_bytes: bytes, size: int = THUMBNAIL):
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    image.thumbnail((size, size))
    return np.asarray(image)


def plot_class_counts(counts: Dict[str, Dict[str, int]], classes: Sequence[str]) -> bytes:
    import numpy as np

    splits = [s for s in counts if sum(counts[s].values())]
    n = len(classes)
    fig = new_figure(10, max(3.0, 0.22 * n * max(1, len(splits)) / 1.5 + 1.5))
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
    return to_png(fig)


def plot_image_grid(cells: List[Tuple[bytes, str]], columns: int, title: str,
                    color_fn=None) -> bytes:
    """A grid of (image bytes, caption) cells."""
    rows = max(1, -(-len(cells) // columns))
    fig = new_figure(1.6 * columns, 1.85 * rows + 0.4)
    fig.suptitle(title)
    for i, (image, caption) in enumerate(cells):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.axis("off")
        try:
            ax.imshow(thumbnail(image))
        except Exception:  # noqa: BLE001 - an undecodable image is shown as its caption only
            pass
        ax.set_title(caption, fontsize=7, color=color_fn(i) if color_fn else "black")
    return to_png(fig)


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
    fig = new_figure(9, 2.6 * len(overlays) + 0.4)
    axes = fig.subplots(len(overlays), 3, squeeze=False)
    for row, o in zip(axes, overlays):
        image = np.asarray(Image.open(io.BytesIO(o.image)).convert("RGB"))
        panels = [(image, f"{o.filename}"), (_overlay(image, o.truth, colours), "ground truth (grey: void)"),
                  (_overlay(image, o.predicted, colours), f"prediction · pixel acc {o.pixel_accuracy:.4f}")]
        for ax, (pixels, title) in zip(row, panels):
            ax.imshow(pixels)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return to_png(fig)


def plot_history(history: List[Dict[str, Any]]) -> bytes:
    """Loss, accuracy, learning rate and seconds per epoch, phases shaded."""
    x = list(range(1, len(history) + 1))
    fig = new_figure(11, 7.5)
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
    return to_png(fig)


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
    fig = new_figure(side + 1.2, side)
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
    return to_png(fig)



def plot_accuracy_latency(rows: Sequence[Dict[str, Any]]) -> Optional[bytes]:
    """Accuracy against single-image latency, one labelled point per backbone (None: nothing to plot)."""
    points = [(r["latency_ms"], r["accuracy"], r["label"]) for r in rows
              if r.get("latency_ms") is not None and r.get("accuracy") is not None]
    if not points:
        return None
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    for x, y, label in points:
        ax.scatter([x], [y], s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel("single-image latency, ms (median)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs latency")
    ax.grid(alpha=0.3)
    return to_png(fig)
