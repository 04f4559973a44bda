"""Trainer module: fine-tunes a backbone on the transformed examples (``run_fn``).

Two phases, each a ``model.fit``: a head warm-up with the backbone frozen (so
the randomly initialised head does not send large gradients into pretrained
layers), then fine-tuning of the layers the config unfreezes at a lower
learning rate.  After every epoch the resume state (``training_state``) is
written to a folder outside the execution's output, keyed by the inputs,
settings and code, so a killed Trainer run again on the same inputs resumes
at the next unfinished epoch and ends as the uninterrupted run would.

The transformed TFRecords are read directly (``_decoded_records``), not
through ``fn_args.data_accessor`` (tfxio).  Measured side by side
(``benchmarks/input_pipeline.py``, 3,452 flowers at 128 px, batch 32, 2 CPU
cores, load 5.8, BENCHMARKS.md): tfxio is as fast in epoch 1 (3,897 vs 2,715
img/s) but has no cache, so every later epoch re-reads and re-inflates the
gzipped records: 3,938 vs 84,474 img/s.  Caching tfxio's unshuffled output
here instead gives 55,102 img/s, and tfxio leaves the interleave over a
split's shards to tf.data (cycle length "based on available CPU"; it read
them one after another there), so a split written as several shards
(Dataflow) would reach the model in another order (one shard, as the local
GTSRB Transform writes, keeps it).  Neither variant is as fast in every
epoch, and what the model is fed must not change (the same seed reproduces a
run exactly; ``tests/test_trainer.py``), so the reader stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import tensorflow as tf
import tensorflow_transform as tft
import tf_keras

from visiontune import configs, features
from visiontune.components import (
    backbones,
    model as model_lib,
    segmentation_model,
    signatures,
    strategy as strategy_lib,
    tflite_export,
    training_state,
    transform,
    warmup_requests,
)

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


# --------------------------------------------------------------------------- data

def _list_files(patterns: Sequence[str]) -> List[str]:
    files = sorted(f for p in patterns for f in tf.io.gfile.glob(p))
    if not files:
        raise FileNotFoundError(f"no transformed examples match {list(patterns)}")
    return files


def _fits_in_memory(files: Sequence[str], fraction: float = 0.25) -> bool:
    """Whether decoded pixels (about 2x the gzipped records) fit in a share of RAM."""
    size = sum(tf.io.gfile.stat(f).length for f in files) * 2
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return False
    return size < ram * fraction


def _count_records(files: Sequence[str]) -> int:
    """The number of records in gzipped TFRecord files (decompressed, not parsed)."""
    ds = tf.data.Dataset.from_tensor_slices(list(files)).interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(len(files), 8), num_parallel_calls=AUTOTUNE)
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def _batches(ds: tf.data.Dataset, files: Sequence[str], batch_size: int, training: bool) -> tf.data.Dataset:
    """Batches; a training set also says how many there are.

    Told nothing, Keras finds an epoch's end by running into it: that first
    epoch of every ``model.fit`` then counts one optimizer step more than it
    ran (tf_keras 2.16, measured), so a resumed fit (whose first epoch is
    the uninterrupted run's third, say) would step Adam's bias correction
    differently from the run it continues.  Counting costs one read of the
    gzipped records; the progress line knows its total from the first epoch.
    """
    ds = ds.batch(batch_size)
    if training:
        batches = -(-_count_records(files) // batch_size)
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds.prefetch(AUTOTUNE)


def _decoded_records(files: Sequence[str], parse, *, training: bool, seed: int,
                     cache: Optional[bool], shuffle_buffer: int) -> tf.data.Dataset:
    """Reads gzipped records in parallel, decodes them with ``parse``, caches, shuffles.

    Decoded examples are cached in memory when they fit (so later epochs read no
    files) and shuffled after the cache, so every epoch sees a new order.
    """
    ds = tf.data.Dataset.from_tensor_slices(list(files))
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                       cycle_length=min(len(files), 8), num_parallel_calls=AUTOTUNE,
                       deterministic=True)
    ds = ds.map(parse, num_parallel_calls=AUTOTUNE)
    if cache if cache is not None else _fits_in_memory(files):
        ds = ds.cache()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds


def create_dataset(file_patterns: Sequence[str], image_size: int, batch_size: int, *,
                   training: bool, seed: int = 42, num_classes: int = 0,
                   one_hot: bool = False, cache: Optional[bool] = None) -> tf.data.Dataset:
    """``(pixels uint8 [b,s,s,3], label)`` batches from transformed TFRecords,
    prefetched so the model never waits on input."""
    files = _list_files(file_patterns)
    spec = {features.PIXELS_KEY: tf.io.FixedLenFeature([], tf.string),
            features.LABEL_ID_KEY: tf.io.FixedLenFeature([], tf.int64)}

    def parse(record):
        parsed = tf.io.parse_single_example(record, spec)
        pixels = transform.decode_pixels_one(parsed[features.PIXELS_KEY], image_size)
        label = parsed[features.LABEL_ID_KEY]
        if one_hot:
            label = tf.one_hot(label, num_classes)
        return pixels, label

    ds = _decoded_records(files, parse, training=training, seed=seed, cache=cache,
                          shuffle_buffer=4096)
    return _batches(ds, files, batch_size, training)


def create_segmentation_dataset(file_patterns: Sequence[str], image_size: int, batch_size: int, *,
                                training: bool, seed: int = 42, sigmoid: bool = False,
                                augmentation: Optional[configs.AugmentationConfig] = None,
                                cache: Optional[bool] = None) -> tf.data.Dataset:
    """``(pixels, class ids, pixel weights)`` batches: void pixels weigh 0 in loss and metrics.

    Void pixels keep a valid class id (0) so the loss can index them; their zero
    weight is what leaves them out.  Flips (``augmentation``) move image and
    mask together, after the cache, so every epoch sees new ones.
    """
    files = _list_files(file_patterns)
    spec = {features.PIXELS_KEY: tf.io.FixedLenFeature([], tf.string),
            features.MASK_IDS_KEY: tf.io.FixedLenFeature([], tf.string)}

    def parse(record):
        parsed = tf.io.parse_single_example(record, spec)
        pixels = transform.decode_pixels_one(parsed[features.PIXELS_KEY], image_size)
        mask = transform.decode_mask_ids_one(parsed[features.MASK_IDS_KEY], image_size)
        return pixels, mask

    def flip(pixels, mask):
        stacked = tf.concat([pixels, mask[..., None]], axis=-1)
        if augmentation.horizontal_flip:
            stacked = tf.image.random_flip_left_right(stacked, seed=seed)
        if augmentation.vertical_flip:
            stacked = tf.image.random_flip_up_down(stacked, seed=seed + 1)
        return stacked[..., :3], stacked[..., 3]

    def to_targets(pixels, mask):
        void = tf.equal(mask, features.VOID_ID)
        weights = tf.cast(tf.logical_not(void), tf.float32)
        labels = tf.where(void, tf.zeros_like(mask), mask)
        labels = tf.cast(labels, tf.float32)[..., None] if sigmoid else tf.cast(labels, tf.int32)
        return pixels, labels, weights

    ds = _decoded_records(files, parse, training=training, seed=seed, cache=cache,
                          shuffle_buffer=1024)
    if training:
        if augmentation and (augmentation.horizontal_flip or augmentation.vertical_flip):
            ds = ds.map(flip, num_parallel_calls=AUTOTUNE)
    return _batches(ds.map(to_targets, num_parallel_calls=AUTOTUNE), files, batch_size, training)


# --------------------------------------------------------------------------- training

def create_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0):
    opt = tf_keras.optimizers
    name = name.lower()
    if name == "adam":
        return opt.Adam(learning_rate)
    if name == "adamw":
        return opt.AdamW(learning_rate, weight_decay=weight_decay or 1e-4)
    if name == "sgd":
        return opt.SGD(learning_rate, momentum=0.9, nesterov=True)
    if name == "rmsprop":
        return opt.RMSprop(learning_rate)
    raise ValueError(f"training.optimizer: unknown optimizer {name!r}; known: adam, adamw, sgd, rmsprop")


class EpochTimer(tf_keras.callbacks.Callback):
    """Records wall time per epoch and per step (the reports and benchmarks read it)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._start
        if logs is not None:
            logs["epoch_seconds"] = elapsed
            logs["step_seconds"] = elapsed / max(self._steps, 1)
            lr = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(tf_keras.backend.get_value(lr))


def cosine_learning_rate(phase: configs.PhaseConfig, epoch_in_phase: int) -> float:
    """The cosine schedule's rate for an epoch of the phase (0-based): ``learning_rate`` at its
    first epoch, falling along half a cosine over ``epochs + 1`` steps, so that the last epoch
    still learns at a small rate instead of at 0."""
    progress = min(max(epoch_in_phase, 0), phase.epochs) / (phase.epochs + 1)
    return phase.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def _callbacks(train: configs.TrainingConfig, log_dir: str,
               phase: Optional[configs.PhaseConfig] = None, first_epoch: int = 0) -> list:
    """The Trainer's callbacks, EarlyStopping and ReduceLROnPlateau last (the resume state's
    ``EpochStateSaver`` follows them and records their decision on each epoch).

    ``first_epoch`` is the phase's first epoch in ``model.fit``'s numbering (the
    phases count on from each other), from which a cosine schedule counts.
    """
    cbs = [EpochTimer(),
           tf_keras.callbacks.TensorBoard(log_dir=log_dir, update_freq="epoch", profile_batch=0)]
    cosine = phase is not None and phase.schedule == "cosine"
    if cosine:
        cbs.append(tf_keras.callbacks.LearningRateScheduler(
            lambda epoch, lr: cosine_learning_rate(phase, epoch - first_epoch)))
    if train.reduce_lr_patience and not cosine:
        cbs.append(tf_keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=train.reduce_lr_factor, patience=train.reduce_lr_patience,
            min_lr=1e-7, verbose=1))
    if train.early_stopping_patience:
        cbs.append(tf_keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=train.early_stopping_patience, restore_best_weights=True,
            verbose=1))
    return cbs


