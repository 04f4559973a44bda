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


class _KillAtTrainEnd(tf_keras.callbacks.Callback):
    """Killed as the first phase ends: its last epoch is written, the phase not yet marked done."""

    def on_train_end(self, logs=None):
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


# As warm-up ends (before the phase is marked done), in the middle of fine-tuning.
@pytest.mark.parametrize("kill_epoch", [1, 3])
def test_a_killed_trainer_resumes_at_the_next_epoch_and_ends_as_an_uninterrupted_run(
        shapes_transformed, uninterrupted, tmp_path, capsys, kill_epoch):
    model_ref, history_ref = uninterrupted
    state, logs = str(tmp_path / "state"), str(tmp_path / "logs")
    with pytest.raises(KeyboardInterrupt):
        _fit(shapes_transformed, state, logs, [_KillAtTrainEnd() if kill_epoch == 1 else _KillAt(kill_epoch)])
    assert training_state.finished_epochs(state) == kill_epoch
    assert not training_state.load(state).phase_done
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
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (row["epoch"], key)
    # Equal in practice (measured: 0.0 apart).  An optimizer step counted once more
    # (Keras running into the end of a dataset of unknown size) left them 2e-5 apart,
    # a wrong shuffle order 1e-2.
    for w, ref in zip(model.get_weights(), model_ref.get_weights()):
        np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)
    # Keras' progress line counts the steps that ran after the resume (it said 2x before).
    _, transformed_dir, _, _ = shapes_transformed
    examples = sum(1 for _ in tf.data.TFRecordDataset(
        tf.io.gfile.glob(os.path.join(transformed_dir, "train*")), compression_type="GZIP"))
    steps = -(-examples // 8)
    lines = [line for line in out.splitlines() if " - loss: " in line]
    assert lines, out
    counts = {line.split(" - ")[0].strip() for line in lines}
    assert counts == {f"{steps}/{steps}"}, counts


# --------------------------------------------------------------------------- the resume state itself

def _tiny_model(seed=0):
    tf_keras.utils.set_random_seed(seed)
    inputs = tf_keras.Input((4,))
    x = tf_keras.layers.Dropout(0.5, seed=1, rng_type="stateful", name="drop")(inputs)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="out")(x))
    model.compile(tf_keras.optimizers.Adam(0.01), "mse")
    model.fit(np.ones((8, 4), "float32"), np.ones((8, 2), "float32"), epochs=1, verbose=0)
    return model


def test_the_state_restores_early_stopping_reduce_lr_the_learning_rate_and_the_rng(tmp_path):
    model = _tiny_model()
    stop = tf_keras.callbacks.EarlyStopping(patience=4, restore_best_weights=True)
    reduce = tf_keras.callbacks.ReduceLROnPlateau(patience=3)
    stop.set_model(model)
    reduce.set_model(model)
    stop.on_train_begin()
    reduce.on_train_begin()
    stop.wait, stop.best, stop.best_epoch, stop.best_weights = 2, 0.25, 3, [w * 2 for w in model.get_weights()]
    reduce.wait, reduce.best, reduce.cooldown_counter = 1, 0.5, 2
    model.optimizer.learning_rate.assign(0.004)  # as ReduceLROnPlateau lowers it
    writer = training_state.StateWriter(str(tmp_path))
    writer.write(model, phase="fine_tune", phase_done=False, epochs_done=6, history=[{"epoch": 6}],
                 callbacks=[stop, reduce])

    state = training_state.load(str(tmp_path))
    assert (state.phase, state.phase_done, state.epochs_done, state.history) == (
        "fine_tune", False, 6, [{"epoch": 6}])
    other = _tiny_model(seed=1)
    assert not np.allclose(other.get_weights()[0], model.get_weights()[0])
    state.restore_model(other)
    state.restore_optimizer(other)
    for w, ref in zip(other.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(w, ref)
    for v, ref in zip(other.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(v.numpy(), ref.numpy())
    assert float(other.optimizer.learning_rate.numpy()) == pytest.approx(0.004)
    # The dropout layer's generator: the next masks are the ones the saved model would draw.
    gen = other.get_layer("drop")._random_generator._generator
    np.testing.assert_array_equal(gen.state.numpy(), model.get_layer("drop")._random_generator._generator.state.numpy())

    stop2 = tf_keras.callbacks.EarlyStopping(patience=4, restore_best_weights=True)
    reduce2 = tf_keras.callbacks.ReduceLROnPlateau(patience=3)
    for cb in (stop2, reduce2):
        cb.set_model(other)
        cb.on_train_begin()  # resets them, as fit does; the saver restores them after
    state.restore_callbacks([stop2, reduce2])
    assert (stop2.wait, stop2.best, stop2.best_epoch) == (2, 0.25, 3)
    for w, ref in zip(stop2.best_weights, stop.best_weights):
        np.testing.assert_array_equal(w, ref)
    assert (reduce2.wait, reduce2.best, reduce2.cooldown_counter) == (1, 0.5, 2)


def test_a_kill_during_a_write_leaves_the_previous_state(tmp_path):
    model = _tiny_model()
    writer = training_state.StateWriter(str(tmp_path))
    writer.write(model, phase="warmup", phase_done=False, epochs_done=1, history=[{"epoch": 1}])
    # What a kill between the two writes leaves: the next arrays half written, state.json.tmp too.
    (tmp_path / "state-000002.bin").write_bytes(b"PK\x03\x04 half")
    (tmp_path / "state.json.tmp").write_text('{"format": 1, "pha')
    assert training_state.load(str(tmp_path)).epochs_done == 1
    # The next attempt numbers its files past the debris and clears it on its first write.
    writer = training_state.StateWriter(str(tmp_path))
    writer.write(model, phase="warmup", phase_done=False, epochs_done=2, history=[{"epoch": 1}, {"epoch": 2}])
    assert training_state.load(str(tmp_path)).epochs_done == 2
    assert sorted(os.listdir(tmp_path)) == ["state-000003.bin", "state.json"]


def test_a_state_of_another_model_is_not_restored(tmp_path):
    training_state.StateWriter(str(tmp_path)).write(_tiny_model(), phase="warmup", phase_done=False,
                                                    epochs_done=1, history=[])
    state = training_state.load(str(tmp_path))
    wider = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(3)])
    assert state.matches(_tiny_model()) and not state.matches(wider)


