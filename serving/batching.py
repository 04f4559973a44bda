"""Server-side batching (``--enable_batching``): concurrent requests' model calls merged into one.

A model call on 8 images costs far less than 8 calls on one (the per-call overhead and the kernels'
efficiency), so with many small concurrent requests the server answers more of them per second when it
merges them.  The rules are TF Serving's (``BatchingParameters``, read from ``--batching_parameters_file``
by :func:`read_parameters`; see its batching guide):

* Each servable version and signature (and, without ``pad_variable_length_inputs``, each shape of the
  instances) has its own queue.  A request part (a *task*: what would otherwise be one model call, at most
  ``--inference-batch-size`` instances, see ``ModelManager._parts``) joins the open batch of its queue if
  it fits, else it closes that batch and opens a new one.  "Fits" means at most ``max_batch_size``
  instances and, when the inputs are images, at most ``--max-pixels`` declared pixels in all: the server's
  memory limits hold for merged calls too.  With more than ``max_enqueued_batches`` batches waiting, a
  task is refused with UNAVAILABLE, TF Serving's "batch scheduling queue ... is full".
* ``num_batch_threads`` threads run batches, oldest first: a batch runs once it is closed (full, or
  followed by another), or once its first task has waited ``batch_timeout_micros``.  With a timeout of 0
  a batch runs as soon as a thread is free, so batches form only while every thread is busy.
* ``allowed_batch_sizes``: a batch is padded up to the next allowed size by repeating its first
  instance (a real input the model accepts, unlike zeros for an encoded image); the padded rows' outputs
  are dropped.  ``pad_variable_length_inputs``: instances whose shapes differ beyond the batch dimension
  are padded to the largest with the tensor's first element, TF Serving's padding value.
* A task bigger than ``max_batch_size`` runs alone (TF Serving refuses it unless it splits large
  batches); so do signatures whose inputs or outputs are not batch-major.

When a merged call fails, each of its tasks is rerun alone, so a request with a broken image gets its
error and the others in its batch their answers (one extra call per task, only for failing batches).

Merged calls are visible in the server's metrics (``:tensorflow:serving:batching_session:...``).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from visiontune.serving import text_protos

QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"   # TF Serving's words


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's ``BatchingParameters``, with the built-in server's defaults for fields left out."""

    max_batch_size: int
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 1
    thread_pool_name: str = "batch_threads"
    allowed_batch_sizes: Tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False


def parameters_from_message(message, inference_batch_size: int) -> BatchingParameters:
    """Checks a ``BatchingParameters`` message; raises ValueError saying which field is wrong and why.

    Left out: ``max_batch_size`` is ``--inference-batch-size`` (TF Serving's 1000 would break that
    limit), ``num_batch_threads`` the number of cores, the rest TF Serving's defaults.
    """
    def value(field, default):
        return getattr(message, field).value if message.HasField(field) else default

    params = BatchingParameters(
        max_batch_size=value("max_batch_size", inference_batch_size),
        batch_timeout_micros=value("batch_timeout_micros", 0),
        max_enqueued_batches=value("max_enqueued_batches", 10),
        num_batch_threads=value("num_batch_threads", os.cpu_count() or 1),
        thread_pool_name=value("thread_pool_name", "batch_threads") or "batch_threads",
        allowed_batch_sizes=tuple(message.allowed_batch_sizes),
        pad_variable_length_inputs=message.pad_variable_length_inputs)
    for field in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
        if getattr(params, field) < 1:
            raise ValueError(f"{field} is {getattr(params, field)}; it must be at least 1")
    if params.batch_timeout_micros < 0:
        raise ValueError(f"batch_timeout_micros is {params.batch_timeout_micros}; it must be 0 or more")
    if params.max_batch_size > inference_batch_size:
        raise ValueError(f"max_batch_size {params.max_batch_size} is over the server's "
                         f"--inference-batch-size {inference_batch_size} (the most instances per model call); "
                         "lower it or raise --inference-batch-size")
    sizes = params.allowed_batch_sizes
    if sizes and (list(sizes) != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != params.max_batch_size):
        raise ValueError(f"allowed_batch_sizes {list(sizes)} must increase, start at 1 or more and end with "
                         f"max_batch_size ({params.max_batch_size}), as TF Serving requires")
    return params


