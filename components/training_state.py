"""The Trainer's resume state: everything that steers training, written after every epoch.

A Trainer killed at any point (SIGKILL, a preempted VM) and run again on the
same inputs and settings resumes at the next unfinished epoch and ends as an
uninterrupted run would.  Keras' ``BackupAndRestore`` is not enough for that:
it keeps the weights, the optimizer and the epoch, but not EarlyStopping's
best weights and patience, ReduceLROnPlateau's counters, the random
generators of the augmentation layers, the position in the shuffle order nor
the history of the epochs before the kill; it also restores the model's step
counter, so Keras' progress line said 84/84 after a resume when 42 steps ran.

The state is one folder:

* ``state-<n>.bin``: the arrays (weights, optimizer slots, EarlyStopping's
  best weights, random generator states), their raw bytes one after another;
* ``state.json``: the rest (phase, finished epochs, learning rate, callback
  counters, history rows), the name of its ``.bin`` and where each array lies in it.

A new ``.bin`` is written under a new name, then ``state.json`` is replaced
by a rename (atomic on a local disk, an object write on GCS), then the old
``.bin`` removed: a kill at any moment leaves a complete earlier state.
Written at the end of every epoch, synchronously, so no finished epoch is
ever lost: for MobileNetV2-0.35 with Adam (~600 arrays, 8 MB) it takes
~80 ms on 2 busy cores, over half of it reading the variables; ~4 % of a
3.3 s epoch, under 1 % of GTSRB's 12-25 s ones
(``benchmarks/trainer_overhead.py --per-callback``).  Keras'
``BackupAndRestore`` took ~150 ms and was therefore throttled to once every
30 s, which lost finished epochs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FORMAT = 1


def _random_generators(model: tf_keras.Model) -> List[Any]:
    """The ``tf.random.Generator`` of every random layer (augmentation, dropout), in model order.

    Created here if the layer has not drawn yet (they are created lazily on the
    first call, with the same seed), so a restore can set their state.
    """
    generators = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        rng = getattr(layer, "_random_generator", None)
        if rng is None or getattr(rng, "_rng_type", None) != "stateful":
            continue
        rng._maybe_init()
        if rng._generator is not None:
            generators.append(rng._generator)
    return generators


def _optimizer(model: tf_keras.Model):
    """The optimizer that holds the slots and the learning rate (inside a LossScaleOptimizer)."""
    return getattr(model.optimizer, "inner_optimizer", model.optimizer)


@dataclasses.dataclass
class SavedState:
    """A resume state read back from ``state.json`` and its arrays."""

    phase: str
    phase_done: bool
    epochs_done: int  # finished epochs, counted over all phases
    history: List[Dict[str, Any]]
    learning_rate: Optional[float]
    early_stopping: Optional[Dict[str, Any]]
    reduce_lr: Optional[Dict[str, Any]]
    arrays: Dict[str, np.ndarray]

    def _group(self, prefix: str) -> List[np.ndarray]:
        keys = sorted((k for k in self.arrays if k.startswith(prefix + "/")),
                      key=lambda k: int(k.rsplit("/", 1)[1]))
        return [self.arrays[k] for k in keys]

    def matches(self, model: tf_keras.Model) -> bool:
        """Whether the arrays fit this model (same architecture): a changed model starts over."""
        weights = self._group("weights")
        return len(weights) == len(model.weights) and all(
            tuple(a.shape) == tuple(w.shape) for a, w in zip(weights, model.weights))

    def restore_model(self, model: tf_keras.Model) -> None:
        """Weights (BatchNorm statistics included) and the random generators' states."""
        model.set_weights(self._group("weights"))
        for generator, state in zip(_random_generators(model), self._group("rng")):
            generator.state.assign(state)

    def restore_optimizer(self, model: tf_keras.Model) -> None:
        """Slots, step count and the learning rate (ReduceLROnPlateau may have lowered it)."""
        opt = _optimizer(model)
        values = self._group("optimizer")
        if values:
            opt.build(model.trainable_variables)
            if len(values) != len(opt.variables) or any(
                    tuple(v.shape) != tuple(a.shape) for v, a in zip(opt.variables, values)):
                log.warning("the saved optimizer state does not fit this phase; the optimizer starts afresh")
            else:
                for variable, value in zip(opt.variables, values):
                    variable.assign(value)
        if self.learning_rate is not None:
            opt.learning_rate.assign(self.learning_rate)

    def restore_callbacks(self, callbacks: Sequence[tf_keras.callbacks.Callback]) -> None:
        """EarlyStopping's patience, best value and best weights; ReduceLROnPlateau's counters.

        Called after their ``on_train_begin``, which resets them.
        """
        for cb in callbacks:
            if isinstance(cb, tf_keras.callbacks.EarlyStopping) and self.early_stopping:
                state = self.early_stopping
                cb.wait, cb.best, cb.best_epoch = state["wait"], state["best"], state["best_epoch"]
                best = self._group("best")
                cb.best_weights = best if best else None
            elif isinstance(cb, tf_keras.callbacks.ReduceLROnPlateau) and self.reduce_lr:
                state = self.reduce_lr
                cb.wait, cb.best, cb.cooldown_counter = state["wait"], state["best"], state["cooldown_counter"]


