"""Ingest's Beam work: each output shard's images read, checked, encoded and written by one worker.

One Beam element per output shard, not per image.  Why:

* byte-for-byte reproducible output needs a fixed record order inside each
  file, which Beam's shuffling sinks do not keep (TFX's own ExampleGen writer
  reshuffles); each file's records are in relative-path order, whatever the
  runner and the worker count;
* memory stays flat as the dataset grows: a worker holds one image at a time,
  never a whole shard or split.  The listing reaches the workers as one
  manifest file per shard (JSON lines, next to the outcome file), not inside
  the pipeline graph: Dataflow refuses a job graph over 10 MB, which ImageNet's
  1.28 M paths would pass many times over, and Beam's in-memory runner would
  hold several pickled copies of it.  Counts are summed per shard, so no
  element per image travels except a reject;
* the parallelism is the number of shards (``data.num_shards`` per split):
  raise it for more Dataflow workers.

Files are written through Beam's ``FileSystems`` (local or ``gs://``) under a
temporary name and renamed into place, records framed by Beam's TFRecord
coder.  Per-split and per-class counts and the rejects come back through small
Beam combines into one JSON file, read back by ``read_outcome``.

This module is what Beam's worker processes import to run ``WriteShard``: it
imports Beam, Pillow and NumPy, not TensorFlow or TFX, so a worker starts in
a second and holds no TensorFlow runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil

from visiontune.components.image_encoding import encode_example

# ``data.workers: 0`` (all cores) runs ingest in one process below this many
# images.  The DirectRunner's multi-processing workers take about 4.5 s to start
# on 2 cores, and an image costs 0.2-0.5 ms (flowers' kept JPEGs, GTSRB's PPMs
# re-encoded as PNG), so a second worker pays for itself from about 20,000
# images (BENCHMARKS.md, "Ingest on Beam").  An explicit worker count is obeyed.
AUTO_PARALLEL_MIN_IMAGES = 20_000
# TFX packages its own installation into a temporary sdist (a copy of the tfx
# package and a `setup.py sdist` subprocess) before every Beam component runs,
# for remote workers, unless the Beam options already name the workers'
# dependencies (tfx.utils.dependency_utils.make_beam_dependency_flags).  The
# DirectRunner's workers are this machine's Python: the package is built for
# nothing, 1.7 s per Beam component (profiled: ImageExampleGen on flowers 4.2 s
# -> 2.1 s).  sdk_container_image is read only for Docker environments, which
# the DirectRunner does not use.
_NO_TFX_SDIST = "--sdk_container_image=none"

# TFX's ExampleGens name their files so (tfx.components.example_gen.write_split).
EXAMPLE_GEN_FILE_PREFIX = "data_tfrecord"
_REJECTS, _TOTALS = "rejects", "totals"


def direct_runner_args(workers: int) -> List[str]:
    """DirectRunner options: in memory with one worker, or ``workers`` processes (multi-processing)."""
    if workers <= 1:
        return ["--direct_running_mode=in_memory", "--direct_num_workers=1", _NO_TFX_SDIST]
    return ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}", _NO_TFX_SDIST]


def ingest_workers(workers: int, images: int, shards: Optional[int] = None) -> int:
    """The worker count for ``data.workers`` (0: all cores, from ``AUTO_PARALLEL_MIN_IMAGES`` images on).

    Never more than ``shards``: a shard is one worker's work, so more workers
    would only start (one after another, seconds each) and wait.
    """
    count = workers or ((os.cpu_count() or 1) if images >= AUTO_PARALLEL_MIN_IMAGES else 1)
    return max(1, min(count, shards)) if shards else count


def shard_index(relpath: str, num_shards: int) -> int:
    """The shard of a file, from hash bytes independent of those that pick the split."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[8:16], "big") % num_shards