def read_parameters(path: Optional[str], inference_batch_size: int) -> BatchingParameters:
    """``--batching_parameters_file`` (None: every default); ValueError naming the file and the problem."""
    if path is None:
        return parameters_from_message(text_protos.message_class("BatchingParameters")(), inference_batch_size)
    message = text_protos.read("BatchingParameters", path)
    try:
        return parameters_from_message(message, inference_batch_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def to_text(params: BatchingParameters) -> str:
    """The parameters as the text-format file ``tensorflow_model_server --batching_parameters_file`` reads."""
    message = text_protos.message_class("BatchingParameters")()
    for field in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads",
                  "thread_pool_name"):
        getattr(message, field).value = getattr(params, field)
    message.allowed_batch_sizes.extend(params.allowed_batch_sizes)
    message.pad_variable_length_inputs = params.pad_variable_length_inputs
    return text_protos.to_text(message)


def _task_of(arrays: Mapping[str, object], part: Optional[slice], pixels: Optional[List[int]]):
    """The arrays and declared pixels per instance of one part of a request (``part`` None: all of it)."""
    if part is None:
        return arrays, list(pixels or ())
    return {k: v[part] for k, v in arrays.items()}, list(pixels[part]) if pixels else []


class Unbatched:
    """Batching off: every part is its own model call (``ModelManager._call``)."""

    def run(self, manager, signature, arrays, part, pixels) -> Dict[str, object]:
        return manager._call(signature, _task_of(arrays, part, pixels)[0])

    def stop(self) -> None:
        pass


UNBATCHED = Unbatched()


class _Task:
    __slots__ = ("arrays", "size", "pixels", "first_pixels", "enqueued", "done", "result", "error")

    def __init__(self, arrays, size: int, pixels: List[int]):
        self.arrays, self.size = arrays, size
        self.pixels, self.first_pixels = sum(pixels), (pixels[0] if pixels else 0)   # declared by image headers
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.result: Optional[Dict[str, object]] = None
        self.error: Optional[BaseException] = None


class _Batch:
    def __init__(self, manager, signature):
        self.manager, self.signature = manager, signature
        self.tasks: List[_Task] = []
        self.size = self.pixels = 0
        self.closed = False


def _batch_major(signature, arrays: Mapping[str, object]) -> Optional[int]:
    """The instance count when every input and output has a batch dimension (None: cannot be merged)."""
    specs = list(signature.inputs.values()) + list(signature.outputs.values())
    if not all(spec.shape.rank and spec.shape[0] is None for spec in specs):
        return None
    sizes = {getattr(a, "shape", ())[:1] for a in arrays.values()}
    if len(sizes) != 1 or sizes == {()}:
        return None
    return sizes.pop()[0] or None