def _compile_segmentation(model, train: configs.TrainingConfig, phase: configs.PhaseConfig) -> None:
    """Pixel losses and metrics; the datasets' pixel weights leave void out of both."""
    num_classes = model.output_shape[-1]
    if num_classes == 1:
        loss = tf_keras.losses.BinaryCrossentropy()
        metrics = [tf_keras.metrics.BinaryAccuracy(name="accuracy"),
                   tf_keras.metrics.BinaryIoU(target_class_ids=[0, 1], name="mean_iou")]
    else:
        loss = tf_keras.losses.SparseCategoricalCrossentropy()
        metrics = [tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                   tf_keras.metrics.MeanIoU(num_classes, sparse_y_pred=False, name="mean_iou")]
    model.compile(optimizer=create_optimizer(train.optimizer, phase.learning_rate, train.weight_decay),
                  loss=loss, weighted_metrics=metrics)


def _compile(model, train: configs.TrainingConfig, phase: configs.PhaseConfig, top_k: int) -> None:
    if getattr(model, "task", "") == "segmentation":
        _compile_segmentation(model, train, phase)
        return
    if train.label_smoothing:
        loss = tf_keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing)
        metrics = [tf_keras.metrics.CategoricalAccuracy(name="accuracy"),
                   tf_keras.metrics.TopKCategoricalAccuracy(k=top_k, name="top_k_accuracy")]
    else:
        loss = tf_keras.losses.SparseCategoricalCrossentropy()
        metrics = [tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                   tf_keras.metrics.SparseTopKCategoricalAccuracy(k=top_k, name="top_k_accuracy")]
    model.compile(optimizer=create_optimizer(train.optimizer, phase.learning_rate, train.weight_decay),
                  loss=loss, metrics=metrics)