def example_gen_shard_file(index: int, count: int) -> str:
    return f"{EXAMPLE_GEN_FILE_PREFIX}-{index:05d}-of-{count:05d}.gz"


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One output file and the images that go into it, in the order they are written."""

    split: str
    path: str
    # (position in the whole listing, path, relpath, label, mask path)
    entries: Tuple[Tuple[int, str, str, str, str], ...]


def shard_tasks(items: Sequence[Any], splits: Sequence[str], num_shards: int,
                shard_path: Callable[[str, int, int], str]) -> List[ShardTask]:
    """Every output file of every split (empty ones too), with its images in relative-path order.

    ``items``: ``image_listing._Item``s; ``shard_path(split, index, count)``
    names each file.  Positions number the items in (split, relpath) order:
    the order of the rejects report.
    """
    ordered = sorted(items, key=lambda i: (splits.index(i.split), i.relpath))
    tasks = []
    for split in splits:
        listed = [(n, i) for n, i in enumerate(ordered) if i.split == split]
        count = max(1, min(num_shards, len(listed)))
        shards: List[List[Tuple[int, str, str, str, str]]] = [[] for _ in range(count)]
        for position, item in listed:
            shards[shard_index(item.relpath, count)].append(
                (position, item.path, item.relpath, item.label, item.mask))
        tasks += [ShardTask(split, shard_path(split, index, count), tuple(entries))
                  for index, entries in enumerate(shards)]
    return tasks


@dataclasses.dataclass(frozen=True)
class ShardManifest:
    """A ``ShardTask`` as a Beam element: its entries stay in the ``manifest`` file."""

    split: str
    path: str
    manifest: str


def write_manifests(tasks: Sequence[ShardTask], folder: str) -> List[ShardManifest]:
    """One JSON-lines file of entries per task, in ``folder`` (``FileSystems``: local or ``gs://``)."""
    if not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    shards = []
    for index, task in enumerate(tasks):
        manifest = FileSystems.join(folder, f"shard-{index:05d}.jsonl")
        with FileSystems.create(manifest) as f:
            for entry in task.entries:
                f.write(json.dumps(entry).encode("utf-8") + b"\n")
        shards.append(ShardManifest(task.split, task.path, manifest))
    return shards


def _entries(manifest: str) -> Iterator[Tuple[int, str, str, str, str]]:
    with FileSystems.open(manifest, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        for line in f:
            yield tuple(json.loads(line))


class WriteShard(beam.DoFn):
    """Encodes a shard's images one by one into its file.

    Main output: ``((split, label), images)`` per label of the shard (an image
    counts for each label it has); tagged ``totals``: ``(split, images
    written)``; tagged ``rejects``: ``(position, path, reason)`` of each image
    refused.
    """

    def __init__(self, max_file_bytes: int, max_pixels: int, class_values: Optional[Sequence] = None,
                 gzip: bool = True):
        self._limits = (max_file_bytes, max_pixels)
        self._class_values = class_values
        self._compression = CompressionTypes.GZIP if gzip else CompressionTypes.UNCOMPRESSED
        self._written = beam.metrics.Metrics.counter("visiontune.ingest", "images_written")
        self._rejected = beam.metrics.Metrics.counter("visiontune.ingest", "images_rejected")
        self._driver_pid = os.getpid()

    def setup(self) -> None:
        # A terminal's Ctrl-C reaches the DirectRunner's worker processes too
        # (one process group), which printed their own KeyboardInterrupt
        # tracebacks above visiontune's one line.  The command that started
        # them handles it and stops them; a worker ignores it.  Only in a
        # worker process: in process (one worker) this is the command itself.
        if os.getpid() != self._driver_pid:
            _ignore_sigint()

    def process(self, shard: ShardManifest) -> Iterator[Any]:
        incomplete = shard.path + ".incomplete"
        labels_seen: Dict[str, int] = {}
        written = 0
        with FileSystems.create(incomplete, compression_type=self._compression) as f:
            for position, path, relpath, label, mask in _entries(shard.manifest):
                example, reason, labels = encode_example(path, relpath, label, mask, *self._limits,
                                                         class_values=self._class_values)
                if example is None:
                    self._rejected.inc()
                    yield beam.pvalue.TaggedOutput(_REJECTS, (position, path, reason))
                    continue
                _TFRecordUtil.write_record(f, example)
                self._written.inc()
                written += 1
                for name in labels:
                    labels_seen[name] = labels_seen.get(name, 0) + 1
        FileSystems.rename([incomplete], [shard.path])
        yield beam.pvalue.TaggedOutput(_TOTALS, (shard.split, written))
        for name, n in labels_seen.items():
            yield (shard.split, name), n


def _ignore_sigint() -> None:
    """SIGINT ignored by this process, from any thread (``signal.signal`` works in the main thread only)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return
    import ctypes

    try:
        ctypes.CDLL(None).signal(int(signal.SIGINT), ctypes.c_void_p(1))  # SIG_IGN
    except (OSError, AttributeError):  # pragma: no cover - no C library signal(): keep the default
        pass


def _write_outcome(_, path: str, counts, totals, rejects, manifests: str) -> None:
    outcome = {"counts": [[s, c, n] for (s, c), n in sorted(counts)],
               "totals": sorted(totals), "rejects": sorted(rejects)}
    with FileSystems.create(path) as f:
        f.write(json.dumps(outcome).encode("utf-8"))
    _delete_folder(manifests)  # every shard is written: the manifests are spent


def _delete_folder(folder: str) -> None:
    """Deletes a folder's files, then the folder where the filesystem has folders (not ``gs://``)."""
    files = [m.path for m in FileSystems.match([FileSystems.join(folder, "*")])[0].metadata_list]
    if files:
        FileSystems.delete(files)
    if FileSystems.exists(folder):
        FileSystems.delete([folder])


def write_local(tasks: Sequence[ShardTask], outcome_path: str, workers: int, max_file_bytes: int,
                max_pixels: int, class_values: Optional[Sequence] = None, gzip: bool = True) -> None:
    """``EncodeAndWrite`` on the DirectRunner, outside TFX (``visiontune prepare``).

    The manifests go to a system temporary folder, not beside the outcome file:
    that is inside the dataset being written, where only the dataset's own
    files may be.
    """
    import tempfile

    from apache_beam.options.pipeline_options import PipelineOptions

    with tempfile.TemporaryDirectory(prefix="visiontune-ingest-") as tmp:
        manifest_dir = os.path.join(tmp, "shards")
        shards = write_manifests(tasks, manifest_dir)
        with beam.Pipeline(options=PipelineOptions(direct_runner_args(workers))) as pipeline:
            _ = pipeline | "Ingest" >> EncodeAndWrite(shards, manifest_dir, outcome_path, max_file_bytes,
                                                      max_pixels, class_values, gzip)


@beam.ptransform_fn
def EncodeAndWrite(pipeline: beam.Pipeline, shards: Sequence[ShardManifest], manifest_dir: str,
                   outcome_path: str, max_file_bytes: int, max_pixels: int,
                   class_values: Optional[Sequence] = None, gzip: bool = True):
    """Writes every shard; the counts and rejects go to ``outcome_path`` (see ``read_outcome``).

    ``shards``: ``write_manifests(tasks, manifest_dir)``; the manifests are
    deleted once the outcome is written.  (Not the tasks themselves: Beam
    labels a ``ptransform_fn`` with its first argument's text, which for the
    tasks was a string of the whole listing, 7.7 MiB at 100,000 images.)
    """
    results = (pipeline
               | "Shards" >> beam.Create(shards)
               | "Spread" >> beam.Reshuffle()
               | "Write" >> beam.ParDo(WriteShard(max_file_bytes, max_pixels, class_values, gzip))
               .with_outputs(_REJECTS, _TOTALS, main="labels"))
    counts = results.labels | "CountLabels" >> beam.CombinePerKey(sum)
    totals = results[_TOTALS] | "CountImages" >> beam.CombinePerKey(sum)
    return (pipeline
            | "One" >> beam.Create([None])
            | "Outcome" >> beam.Map(_write_outcome, outcome_path,
                                    counts=beam.pvalue.AsList(counts), totals=beam.pvalue.AsList(totals),
                                    rejects=beam.pvalue.AsList(results[_REJECTS]), manifests=manifest_dir))


def read_outcome(outcome_path: str, classes: Sequence[str], splits: Sequence[str], segmentation: bool
                 ) -> Tuple[Dict[str, Dict[str, int]], Dict[str, int], List[Tuple[str, str]]]:
    """(per split and class counts, images per split, rejects in listing order) of ``EncodeAndWrite``.

    Segmentation labels are class indices (the classes present in a mask).
    """
    with FileSystems.open(outcome_path) as f:
        outcome = json.loads(f.read().decode("utf-8"))
    counts = {s: {c: 0 for c in classes} for s in splits}
    for split, label, n in outcome["counts"]:
        counts[split][classes[int(label)] if segmentation else label] = n
    totals = {s: 0 for s in splits}
    totals.update({split: n for split, n in outcome["totals"]})
    return counts, totals, [(path, reason) for _, path, reason in outcome["rejects"]]