def load(state_dir: str) -> Optional[SavedState]:
    """The last complete state in ``state_dir``, or None (none yet, or unreadable: start over)."""
    path = os.path.join(state_dir, STATE_FILE)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        with tf.io.gfile.GFile(os.path.join(state_dir, meta["arrays"]), "rb") as f:
            data = f.read()
        arrays = {}
        for key, dtype, shape, offset in meta["index"]:
            count = int(np.prod(shape, dtype=np.int64))
            arrays[key] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))
        return SavedState(phase=meta["phase"], phase_done=bool(meta["phase_done"]),
                          epochs_done=int(meta["epochs_done"]), history=list(meta["history"]),
                          learning_rate=meta.get("learning_rate"),
                          early_stopping=meta.get("early_stopping"), reduce_lr=meta.get("reduce_lr"),
                          arrays=arrays)
    except Exception as e:  # noqa: BLE001 - a damaged state must never stop training
        log.warning("resume state in %s is unreadable (%s); training starts over", state_dir, e)
        return None


def finished_epochs(state_dir: str) -> int:
    """How many epochs the state in ``state_dir`` has finished (0: none, or unreadable)."""
    try:
        with tf.io.gfile.GFile(os.path.join(state_dir, STATE_FILE), "r") as f:
            return int(json.load(f)["epochs_done"])
    except Exception:  # noqa: BLE001 - no state, or a damaged one: load() says which
        return 0


def _float(value) -> Optional[float]:
    return None if value is None else float(value)


class StateWriter:
    """Writes the resume state: arrays under a new name, then ``state.json`` by rename."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        # Continue the numbering of a killed attempt, so its last file is never overwritten.
        names = tf.io.gfile.listdir(state_dir) if tf.io.gfile.isdir(state_dir) else []
        self._count = max((int(n[6:-4]) for n in names
                           if n.startswith("state-") and n.endswith(".bin") and n[6:-4].isdigit()), default=0)
        self.seconds = 0.0  # time spent writing, for the benchmarks

    def write(self, model: tf_keras.Model, *, phase: str, phase_done: bool, epochs_done: int,
              history: List[Dict[str, Any]], callbacks: Sequence = ()) -> None:
        start = time.perf_counter()
        arrays: Dict[str, np.ndarray] = {}
        for i, w in enumerate(model.get_weights()):
            arrays[f"weights/{i}"] = w
        for i, g in enumerate(_random_generators(model)):
            arrays[f"rng/{i}"] = g.state.numpy()
        opt = _optimizer(model)
        learning_rate = None
        if opt is not None:
            for i, v in enumerate(opt.variables):
                arrays[f"optimizer/{i}"] = v.numpy()
            learning_rate = float(tf_keras.backend.get_value(opt.learning_rate))
        meta: Dict[str, Any] = {"format": FORMAT, "phase": phase, "phase_done": phase_done,
                                "epochs_done": epochs_done, "history": history,
                                "learning_rate": learning_rate, "written": time.time()}
        for cb in callbacks:
            if isinstance(cb, tf_keras.callbacks.EarlyStopping):
                meta["early_stopping"] = {"wait": int(cb.wait), "best": _float(cb.best),
                                          "best_epoch": int(cb.best_epoch)}
                for i, w in enumerate(cb.best_weights or []):
                    arrays[f"best/{i}"] = w
            elif isinstance(cb, tf_keras.callbacks.ReduceLROnPlateau):
                meta["reduce_lr"] = {"wait": int(cb.wait), "best": _float(cb.best),
                                     "cooldown_counter": int(cb.cooldown_counter)}
        self._count += 1
        meta["arrays"] = name = f"state-{self._count:06d}.bin"
        # One file of raw bytes, its index in state.json: np.savez took 43 ms for the
        # ~600 arrays of MobileNetV2-0.35 and Adam, this ~6 ms.
        index, offset = [], 0
        for key, value in arrays.items():
            value = np.asarray(value, order="C")  # (ascontiguousarray makes scalars 1-d)
            index.append([key, value.dtype.str, list(value.shape), offset])
            offset += value.nbytes
        meta["index"] = index
        data = b"".join(np.asarray(v, order="C").tobytes() for v in arrays.values())
        self._publish(name, data, json.dumps(meta).encode())
        self.seconds += time.perf_counter() - start

    def _publish(self, name: str, data: bytes, meta: bytes) -> None:
        tf.io.gfile.makedirs(self.state_dir)
        path = os.path.join(self.state_dir, name)
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(data)
        meta_path = os.path.join(self.state_dir, STATE_FILE)
        with tf.io.gfile.GFile(meta_path + ".tmp", "wb") as f:
            f.write(meta)
        tf.io.gfile.rename(meta_path + ".tmp", meta_path, overwrite=True)
        for old in tf.io.gfile.listdir(self.state_dir):
            if old.startswith("state-") and old.endswith(".bin") and old != name:
                tf.io.gfile.remove(os.path.join(self.state_dir, old))


class EpochStateSaver(tf_keras.callbacks.Callback):
    """Records each finished epoch's history row and writes the resume state.

    Placed after EarlyStopping and ReduceLROnPlateau in the callback list, so
    the state it writes holds their decision on this epoch, and its
    ``on_train_begin`` (after theirs, which reset them) restores their counters
    on a resume.
    """

    def __init__(self, writer: StateWriter, phase: str, history: List[Dict[str, Any]],
                 callbacks: Sequence, trainable_params: int, resume: Optional[SavedState] = None):
        super().__init__()
        self.writer, self.phase, self.history = writer, phase, history
        self.callbacks, self.trainable_params, self.resume = list(callbacks), trainable_params, resume

    def on_train_begin(self, logs=None):
        if self.resume is not None:
            self.resume.restore_callbacks(self.callbacks)

    def on_epoch_end(self, epoch, logs=None):
        row = {"phase": self.phase, "epoch": epoch + 1,
               **{k: float(v) for k, v in (logs or {}).items()},
               "trainable_params": self.trainable_params}
        self.history.append(row)
        self.writer.write(self.model, phase=self.phase, phase_done=False, epochs_done=epoch + 1,
                          history=self.history, callbacks=self.callbacks)
