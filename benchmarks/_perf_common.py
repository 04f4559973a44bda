"""Shared helpers of the issue-7 performance benchmarks (ingest, input pipeline, trainer, evaluator).

Every script measures its figures side by side in one process, records the
load average next to each result (the machines are shared and noisy), and
appends rows to its own table in the "Performance (issue 7)" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from visiontune.pipeline import machine as machine_lib  # noqa: E402

SHARED = os.environ.get("VISIONTUNE_SHARED") or os.path.join(os.path.dirname(REPO), "shared")
FLOWERS = os.path.join(SHARED, "datasets", "flowers")
GTSRB = os.path.join(SHARED, "datasets", "gtsrb")
MOBILENET_V2_035 = os.path.join(
    SHARED, "weights", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
SECTION = "## Performance (issue 7)"
SECTION_INTRO = """
Ratios measured side by side in one process (the machines are shared and
noisy); each row gives the median of repeated runs and the 1-minute load
average (`os.getloadavg()`) when it was taken, over the number of cores.
Scripts: `benchmarks/ingest.py`, `benchmarks/input_pipeline.py`,
`benchmarks/trainer_overhead.py`, `benchmarks/evaluator.py`.
"""


def require(path: str) -> str:
    if not os.path.exists(path):
        raise SystemExit(f"needs {path} (../shared, or set VISIONTUNE_SHARED); see ../shared/README.md")
    return path


def load() -> str:
    return machine_lib.load_average()


def saved_model_bytes(model_dir: str) -> int:
    """A SavedModel's own size: its graph and variables (not ``assets.extra``: TFLite files, warm-up requests)."""
    import glob

    paths = [os.path.join(model_dir, "saved_model.pb")] + glob.glob(os.path.join(model_dir, "variables", "*"))
    return sum(os.path.getsize(p) for p in paths)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    return machine_lib.describe()


def command() -> str:
    return " ".join(["benchmarks/" + os.path.basename(sys.argv[0])] + sys.argv[1:])


def today() -> str:
    return str(datetime.date.today())


def append_rows(title: str, intro: str, header: str, rows: Sequence[str]) -> None:
    """Adds rows to the table under ``### title`` (created, with the section, if missing)."""
    path = os.path.join(REPO, "BENCHMARKS.md")
    marker = f"<!-- perf:{title} rows -->"
    text = open(path).read()
    if marker not in text:
        if SECTION not in text:
            text = text.rstrip("\n") + "\n\n" + SECTION + "\n" + SECTION_INTRO
        ncols = header.count("|") - 1
        text = (text.rstrip("\n") + f"\n\n### {title}\n\n{intro.strip()}\n\n{header}\n"
                + "|" + "---|" * ncols + "\n" + marker + "\n")
    text = text.replace(marker, "\n".join(rows) + "\n" + marker, 1)
    open(path, "w").write(text)


def publish(title: str, intro: str, header: str, rows: Sequence[str], report=None, write: bool = True) -> None:
    """A benchmark's ending: prints ``report`` (as JSON) and the rows, then appends the rows unless not ``write``."""
    if report is not None:
        print(json.dumps(report, indent=2))
    print("\n".join(rows))
    if write:  # --no-write: a trial run leaves BENCHMARKS.md as it is
        append_rows(title, intro, header, rows)


def quality_arguments(doc: str, config_name: str, argv=None):
    """The quality scripts' command line: --config (default ``configs/CONFIG_NAME``), --set, --note, --no-write."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", config_name))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--note", default="", help="what this run changes, for the table")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    return parser.parse_args(argv)


def run_pipeline(config_path: str, overrides: Sequence[str]):
    """Runs ``visiontune run`` in process: (config, summary, wall seconds, "Component Ns, ..." text)."""
    import time

    from visiontune import configs
    from visiontune.pipeline import local_runner, run_metadata

    config = configs.load_config(config_path, overrides)
    start = time.time()
    summary = local_runner.run(config)
    wall = time.time() - start
    timings = run_metadata.component_timings(local_runner.metadata_path(config))
    per_component = ", ".join(f"{t['component']} {t['seconds']:.0f}s" for t in timings
                              if t["seconds"] >= 0.5)
    return config, summary, wall, per_component


def insert_row(marker: str, row: str, section: str = "") -> None:
    """Puts ``row`` before the ``marker`` line of BENCHMARKS.md (the end of a table).

    A missing marker: ``section`` (a heading, text and table ending in the marker) is appended first, or,
    without one, the script stops.
    """
    path = os.path.join(REPO, "BENCHMARKS.md")
    text = open(path).read()
    if marker not in text and section:
        text = text.rstrip("\n") + "\n" + section
    if marker not in text:
        raise SystemExit(f"{path}: no {marker!r} line to insert before")
    open(path, "w").write(text.replace(marker, row + "\n" + marker, 1))
