"""A killed Trainer resumes at the next unfinished epoch and ends as an uninterrupted run would.

Kills here are of two kinds: an exception raised as an epoch starts (the
process goes on, nothing is cleaned up: ``fit_phases``' own resume state is
all that survives), and SIGKILL of a real ``visiontune run`` subprocess.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tests.conftest import trainer_config
from visiontune.components import model as model_lib, trainer, training_state


class _KillAt(tf_keras.callbacks.Callback):
    """Stops training the way a killed process would: as epoch ``epoch`` starts, without cleanup."""

    def __init__(self, epoch):
        super().__init__()
        self.kill_epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.kill_epoch:
            raise KeyboardInterrupt("killed")


class _Epochs(tf_keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


# Augmentation, dropout, a learning-rate schedule and early stopping, all of
# which a resume must restore for the resumed run to end where the
# uninterrupted one does.  Warm-up is epoch 0, fine-tuning epochs 1-4.
RESUME_SETTINGS = dict(
    warmup={"epochs": 1, "learning_rate": 0.01},
    fine_tune={"epochs": 4, "learning_rate": 0.003, "backbone": "all"},
    augmentation={"translation": 0.1, "horizontal_flip": True},
    early_stopping_patience=3, reduce_lr_patience=1, reduce_lr_factor=0.5)


def _fit(shapes_transformed, state_dir, log_dir, callbacks=(), **settings):
    """``fit_phases`` as ``run_fn`` calls it, seeded first: (model, history)."""
    _, transformed_dir, classes, size = shapes_transformed
    config = trainer_config(**{**RESUME_SETTINGS, **settings})
    tf_keras.utils.set_random_seed(config.training.seed)
    data = dict(image_size=size, batch_size=8, num_classes=len(classes), seed=config.training.seed)
    train_ds = trainer.create_dataset([os.path.join(transformed_dir, "train*")], training=True, **data)
    eval_ds = trainer.create_dataset([os.path.join(transformed_dir, "eval*")], training=False, **data)
    model = model_lib.create_model(config.model, len(classes), config.training.augmentation,
                                   config.training.seed)
    history = trainer.fit_phases(model, config, train_ds, eval_ds, state_dir, log_dir,
                                 extra_callbacks=list(callbacks))
    return model, history


@pytest.fixture(scope="module")
def uninterrupted(shapes_transformed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return _fit(shapes_transformed, str(tmp / "state"), str(tmp / "logs"))


_COMPARED = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


@pytest.mark.parametrize("kill_epoch", [1, 3])  # as fine-tuning starts; in the middle of it
def test_a_killed_trainer_resumes_at_the_next_epoch_and_ends_as_an_uninterrupted_run(
        shapes_transformed, uninterrupted, tmp_path, capsys, kill_epoch):
    model_ref, history_ref = uninterrupted
    state, logs = str(tmp_path / "state"), str(tmp_path / "logs")
    with pytest.raises(KeyboardInterrupt):
        _fit(shapes_transformed, state, logs, [_KillAt(kill_epoch)])
    assert training_state.finished_epochs(state) == kill_epoch
    capsys.readouterr()

    seen = _Epochs()
    model, history = _fit(shapes_transformed, state, logs, [seen])
    out = capsys.readouterr().out
    assert seen.seen == list(range(kill_epoch, 5))  # the next unfinished epoch, nothing redone
    # Every epoch once, the ones before the kill included.
    assert [(r["phase"], r["epoch"]) for r in history] == [(r["phase"], r["epoch"]) for r in history_ref]
    # Same weights, optimizer slots, learning rate, augmentation and dropout draws and shuffle
    # order: the resumed epochs are the uninterrupted run's, to float rounding.
    for row, ref in zip(history, history_ref):
        for key in _COMPARED:
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["epoch"], key)
    for w, ref in zip(model.get_weights(), model_ref.get_weights()):
        np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-5)
    # Keras' progress line counts the steps that ran after the resume (it said 2x before).
    _, transformed_dir, _, _ = shapes_transformed
    examples = sum(1 for _ in tf.data.TFRecordDataset(
        tf.io.gfile.glob(os.path.join(transformed_dir, "train*")), compression_type="GZIP"))
    steps = -(-examples // 8)
    lines = [line for line in out.splitlines() if " - loss: " in line]
    assert lines, out
    counts = {line.split(" - ")[0].strip() for line in lines}
    assert counts == {f"{steps}/{steps}"}, counts
