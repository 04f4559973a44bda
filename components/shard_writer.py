"""Encoding the listed images in a worker pool and writing them, in a fixed order, into shards.

The heavy part (decode, check, re-encode, serialise) runs in worker processes
that import only Pillow; they return framed ``tf.train.Example`` records and
the parent writes the shards.  The parent is the only process that may have
TensorFlow loaded (inside ``visiontune run``), which decides how the pool
starts: see ``_ordered_results``.

Items are encoded in (split, relpath) order, results are written in that order
and each file's shard is a hash of its path, so the same inputs give
byte-identical shards whatever the worker count and timing: TFX's cache keys
on input fingerprints, so a re-run of prepare on unchanged data must not
invalidate the whole pipeline.

No worker outlives a stopped run: the workers ignore SIGINT (the parent
handles it), are terminated when the parent stops, and die with it
(``PR_SET_PDEATHSIG``, else a watchdog thread) when it is killed outright.
The folder they write into is ``dataset_folder``'s concern.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import hashlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from visiontune.components.dataset_folder import STOP_SIGNALS, shard_name
from visiontune.components.example_records import frame_record
from visiontune.components.image_encoding import encode_example
from visiontune.components.image_listing import PrepareError, _Item

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from visiontune.configs import DataConfig, SegmentationConfig


# Items per task sent to a worker: big enough to amortise pickling, small
# enough that the progress bar moves and the work spreads evenly.
_MAX_CHUNK = 64
# Tasks in flight per worker: bounds the serialised images held in memory
# while one slow chunk blocks the ordered write.
_TASKS_PER_WORKER = 4

_log = logging.getLogger(__name__)


def shard_index(relpath: str, num_shards: int) -> int:
    """The shard of a file, from hash bytes independent of those that pick the split."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[8:16], "big") % num_shards


# --------------------------------------------------------------------------
# Worker side (Pillow only, no TensorFlow)
# --------------------------------------------------------------------------


# What a worker sends back for one chunk: the chunk's framed TFRecord bytes per
# (split, shard), and per item (reject reason or None, labels it counts for).
_ChunkResult = Tuple[Dict[Tuple[str, int], bytes], List[Tuple[Optional[str], List[str]]]]


def _encode_chunk(task: Tuple[Sequence[Tuple[str, str, str, str, str, int]], int, int, Optional[Sequence]]
                  ) -> _ChunkResult:
    """Worker entry point: encodes, serializes and frames one chunk of items.

    The worker frames the records itself (length, CRCs) and joins them per
    shard, so the parent only appends a few large byte strings per chunk
    instead of unpickling, checksumming and writing every record: the parent's
    CPU time in a 2-worker flowers run fell from 0.083 s to 0.064 s, time the
    two workers get on a 2-core machine.
    ``class_values`` (the fourth task element) is set for segmentation: the
    labels an image counts for are then the classes present in its mask.
    """
    entries, max_file_bytes, max_pixels, class_values = task
    framed: Dict[Tuple[str, int], List[bytes]] = {}
    outcomes: List[Tuple[Optional[str], List[str]]] = []
    for path, relpath, label, mask_path, split, shard in entries:
        example, reason, labels = encode_example(path, relpath, label, mask_path, max_file_bytes,
                                                 max_pixels, class_values)
        if example is not None:
            framed.setdefault((split, shard), []).append(frame_record(example))
        outcomes.append((reason, labels))
    return {key: b"".join(records) for key, records in framed.items()}, outcomes