@pytest.mark.parametrize("damage", ["truncated", "arrays missing", "other format"])
def test_a_damaged_state_starts_training_over_with_a_warning(tmp_path, caplog, damage):
    model = _tiny_model()
    training_state.StateWriter(str(tmp_path)).write(model, phase="warmup", phase_done=False,
                                                    epochs_done=1, history=[])
    meta = tmp_path / "state.json"
    if damage == "truncated":
        meta.write_text(meta.read_text()[:20])
    elif damage == "arrays missing":
        os.remove(tmp_path / "state-000001.bin")
    else:
        meta.write_text(meta.read_text().replace('"format": 1', '"format": 99'))
    assert training_state.load(str(tmp_path)) is None
    assert "training starts over" in caplog.text


# --------------------------------------------------------------------------- a real `visiontune run`, SIGKILLed

@pytest.mark.e2e
def test_a_sigkilled_visiontune_run_resumes_at_the_next_epoch_with_every_epoch_in_its_history(stopped_run):
    """SIGKILL of the whole ``visiontune run`` process group during fine-tuning, then the
    same command again: the Trainer resumes at the epoch that was running, and the
    exported model's history.json holds every epoch once.

    The run is the shared ``stopped_run`` (conftest.py): its first run was stopped
    with Ctrl-C (test_errors_run.py), the second is the one SIGKILLed here."""
    import glob
    import json
    import signal

    from tests.stopped_run import KILL_AT

    killed, out = stopped_run.killed, stopped_run.out
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert killed.stdout.splitlines()[-1].startswith(KILL_AT)  # epochs 1 (warm-up) and 2 finished, 3 running
    states = stopped_run.states_after_kill
    assert len(states) == 1 and states[0]["epochs_done"] == 2, states

    rerun = stopped_run.finished
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming training at epoch 3/3 (phase fine_tune)" in rerun.stdout
    assert [line for line in output.splitlines() if line.startswith("Epoch ")] == ["Epoch 3/3"]
    histories = sorted(glob.glob(os.path.join(out, "**", "history.json"), recursive=True), key=os.path.getmtime)
    history = json.load(open(histories[-1]))
    assert [(r["phase"], r["epoch"]) for r in history["history"]] == [
        ("warmup", 1), ("fine_tune", 2), ("fine_tune", 3)]
    assert history["resumed_after_epochs"] == 2
    assert json.loads(rerun.stdout[rerun.stdout.rindex("\n{") + 1:])["pushed"]
    assert not glob.glob(os.path.join(out, "**", "trainer_state", "*"), recursive=True)  # cleaned up after export
