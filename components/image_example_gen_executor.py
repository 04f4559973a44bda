"""ImageExampleGen's executor: listing here, then encoding and writing on Beam workers.

The listing (``ingest_plan.plan_ingest``: sources, classes, splits, the checks
that refuse an unusable dataset) is metadata only and runs in the executor.
The work on pixels runs on Beam, one element per output shard
(``components.ingest_beam``, which says why), into gzipped TFRecords named as
TFX's ExampleGens name theirs (``Split-train/data_tfrecord-00000-of-00004.gz``):
each holds the records ``visiontune prepare`` writes, in the same order.
Then the executor refuses a dataset whose split was emptied by rejects, and
writes ``classes.txt``, ``rejects.csv`` and ``summary.json`` into the other
two artifacts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from apache_beam.io.filesystems import FileSystems
from tfx.components.example_gen import write_split
from tfx.components.util import examples_utils
from tfx.dsl.components.base import base_beam_executor
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils

from visiontune import configs, features
from visiontune.components import ingest_artifacts, ingest_beam, ingest_plan

DATA_KEY = "data"
SEGMENTATION_KEY = "segmentation"
FINGERPRINT_KEY = "input_fingerprint"
EXAMPLES_KEY = "examples"
CLASSES_KEY = "classes"
REPORT_KEY = "report"


class Executor(base_beam_executor.BaseBeamExecutor):
    """Lists, then encodes and writes on Beam; then checks and records what was written."""

    def _workers_when_local(self, workers: int) -> None:
        """On the DirectRunner, this run's Beam pipeline with ``workers`` (1: in memory; later options win)."""
        runner = next((a.split("=", 1)[1] for a in self._beam_pipeline_args if a.startswith("--runner=")), "")
        if runner in ("", "DirectRunner", "direct"):
            self._beam_pipeline_args = list(self._beam_pipeline_args) + ingest_beam.direct_runner_args(workers)

    def Do(self, input_dict: Dict[str, List[Any]], output_dict: Dict[str, List[Any]],
           exec_properties: Dict[str, Any]) -> None:
        data = configs.from_dict(configs.DataConfig, json.loads(exec_properties[DATA_KEY]), "data")
        segmentation = None
        if exec_properties.get(SEGMENTATION_KEY):
            segmentation = configs.from_dict(configs.SegmentationConfig,
                                             json.loads(exec_properties[SEGMENTATION_KEY]), "segmentation")
        plan = ingest_plan.plan_ingest(data, segmentation)
        examples = artifact_utils.get_single_instance(output_dict[EXAMPLES_KEY])
        examples.split_names = artifact_utils.encode_split_names(plan.splits)
        split_uri = {s: artifact_utils.get_split_uri([examples], s) for s in plan.splits}

        def shard_path(split: str, index: int, count: int) -> str:
            return os.path.join(split_uri[split], ingest_beam.example_gen_shard_file(index, count))

        tasks = ingest_beam.shard_tasks(plan.items, plan.splits, data.num_shards, shard_path)
        for uri in split_uri.values():
            FileSystems.mkdirs(uri)
        # The pipeline's options hold the most workers the settings allow; the
        # count of images and shards, known only now, can narrow it.
        self._workers_when_local(ingest_beam.ingest_workers(data.workers, len(plan.items), len(tasks)))
        outcome_path = os.path.join(self._get_tmp_dir(), "ingest_outcome.json")
        manifest_dir = os.path.join(self._get_tmp_dir(), "shards")
        shards = ingest_beam.write_manifests(tasks, manifest_dir)
        del tasks  # the manifests hold the shards' lists now
        class_values = ([list(v) for v in segmentation.class_values] if segmentation is not None else None)
        with self._make_beam_pipeline() as pipeline:
            _ = pipeline | "Ingest" >> ingest_beam.EncodeAndWrite(shards, manifest_dir, outcome_path,
                                                                  data.max_file_bytes, data.max_pixels,
                                                                  class_values)
        counts, totals, encode_rejects = ingest_beam.read_outcome(outcome_path, plan.classes, plan.splits,
                                                                  segmentation is not None)
        ingest_plan.check_written(data, plan.items, encode_rejects, counts, totals, plan.task,
                              "the examples are not published")
        rejects = plan.rejects + encode_rejects
        files = ingest_plan.metadata_files(plan.classes, counts, rejects,
                                       ingest_plan.settings_fingerprint(data, segmentation),
                                       totals, plan.task, plan.hidden)
        classes_uri = artifact_utils.get_single_uri(output_dict[CLASSES_KEY])
        report_uri = artifact_utils.get_single_uri(output_dict[REPORT_KEY])
        ingest_artifacts.write_files(classes_uri, {features.CLASSES_FILE: files[features.CLASSES_FILE]})
        ingest_artifacts.write_files(report_uri, {name: files[name] for name in
                                                  (features.REJECTS_FILE, features.SUMMARY_FILE)})

        examples_utils.set_payload_format(examples, example_gen_pb2.PayloadFormat.FORMAT_TF_EXAMPLE)
        examples_utils.set_file_format(examples, write_split.to_file_format_str(
            example_gen_pb2.FileFormat.FORMAT_TFRECORDS_GZIP))
        examples.set_string_custom_property(FINGERPRINT_KEY, exec_properties.get(FINGERPRINT_KEY) or "")
        artifact_utils.get_single_instance(output_dict[CLASSES_KEY]).set_int_custom_property(
            "num_classes", len(plan.classes))
        report = artifact_utils.get_single_instance(output_dict[REPORT_KEY])
        report.set_int_custom_property("rejects", len(rejects))
        for split in plan.splits:
            report.set_int_custom_property(f"{split}_examples", totals[split])