def _worker_init(parent_pid: int) -> None:
    """Pool worker start-up: the parent alone handles Ctrl-C, and a worker dies with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in STOP_SIGNALS:  # forked workers inherit the parent's handlers
        signal.signal(signum, signal.SIG_DFL)
    watch = True
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            watch = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before that
        os._exit(1)
    if watch:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


# --------------------------------------------------------------------------
# Parent side: the pool and the ordered writes
# --------------------------------------------------------------------------


def _num_workers(data: "DataConfig") -> int:
    return data.workers if data.workers and data.workers > 0 else (os.cpu_count() or 1)


def _chunks(items: Sequence[_Item], size: int, data: "DataConfig", shard_counts: Dict[str, int],
            class_values: Optional[Sequence] = None) -> List[Tuple]:
    return [([(i.path, i.relpath, i.label, i.mask, i.split,
               shard_index(i.relpath, shard_counts[i.split])) for i in items[start:start + size]],
             data.max_file_bytes, data.max_pixels, class_values)
            for start in range(0, len(items), size)]


def _ordered_results(tasks: Sequence, workers: int) -> Iterator[_ChunkResult]:
    """Results of ``_encode_chunk`` in task order, with few tasks in flight.

    One worker runs in this process: no pool start-up, and the single-core
    baseline benchmarks compare against.  The pool forks when this process
    has not loaded TensorFlow (``visiontune prepare``: shards are written
    without it), which starts workers in milliseconds; otherwise (inside
    ``visiontune run``) it uses ``spawn``, because forking a process with TF's
    threads running can deadlock the child, and spawned workers take a few
    tenths of a second to start (a new interpreter importing Pillow).
    """
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _encode_chunk(task)
        return
    context = multiprocessing.get_context(_start_method())
    window = workers * _TASKS_PER_WORKER
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context,
                                                initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        pending: List[concurrent.futures.Future] = []
        next_task = 0
        try:
            while next_task < len(tasks) or pending:
                while next_task < len(tasks) and len(pending) < window:
                    pending.append(pool.submit(_encode_chunk, tasks[next_task]))
                    next_task += 1
                yield pending.pop(0).result()
        except concurrent.futures.process.BrokenProcessPool as e:
            raise PrepareError(
                "an image worker process died (out of memory, or the main script could not be "
                "re-imported by multiprocessing's spawn start method: run it from a file guarded "
                "by `if __name__ == '__main__':`), or set data.workers=1") from e
        except BaseException:  # interrupted, or the writer failed: stop now, not after the queue
            # No Future.cancel() first: Python 3.10's pool then fails setting the
            # broken-pool error on the cancelled futures, with a traceback.
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            raise


def _start_method() -> str:
    if "tensorflow" not in sys.modules and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"




def _write_shards(out_dir: str, items: Sequence[_Item], splits: Sequence[str],
                  data: "DataConfig", counts: Dict[str, Dict[str, int]], progress: bool,
                  classes: Sequence[str] = (),
                  segmentation: Optional["SegmentationConfig"] = None,
                  totals: Optional[Dict[str, int]] = None) -> List[Tuple[str, str]]:
    """Encodes all items and streams them into their shards; returns the rejects.

    Items are processed in (split, relpath) order and results come back in
    that order, so each shard's content is independent of worker count and
    timing: the same inputs give byte-identical files.
    """
    from tqdm import tqdm

    items = sorted(items, key=lambda i: (splits.index(i.split), i.relpath))
    per_split = {s: sum(1 for i in items if i.split == s) for s in splits}
    shard_counts = {s: max(1, min(data.num_shards, per_split[s])) for s in splits}
    workers = _num_workers(data)
    chunk = max(1, min(_MAX_CHUNK, -(-len(items) // (workers * 8))))
    class_values = ([list(v) for v in segmentation.class_values] if segmentation is not None
                    else None)
    tasks = _chunks(items, chunk, data, shard_counts, class_values)
    rejects: List[Tuple[str, str]] = []
    files: Dict[Tuple[str, int], Any] = {}
    try:
        for split in splits:
            os.makedirs(os.path.join(out_dir, split))
            for index in range(shard_counts[split]):
                path = os.path.join(out_dir, split, shard_name(index, shard_counts[split]))
                files[split, index] = open(path, "wb")
        bar = tqdm(total=len(items), desc="prepare", unit="img", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        position = 0
        results = _ordered_results(tasks, workers)
        with bar, contextlib.closing(results):  # closed at once on errors: the pool stops
            for framed, outcomes in results:
                for key, records in framed.items():
                    files[key].write(records)
                for reason, labels in outcomes:
                    item = items[position]
                    position += 1
                    if reason is not None:
                        rejects.append((item.path, reason))
                        continue
                    if totals is not None:
                        totals[item.split] += 1
                    for label in labels:
                        # Segmentation counts class indices (classes present in the mask).
                        name = classes[int(label)] if class_values is not None else label
                        counts[item.split][name] += 1
                bar.update(len(outcomes))
    finally:
        for f in files.values():
            f.close()
    return rejects
