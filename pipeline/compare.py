"""``visiontune compare``: one config, several backbones, one comparison report.

Each backbone is a run of the *same* pipeline (same ``pipeline.name``, one
metadata database under ``<compare dir>/pipeline``), so TFX's cache serves
ImportExampleGen, StatisticsGen, SchemaGen, ExampleValidator and Transform to
every backbone after the first that shares its input size (Transform's
``custom_config`` holds the image size); only Trainer, Evaluator and Pusher run
again.  A second ``compare`` into the same folder with the same settings also
reuses the Trainers: add a backbone and only that one trains.

Blessing and pushing: every backbone runs with ``evaluation.max_regression:
1`` so that it is blessed on the accuracy floor alone, not on how it compares
with the backbone that ran before it (a baseline would be the last blessed
model of *any* backbone).  With no regression gate the pipeline has no
Resolver and the Evaluator scores the backbone's model alone
(``components.evaluation.has_regression_gate``): half the Evaluator's work,
and a re-run reuses every trained backbone's evaluation.  Blessed models are
pushed to ``<compare dir>/serving/<model_name>_<label>/``: one servable model
per backbone, the user's serving dir untouched.

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
recall 1 and precision = its prevalence instead of 0; both are in the JSON),
the SavedModel's size on disk, and the median latency of one
``serving_default`` call with one encoded image, measured in process after
every backbone has trained, backbones interleaved call by call.

Writes ``compare.html`` (self-contained), ``compare.json`` and ``compare.md``.

This module is the entry point; the pieces are ``compare_specs`` (the
``--backbones`` list), ``compare_plan`` (configs and weights, before anything
trains), ``compare_runs`` (running each backbone, reading its row back,
latency), ``compare_tables`` (the tables as text, ``compare.md``) and
``compare_html`` (the page, from ``templates/compare.html``).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

from visiontune.pipeline import figures as plots, machine
from visiontune.pipeline.compare_html import COMPONENTS, render_html
from visiontune.pipeline.compare_plan import (
    DOWNLOAD_TIMEOUT_S,
    NO_IMAGENET,
    PIPELINE_DIR,
    SERVING_DIR,
    Plan,
    default_output_dir,
    plan_comparison,
    probe_weights,
)
from visiontune.pipeline.compare_runs import (
    DEFAULT_LATENCY_RUNS,
    LATENCY_WARMUP,
    measure_latency,
    read_backbone_run,
    run_backbone,
    sample_image,
    training_figures,
)
from visiontune.pipeline.compare_specs import (
    BackboneSpec,
    CompareError,
    parse_backbones,
    parse_spec,
    split_top_level,
)
from visiontune.pipeline.compare_tables import TABLE_COLUMNS, per_class_rows, render_markdown, table_cells

__all__ = [
    "HTML_FILE", "JSON_FILE", "MARKDOWN_FILE", "run_comparison", "write_outputs",
    "CompareError", "BackboneSpec", "parse_spec", "parse_backbones", "split_top_level",
    "Plan", "plan_comparison", "probe_weights", "default_output_dir",
    "PIPELINE_DIR", "SERVING_DIR", "DOWNLOAD_TIMEOUT_S", "NO_IMAGENET",
    "run_backbone", "read_backbone_run", "training_figures", "measure_latency", "sample_image",
    "DEFAULT_LATENCY_RUNS", "LATENCY_WARMUP",
    "TABLE_COLUMNS", "table_cells", "per_class_rows", "render_markdown", "render_html", "COMPONENTS",
]

logger = logging.getLogger("visiontune.compare")

HTML_FILE = "compare.html"
JSON_FILE = "compare.json"
MARKDOWN_FILE = "compare.md"


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


def write_outputs(data: Dict[str, Any], output_dir: str) -> Dict[str, str]:
    """Writes compare.json, compare.md and compare.html; returns their paths."""
    figures = {}
    try:
        png = plots.plot_accuracy_latency(data["rows"])
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