class Batcher:
    """Merges concurrent tasks into model calls on ``num_batch_threads`` threads (see the module's docstring)."""

    def __init__(self, params: BatchingParameters):
        self.params = params
        self._cond = threading.Condition()
        self._queues: Dict[tuple, collections.deque] = {}
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"{params.thread_pool_name}-{i}", daemon=True)
                         for i in range(params.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Ends the threads; tasks still queued are refused with UNAVAILABLE."""
        from visiontune.serving.model_server import ServingError

        with self._cond:
            self._stopping = True
            for queue in self._queues.values():
                for batch in queue:
                    for task in batch.tasks:
                        task.error = ServingError("UNAVAILABLE", "the server is stopping")
                        task.done.set()
            self._queues.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    # ------------------------------------------------------------------ requests' side

    def run(self, manager, signature, arrays, part, pixels) -> Dict[str, object]:
        """One part of a request, answered when its batch has run (the caller's thread waits)."""
        from visiontune.serving.model_server import ServingError

        task_arrays, task_pixels = _task_of(arrays, part, pixels)
        size = _batch_major(signature, task_arrays)
        limit = min(self.params.max_batch_size, manager.limits.inference_batch_size)
        if size is None or size > limit:
            return manager._call(signature, task_arrays)
        task = _Task(task_arrays, size, task_pixels)
        key = (id(manager), id(signature.function), self._shapes(task_arrays))
        with self._cond:
            if self._stopping:
                raise ServingError("UNAVAILABLE", "the server is stopping")
            queue = self._queues.setdefault(key, collections.deque())
            batch = queue[-1] if queue and not queue[-1].closed else None
            if batch is not None and (batch.size + size > limit
                                      or batch.pixels + task.pixels > manager.limits.max_pixels):
                batch.closed = True   # full for this task: it runs as it is
                batch = None
            if batch is None:
                if len(queue) >= self.params.max_enqueued_batches:
                    raise ServingError("UNAVAILABLE", QUEUE_FULL)
                batch = _Batch(manager, signature)
                queue.append(batch)
            batch.tasks.append(task)
            batch.size += size
            batch.pixels += task.pixels
            batch.closed = batch.closed or batch.size >= limit
            self._cond.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def _shapes(self, arrays: Mapping[str, object]) -> tuple:
        """What instances must share to be stacked: dtype and rank, and their shape unless padding is on."""
        return tuple((name, a.dtype.str, a.ndim if self.params.pad_variable_length_inputs else a.shape[1:])
                     for name, a in sorted(arrays.items()))

    # ------------------------------------------------------------------ batch threads

    def _work(self) -> None:
        while True:
            with self._cond:
                batch, wait = self._next()
                while batch is None:
                    if self._stopping:
                        return
                    self._cond.wait(wait)
                    batch, wait = self._next()
                if self._queues:
                    self._cond.notify()   # another thread watches the queues' timeouts meanwhile
            self._process(batch)

    def _next(self):
        """(the oldest batch that may run now, None) or (None, seconds until one may); under the lock."""
        now, timeout = time.monotonic(), self.params.batch_timeout_micros / 1e6
        ready, wait = None, None
        for key, queue in self._queues.items():
            first = queue[0]
            due = first.tasks[0].enqueued + timeout
            if first.closed or due <= now:
                if ready is None or first.tasks[0].enqueued < ready[1].tasks[0].enqueued:
                    ready = (key, first)
            else:
                wait = due - now if wait is None else min(wait, due - now)
        if ready is None:
            return None, wait
        key, batch = ready
        queue = self._queues[key]
        queue.popleft()
        if not queue:
            del self._queues[key]
        return batch, None

    def _process(self, batch: _Batch) -> None:
        tasks, started = batch.tasks, time.monotonic()
        try:
            padding = self._padding(batch.size)
            if batch.pixels + padding * tasks[0].first_pixels > batch.manager.limits.max_pixels:
                padding = 0   # --max-pixels holds: the batch runs at its own size
            try:
                outputs = batch.manager._call(batch.signature, self._merge(tasks, padding))
                if any(np.shape(v)[:1] != (batch.size + padding,) for v in outputs.values()):
                    raise ValueError("an output is not batch-major")
                start = 0
                for task in tasks:
                    task.result = {k: v[start:start + task.size] for k, v in outputs.items()}
                    start += task.size
            except Exception as e:   # rerun alone: only the task that fails gets the error
                if len(tasks) == 1:
                    tasks[0].result, tasks[0].error = None, e
                else:
                    for task in tasks:
                        self._alone(batch, task)
            self._record(batch, [t.size for t in tasks], padding, [started - t.enqueued for t in tasks])
        except BaseException as e:   # never leave a request waiting
            for task in tasks:
                if task.result is None and task.error is None:
                    task.error = e
            raise
        finally:
            for task in tasks:
                task.done.set()

    def _alone(self, batch: _Batch, task: _Task) -> None:
        try:
            task.result, task.error = batch.manager._call(batch.signature, task.arrays), None
        except Exception as e:
            task.result, task.error = None, e
        self._record(batch, [task.size], 0, [])

    def _record(self, batch: _Batch, sizes: List[int], padding: int, queued: List[float]) -> None:
        metrics = getattr(batch.manager, "metrics", None)
        if metrics is not None:
            metrics.batch(batch.manager.name, batch.signature.name, sizes, padding, queued,
                          self.params.thread_pool_name)

    def _padding(self, size: int) -> int:
        allowed = [s for s in self.params.allowed_batch_sizes if s >= size]
        return allowed[0] - size if allowed else 0

    def _merge(self, tasks: List[_Task], padding: int) -> Dict[str, np.ndarray]:
        merged = {}
        for name in tasks[0].arrays:
            parts = [np.asarray(t.arrays[name]) for t in tasks]
            shape = tuple(max(dims) for dims in zip(*(p.shape[1:] for p in parts)))
            parts = [p if p.shape[1:] == shape else _pad(p, shape) for p in parts]
            if padding:
                parts.append(np.repeat(parts[0][:1], padding, axis=0))
            merged[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return merged


def _pad(array: np.ndarray, shape: tuple) -> np.ndarray:
    """``array`` grown to ``shape`` beyond its batch dimension, filled with its first element (TF Serving's rule)."""
    fill = array.flat[0] if array.size else (b"" if array.dtype == object else 0)
    padded = np.full((array.shape[0],) + shape, fill, dtype=array.dtype)
    padded[(slice(None),) + tuple(slice(0, n) for n in array.shape[1:])] = array
    return padded
