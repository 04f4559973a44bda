"""The comparison's tables as text: the main table's cells, per-class F1, the notes, and ``compare.md``."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from visiontune.pipeline.formatting import fmt, size, thousands

TABLE_COLUMNS = ["backbone", "weights", "input px", "epochs", "total params", "trainable params",
                 "time/step", "time/epoch", "total train time", "accuracy", "macro-F1",
                 "model size", "latency (1 image)"]
ACCURACY_COLUMN = TABLE_COLUMNS.index("accuracy")
WEIGHTS_COLUMN = TABLE_COLUMNS.index("weights")


def table_cells(row: Dict[str, Any]) -> List[str]:
    """The main table's cells of a row, as plain text (Markdown and HTML alike)."""
    if row.get("error") and row.get("accuracy") is None:
        return [row["label"], row["weights"], thousands(row.get("image_size"))] + \
            [""] * (len(TABLE_COLUMNS) - 4) + [f"failed: {row['error']}"]
    return [
        row["label"], row["weights"], thousands(row.get("image_size")), thousands(row.get("epochs")),
        thousands(row.get("params_total")), thousands(row.get("params_trainable")),
        fmt(None if row.get("step_seconds") is None else row["step_seconds"] * 1000, "{:.0f} ms"),
        fmt(row.get("epoch_seconds"), "{:.1f} s"), fmt(row.get("train_seconds"), "{:.0f} s"),
        fmt(row.get("accuracy"), "{:.4f}"), fmt(row.get("macro_f1"), "{:.4f}"),
        size(row["model_bytes"]) if row.get("model_bytes") is not None else "",
        fmt(row.get("latency_ms"), "{:.1f} ms"),
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


def notes(data: Dict[str, Any]) -> List[str]:
    """What the figures mean, one note a line (code in backticks, as Markdown)."""
    lines = [
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
        lines.append("trained by an earlier compare into this folder (Trainer cached; its timings are "
                     "from then): " + ", ".join(cached))
    if any(r.get("weights_fallback") for r in data["rows"]):
        lines.append("weights `none (...)`: the requested weights could not be used; "
                     "the backbone trained from scratch")
    return lines


def render_markdown(data: Dict[str, Any]) -> str:
    parts = [f"Machine: {data['machine']} (load before/after {data['load']['before']} / "
             f"{data['load']['after']}); {data['created'][:10]}; compare wall time "
             f"{data['wall_seconds']:.0f} s.", ""]
    if data.get("command"):
        parts += ["    " + data["command"], ""]
    parts.append(_md_table(TABLE_COLUMNS, [table_cells(r) for r in data["rows"]]))
    parts.append("")
    parts += [f"* {n}" for n in notes(data)]
    labels, per_class = per_class_rows(data)
    if labels:
        parts += ["", "Per-class F1:", ""]
        parts.append(_md_table(["class"] + labels,
                               [[c] + [fmt(v, "{:.3f}") for v in vals]
                                for c, vals in zip(data["classes"], per_class)]))
    return "\n".join(parts) + "\n"
