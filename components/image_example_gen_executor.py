"""ImageExampleGen's executor: listing here, then encoding and writing on Beam workers.

The listing (``prepare.plan_ingest``: sources, classes, splits, the checks
that refuse an unusable dataset) is metadata only and runs in the executor.
The work on pixels runs on Beam with one element per output shard: a worker
reads, checks and re-encodes that shard's images one at a time, in path
order, and streams them into the shard's file.  Why one element a shard:

* byte-for-byte reproducible output needs a fixed record order inside each
  file, which Beam's shuffling sinks do not keep (TFX's own ExampleGen writer
  reshuffles); each file's records are in relative-path order, as
  ``visiontune prepare`` writes them, whatever the runner and worker count;
* memory stays flat as the dataset grows: a worker holds one image at a time,
  never a whole shard or split;
* the parallelism is the number of shards (``data.num_shards`` per split):
  raise it for more Dataflow workers.

Files are written through Beam's ``FileSystems`` (local or ``gs://``) under a
temporary name and renamed into place, gzipped TFRecords named as TFX's
ExampleGens name theirs (``Split-train/data_tfrecord-00000-of-00004.gz``),
records framed by Beam's TFRecord coder.  Per-split and per-class counts and
the rejects come back through small Beam combines; then the executor refuses
a dataset whose split was emptied by rejects, and writes ``classes.txt``,
``rejects.csv`` and ``summary.json`` into the other two artifacts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil
from tfx.components.example_gen import write_split
from tfx.components.util import examples_utils
from tfx.dsl.components.base import base_beam_executor
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils

from visiontune import configs, features
from visiontune.components import ingest_artifacts, prepare
from visiontune.components.image_encoding import encode_example
from visiontune.components.shard_writer import shard_index

DATA_KEY = "data"
SEGMENTATION_KEY = "segmentation"
FINGERPRINT_KEY = "input_fingerprint"
EXAMPLES_KEY = "examples"
CLASSES_KEY = "classes"
REPORT_KEY = "report"
_REJECTS, _TOTALS = "rejects", "totals"


def shard_file(index: int, count: int) -> str:
    return f"{write_split.DEFAULT_TF_RECORD_FILE_NAME}-{index:05d}-of-{count:05d}.gz"


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One output file and the images that go into it, in the order they are written."""

    split: str
    path: str
    # (position in the whole listing, path, relpath, label, mask path)
    entries: Tuple[Tuple[int, str, str, str, str], ...]


def shard_tasks(plan: prepare.IngestPlan, num_shards: int, split_uri) -> List[ShardTask]:
    """Every output file of every split (empty ones too), with its images in relative-path order."""
    items = sorted(plan.items, key=lambda i: (plan.splits.index(i.split), i.relpath))
    tasks = []
    for split in plan.splits:
        listed = [(n, i) for n, i in enumerate(items) if i.split == split]
        count = max(1, min(num_shards, len(listed)))
        shards: List[List[Tuple[int, str, str, str, str]]] = [[] for _ in range(count)]
        for position, item in listed:
            shards[shard_index(item.relpath, count)].append(
                (position, item.path, item.relpath, item.label, item.mask))
        tasks += [ShardTask(split, os.path.join(split_uri(split), shard_file(index, count)), tuple(entries))
                  for index, entries in enumerate(shards)]
    return tasks


class WriteShard(beam.DoFn):
    """Encodes a shard's images one by one into its file.

    Main output: ``(split, label)`` once per label an image counts for;
    tagged ``totals``: the split of each image written; tagged ``rejects``:
    ``(position, path, reason)`` of each image refused.
    """

    def __init__(self, max_file_bytes: int, max_pixels: int, class_values: Optional[Sequence] = None):
        self._limits = (max_file_bytes, max_pixels)
        self._class_values = class_values
        self._written = beam.metrics.Metrics.counter("visiontune.ingest", "images_written")
        self._rejected = beam.metrics.Metrics.counter("visiontune.ingest", "images_rejected")

    def process(self, task: ShardTask) -> Iterator[Any]:
        incomplete = task.path + ".incomplete"
        with FileSystems.create(incomplete, compression_type=CompressionTypes.GZIP) as f:
            for position, path, relpath, label, mask in task.entries:
                example, reason, labels = encode_example(path, relpath, label, mask, *self._limits,
                                                         class_values=self._class_values)
                if example is None:
                    self._rejected.inc()
                    yield beam.pvalue.TaggedOutput(_REJECTS, (position, path, reason))
                    continue
                _TFRecordUtil.write_record(f, example)
                self._written.inc()
                yield beam.pvalue.TaggedOutput(_TOTALS, task.split)
                for name in labels:
                    yield task.split, name
        FileSystems.rename([incomplete], [task.path])


