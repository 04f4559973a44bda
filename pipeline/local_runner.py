"""Runs the pipeline on this machine with LocalDagRunner and SQLite ML Metadata.

Everything of a run lives under ``pipeline.output_dir``: the artifacts, the
metadata database (``metadata.sqlite``) and the Trainer's resume state.  Run it
again with the same settings and unchanged inputs and every component is a
cache hit; kill it and run it again and the Trainer resumes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

from tfx import v1 as tfx

from visiontune import configs, features
from visiontune.components import ingest_beam, prepare as prepare_lib
from visiontune.pipeline import pipeline as pipeline_lib, progress, results

logger = logging.getLogger(__name__)


def beam_args(workers: int) -> List[str]:
    """DirectRunner options: in-memory with one worker is fastest for small data.

    Several workers need the multi-processing mode (separate interpreters), whose
    start-up only pays off on large datasets.  No TFX sdist (``ingest_beam``).
    """
    return ingest_beam.direct_runner_args(workers)


def metadata_path(config: configs.Config) -> str:
    return os.path.join(os.path.abspath(config.pipeline.output_dir), features.METADATA_DB_FILE)


def ensure_prepared(config: configs.Config, force: bool = False) -> prepare_lib.PrepareResult:
    """Prepares the dataset unless ``prepared_dir`` already holds a finished one."""
    data = config.data
    segmentation = configs.segmentation_settings(config)
    if not data.prepared_dir:
        raise configs.ConfigError("data.prepared_dir: not set (where the TFRecords go)")
    if not force and prepare_lib.is_prepared(data.prepared_dir, data if data.source else None,
                                             segmentation):
        return prepare_lib.load_result(data.prepared_dir)
    if not data.source:
        raise configs.ConfigError(
            f"data.prepared_dir {data.prepared_dir} holds no prepared dataset and data.source is not set")
    return prepare_lib.prepare_dataset(data, segmentation=segmentation)


def ingest_workers(config: configs.Config) -> int:
    """The most workers ImageExampleGen may use: the image count is known only once it has listed
    its sources, so its executor narrows this to one below ``AUTO_PARALLEL_MIN_IMAGES`` (same rule)."""
    return ingest_beam.ingest_workers(config.data.workers, ingest_beam.AUTO_PARALLEL_MIN_IMAGES)


def create_local_pipeline(config: configs.Config,
                          prepared: Optional[prepare_lib.PrepareResult] = None) -> tfx.dsl.Pipeline:
    """The pipeline over ``config.data.source``'s images, or over the ``prepared`` TFRecords.

    ImageExampleGen runs with ``data.workers`` Beam workers (multi-processing
    above 1: the work is per image and CPU-bound); the other Beam components
    with ``pipeline.beam_workers``.
    """
    output_dir = os.path.abspath(config.pipeline.output_dir)
    return pipeline_lib.create_pipeline(
        config, prepared.classes if prepared is not None else None,
        pipeline_root=output_dir,
        has_test_split=(prepared is not None and "test" in prepared.counts
                        and sum(prepared.counts["test"].values()) > 0),
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            metadata_path(config)),
        beam_pipeline_args=beam_args(config.pipeline.beam_workers),
        ingest_beam_args=beam_args(ingest_workers(config)),
    )


def run_pipeline(pipeline: tfx.dsl.Pipeline) -> None:
    """Runs every component in this process, one line each as it starts and ends (``progress``)."""
    progress.ProgressLocalDagRunner().run(pipeline)


def run(config: configs.Config, force_prepare: bool = False) -> results.RunSummary:
    """Runs every component (from the images, or from TFRecords prepared first if needed).

    Returns what happened.
    """
    if config.data.example_gen == "images":
        if force_prepare:
            raise configs.ConfigError("--prepare: only with data.example_gen 'tfrecords'; with images, "
                                      "ImageExampleGen reads the sources again whenever a file changes")
        if not config.data.source:
            raise configs.ConfigError("data.source: not set (the images the pipeline reads; or set "
                                      "data.example_gen to 'tfrecords' to read data.prepared_dir)")
        prepared = None
    else:
        prepared = ensure_prepared(config, force=force_prepare)
    os.makedirs(config.pipeline.output_dir, exist_ok=True)
    logger.info("running pipeline %s into %s", config.pipeline.name, config.pipeline.output_dir)
    run_pipeline(create_local_pipeline(config, prepared))
    summary = results.summarize_run(metadata_path(config))
    # The newest run's outcome, for people and for reports built later.
    with open(os.path.join(config.pipeline.output_dir, features.RUN_SUMMARY_FILE), "w") as f:
        json.dump(summary.to_json(), f, indent=2)
    write_report(config.pipeline.output_dir, summary.to_json())
    return summary


def write_report(output_dir: str, summary: Optional[dict] = None) -> Optional[str]:
    """The run's HTML report (``<output_dir>/report/``); a failure is a warning, not a failed run.

    With the run's ``summary``, an existing report of exactly that outcome (a
    re-run where every component was cached) is kept rather than rebuilt: the
    rebuild re-runs the model over the evaluation split for its mistakes grid.
    """
    from visiontune.pipeline import report

    log = logging.getLogger("visiontune.report")
    if summary is not None and report.is_current(output_dir, summary):
        index = os.path.join(output_dir, report.REPORT_DIR, report.INDEX_FILE)
        log.info("report (unchanged run): %s", index)
        return index
    try:
        index = report.write_report(output_dir)
    except Exception as e:  # noqa: BLE001 - the model is trained and pushed: keep the run's outcome
        log.warning("could not write the run report into %s: %s: %s",
                    os.path.join(output_dir, report.REPORT_DIR), type(e).__name__, e)
        return None
    log.info("report: %s", index)
    return index