PHASES = ("warmup", "fine_tune")


def _skip_shuffles(train_ds, epochs: int, fits: int) -> None:
    """Moves the training set's shuffle on past ``epochs`` epochs and ``fits`` earlier
    ``model.fit`` calls, reading nothing.

    Each new iterator of ``train_ds`` draws the next order from the shuffle's
    seed, and ``model.fit`` creates one as it starts and one per epoch
    (measured, tf_keras 2.16).  Creating and dropping as many makes a resumed
    run see the orders the uninterrupted run saw (``tests/test_resume.py``
    checks that it ends with the same weights).
    """
    for _ in range(epochs + fits):
        iter(train_ds)


def fit_phases(model: tf_keras.Model, config: configs.Config, train_ds, eval_ds,
               state_dir: str, log_dir: str, extra_callbacks: Sequence = ()) -> List[Dict[str, Any]]:
    """Runs warm-up then fine-tuning; returns one history row per epoch.

    After every epoch the resume state (``components.training_state``) is
    written to ``state_dir``; a run that finds one there resumes at the next
    unfinished epoch with every finished epoch's history row.
    """
    train = config.training
    top_k = max(1, min(config.evaluation.top_k, model.output_shape[-1]))
    steps = train.steps_per_epoch or None
    if steps:
        # One iterator for the whole fit (Keras keeps it when steps are capped):
        # repeated, so a cap times the epochs never runs out of examples.
        train_ds = train_ds.repeat()
    resume = training_state.load(state_dir)
    if resume is not None and not resume.matches(model):
        log.warning("resume state in %s is for another model; training starts over", state_dir)
        resume = None
    history: List[Dict[str, Any]] = list(resume.history) if resume else []
    writer = training_state.StateWriter(state_dir)
    done_phases = set()
    if resume is not None:
        order = [p for p in PHASES if getattr(train, p).epochs > 0]
        if resume.phase in order:
            done_phases = set(order[:order.index(resume.phase) + resume.phase_done])
        log.info("resuming from %s: %d epochs finished (phase %s%s)", state_dir, resume.epochs_done,
                 resume.phase, ", done" if resume.phase_done else "")
    epoch = 0
    for name in PHASES:
        phase: configs.PhaseConfig = getattr(train, name)
        if phase.epochs <= 0:
            continue
        first, epoch = epoch, epoch + phase.epochs
        if name in done_phases:
            continue
        trainable = model_lib.apply_fine_tune_policy(
            model, phase.backbone, phase.layers, freeze_batch_norm=model.pretrained_backbone)
        _compile(model, train, phase, top_k)
        initial, phase_resume = first, None
        if resume is not None:
            resume.restore_model(model)
            if resume.phase == name:
                resume.restore_optimizer(model)
                initial, phase_resume = resume.epochs_done, resume
            if not steps:
                # The epochs that ran (early stops included) and the phases before this one.
                _skip_shuffles(train_ds, len(history), len(done_phases))
            if initial < epoch:
                print(f"resuming training at epoch {initial + 1}/{epoch} (phase {name})", flush=True)
            else:  # killed as the phase ended: only its end (EarlyStopping's best weights) is left
                print(f"resuming training at the end of phase {name} (epoch {epoch})", flush=True)
            resume = None
        counts = model_lib.count_params(model)
        log.info("phase %s: %d epochs, lr %g, backbone %s (%d layers train), params %s",
                 name, phase.epochs, phase.learning_rate, phase.backbone, len(trainable), counts)
        callbacks = _callbacks(train, log_dir, phase, first)
        saver = training_state.EpochStateSaver(writer, name, history, callbacks, counts["trainable"],
                                               resume=phase_resume)
        model.fit(train_ds, validation_data=eval_ds, epochs=epoch, initial_epoch=initial,
                  steps_per_epoch=steps, callbacks=callbacks + [saver] + list(extra_callbacks),
                  verbose=2)
        # EarlyStopping has put the best weights back: the phase's outcome.
        writer.write(model, phase=name, phase_done=True, epochs_done=epoch, history=history)
    if resume is not None:
        # Every phase was finished before the kill (it came during the export).
        resume.restore_model(model)
    return history