def _write_outcome(_, path: str, counts, totals, rejects) -> None:
    """The combines' results in one small JSON file, read back by the executor."""
    outcome = {"counts": [[s, c, n] for (s, c), n in sorted(counts)],
               "totals": sorted(totals), "rejects": sorted(rejects)}
    with FileSystems.create(path) as f:
        f.write(json.dumps(outcome).encode("utf-8"))


@beam.ptransform_fn
def EncodeAndWrite(pipeline: beam.Pipeline, tasks: Sequence[ShardTask], outcome_path: str,
                   max_file_bytes: int, max_pixels: int, class_values: Optional[Sequence] = None):
    """Writes every shard; the counts and rejects go to ``outcome_path``."""
    results = (pipeline
               | "Shards" >> beam.Create(tasks)
               | "Spread" >> beam.Reshuffle()
               | "Write" >> beam.ParDo(WriteShard(max_file_bytes, max_pixels, class_values))
               .with_outputs(_REJECTS, _TOTALS, main="labels"))
    counts = results.labels | "CountLabels" >> beam.combiners.Count.PerElement()
    totals = results[_TOTALS] | "CountImages" >> beam.combiners.Count.PerElement()
    return (pipeline
            | "One" >> beam.Create([None])
            | "Outcome" >> beam.Map(_write_outcome, outcome_path,
                                    counts=beam.pvalue.AsList(counts), totals=beam.pvalue.AsList(totals),
                                    rejects=beam.pvalue.AsList(results[_REJECTS])))


class Executor(base_beam_executor.BaseBeamExecutor):
    """Lists, then encodes and writes on Beam; then checks and records what was written."""

    def Do(self, input_dict: Dict[str, List[Any]], output_dict: Dict[str, List[Any]],
           exec_properties: Dict[str, Any]) -> None:
        data = configs.from_dict(configs.DataConfig, json.loads(exec_properties[DATA_KEY]), "data")
        segmentation = None
        if exec_properties.get(SEGMENTATION_KEY):
            segmentation = configs.from_dict(configs.SegmentationConfig,
                                             json.loads(exec_properties[SEGMENTATION_KEY]), "segmentation")
        plan = prepare.plan_ingest(data, segmentation)
        examples = artifact_utils.get_single_instance(output_dict[EXAMPLES_KEY])
        examples.split_names = artifact_utils.encode_split_names(plan.splits)
        tasks = shard_tasks(plan, data.num_shards, lambda s: artifact_utils.get_split_uri([examples], s))
        for split in plan.splits:
            FileSystems.mkdirs(artifact_utils.get_split_uri([examples], split))
        outcome_path = os.path.join(self._get_tmp_dir(), "ingest_outcome.json")
        class_values = ([list(v) for v in segmentation.class_values] if segmentation is not None else None)
        with self._make_beam_pipeline() as pipeline:
            _ = pipeline | "Ingest" >> EncodeAndWrite(tasks, outcome_path, data.max_file_bytes,
                                                      data.max_pixels, class_values)
        with FileSystems.open(outcome_path) as f:
            outcome = json.loads(f.read().decode("utf-8"))

        counts = {s: {c: 0 for c in plan.classes} for s in plan.splits}
        for split, label, n in outcome["counts"]:
            name = plan.classes[int(label)] if segmentation is not None else label
            counts[split][name] = n
        totals = {s: 0 for s in plan.splits}
        totals.update({split: n for split, n in outcome["totals"]})
        encode_rejects = [(path, reason) for _, path, reason in outcome["rejects"]]
        prepare.check_written(data, plan.items, encode_rejects, counts, totals, plan.task,
                              "the examples are not published")
        rejects = plan.rejects + encode_rejects
        files = prepare.metadata_files(plan.classes, counts, rejects,
                                       prepare.settings_fingerprint(data, segmentation),
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
