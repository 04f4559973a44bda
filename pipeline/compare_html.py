"""The comparison's page, ``compare.html``: the tables of ``compare_tables`` through ``templates/compare.html``."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from visiontune import features
from visiontune.pipeline import compare_tables, html_pages
from visiontune.pipeline.formatting import fmt

# The pipeline's components, the columns of the page's "Runs" table.
COMPONENTS = ("ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Transform",
              "Trainer", "Evaluator", "Pusher")


def _component_cells(row: Dict[str, Any]) -> List[str]:
    """Per component: its seconds, CACHED, or the state it ended in; then the backbone's wall time."""
    # Either ExampleGen (images or TFRecords in) is the column "ExampleGen".
    by = {("ExampleGen" if c["component"].endswith("ExampleGen") else c["component"]): c
          for c in row.get("components", [])}
    cells = []
    for name in COMPONENTS:
        c = by.get(name)
        cells.append("" if c is None else "CACHED" if c["state"] == "CACHED" else
                     f"{c['seconds']:.0f} s" if c["state"] == "COMPLETE" else c["state"])
    return cells + [fmt(row.get("run_seconds"), "{:.0f} s")]


def render_html(data: Dict[str, Any], figures: Optional[Dict[str, bytes]] = None) -> str:
    """The page of ``run_comparison``'s data; ``figures`` ({file name: PNG bytes}) are embedded."""
    valid = [r for r in data["rows"] if r.get("accuracy") is not None]
    best = max(valid, key=lambda r: r["accuracy"])["label"] if valid else None
    labels, per_class = compare_tables.per_class_rows(data)
    return html_pages.render(
        "compare.html", data=data, figures=figures or {},
        columns=compare_tables.TABLE_COLUMNS, weights_column=compare_tables.WEIGHTS_COLUMN,
        accuracy_column=compare_tables.ACCURACY_COLUMN,
        main_rows=[{"cells": compare_tables.table_cells(r), "fallback": bool(r.get("weights_fallback")),
                    "best": r["label"] == best} for r in data["rows"]],
        notes=compare_tables.notes(data),
        labels=labels,
        per_class=[(c, vals, max((v for v in vals if v is not None), default=None))
                   for c, vals in zip(data["classes"], per_class)],
        metadata_path=os.path.join(data["pipeline_dir"], features.METADATA_DB_FILE),
        components=list(COMPONENTS),
        component_rows=[[r["label"]] + _component_cells(r) for r in data["rows"]],
    )