def state_key(fn_args, custom_config: Dict[str, Any]) -> str:
    """Same inputs and settings -> same key -> a rerun resumes the killed one."""
    payload = json.dumps([sorted(fn_args.train_files), sorted(fn_args.eval_files),
                          fn_args.transform_output, custom_config], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def member_state_dir(state_dir: str, member: int) -> str:
    """Where ensemble member ``member`` keeps its resume state (the first: ``state_dir`` itself,
    so a single model's state is where it always was)."""
    return state_dir if member == 0 else f"{state_dir}-member{member}"


def _train_member(fn_args, config: configs.Config, classes: List[str], size: int, strategy,
                  segmentation, member: int, state_dir: str):
    """Builds and trains one model (ensemble member ``member``, seeded ``training.seed + member``):
    (model, history).  A member whose state says it finished is restored, not trained again."""
    train = config.training
    seed = train.seed + member
    tf_keras.utils.set_random_seed(seed)
    if segmentation is not None:
        data_kw = dict(image_size=size, batch_size=train.batch_size, seed=seed,
                       sigmoid=segmentation.output == "sigmoid")
        train_ds = create_segmentation_dataset(fn_args.train_files, training=True,
                                               augmentation=train.augmentation, **data_kw)
        eval_ds = create_segmentation_dataset(fn_args.eval_files, training=False, **data_kw)
        with strategy.scope():
            model = segmentation_model.create_segmentation_model(
                config.model, segmentation, len(classes), train.augmentation, seed)
        model.task = "segmentation"
    else:
        data_kw = dict(image_size=size, batch_size=train.batch_size, seed=seed,
                       num_classes=len(classes), one_hot=train.label_smoothing > 0)
        train_ds = create_dataset(fn_args.train_files, training=True, **data_kw)
        eval_ds = create_dataset(fn_args.eval_files, training=False, **data_kw)
        with strategy.scope():
            model = model_lib.create_model(config.model, len(classes), train.augmentation, seed)
    if config.model.ensemble_size > 1:
        print(f"training ensemble member {member + 1}/{config.model.ensemble_size} (seed {seed})", flush=True)
    with strategy.scope():
        history = fit_phases(model, config, train_ds, eval_ds, state_dir, fn_args.model_run_dir)
    return model, history


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (``custom_config``: ``config``, ``classes``, ``state_root``)."""
    custom = fn_args.custom_config
    config = configs.from_dict(configs.Config, custom["config"])
    classes = list(custom["classes"])
    train = config.training
    tf_keras.utils.set_random_seed(train.seed)

    strategy, strategy_desc = strategy_lib.create_strategy(train.tpu)
    precision = strategy_lib.configure_precision(strategy, train.mixed_precision)
    size = backbones.input_size(config.model.backbone, config.model.image_size)
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)

    segmentation = configs.segmentation_settings(config)
    state_dir = os.path.join(custom["state_root"], state_key(fn_args, custom))
    member_dirs = [member_state_dir(state_dir, k) for k in range(config.model.ensemble_size)]
    resumed_after = sum(training_state.finished_epochs(d) for d in member_dirs)
    start = time.time()
    members, histories = [], []
    for k, member_dir in enumerate(member_dirs):
        model, member_history = _train_member(fn_args, config, classes, size, strategy, segmentation,
                                              k, member_dir)
        members.append(model)
        histories.append(member_history)
    with strategy.scope():
        model = model_lib.create_ensemble(members)
    history = histories[0]
    train_seconds = time.time() - start

    counts = model_lib.count_params(model)
    metadata = {
        "backbone": config.model.backbone, "weights": config.model.weights,
        "alpha": config.model.alpha, "params": counts, "strategy": strategy_desc,
        "precision": precision, "devices": [d.name for d in tf.config.list_logical_devices()],
        "train_seconds": train_seconds, "epochs_run": sum(len(h) for h in histories),
        # Epochs a killed earlier attempt had finished (0: trained in one go);
        # train_seconds counts this attempt only.
        "resumed_after_epochs": resumed_after,
    }
    extra_history = {}
    if len(members) > 1:
        metadata["ensemble"] = {"members": len(members), "seeds": [train.seed + k for k in range(len(members))]}
        # ``history`` stays the first member's epochs (the report's curves); every member's are here.
        extra_history["member_histories"] = histories
    with tf.io.gfile.GFile(os.path.join(fn_args.model_run_dir, features.HISTORY_FILE), "w") as f:
        json.dump({"history": history, **metadata, **extra_history}, f, indent=2)
    if segmentation is not None:
        metadata["task"] = "segmentation"
        metadata["foreground_class"] = segmentation.foreground_class
        metadata["class_values"] = [list(v) for v in segmentation.class_values]
    signatures.export_saved_model(model, tf_transform_output, classes, size,
                                  fn_args.serving_model_dir, metadata, segmentation)
    # Real eval images as TF Serving warm-up requests (components/warmup_requests.py).
    warmup_requests.write_warmup_requests(fn_args.serving_model_dir, fn_args.eval_files, size,
                                          classification=segmentation is None)
    tflite_export.export_tflite(model, fn_args.serving_model_dir, classes, size, config.export.tflite,
                                fn_args.train_files, config.export.calibration_images, segmentation)
    # The finished model is exported: the resume state is no longer needed.
    for member_dir in member_dirs:
        if tf.io.gfile.exists(member_dir):
            tf.io.gfile.rmtree(member_dir)
