"""Training settings reach training: augmentation, optimizers, label smoothing, steps per
epoch, early stopping and learning-rate reduction, mixed precision."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tests.conftest import trainer_config
from visiontune import configs
from visiontune.components import model as model_lib, trainer

SIZE = 32


def _asymmetric_batch(n=8):
    """Images whose flips are told apart: a bright top-left corner on black."""
    images = np.zeros((n, SIZE, SIZE, 3), "float32")
    images[:, :8, :4] = 255.0
    return tf.constant(images)


@pytest.mark.parametrize("setting, layer", [
    ({"horizontal_flip": True}, "RandomFlip"), ({"rotation": 0.1}, "RandomRotation"),
    ({"zoom": 0.2}, "RandomZoom"), ({"translation": 0.1}, "RandomTranslation"),
    ({"brightness": 0.2}, "RandomBrightness"), ({"contrast": 0.3}, "RandomContrast"),
    ({"downscale_min_size": 8}, "RandomDownscale")])
def test_each_augmentation_setting_adds_its_layer_keeping_shape_and_dtype(setting, layer):
    aug = model_lib.create_augmentation(configs.AugmentationConfig(**setting), seed=1)
    assert [type(x).__name__ for x in aug.layers] == [layer]
    images = _asymmetric_batch()
    out = aug(images, training=True)
    assert out.shape == images.shape and out.dtype == tf.float32
    assert np.isfinite(out.numpy()).all()
    # At inference every augmentation is the identity.
    np.testing.assert_array_equal(aug(images, training=False).numpy(), images.numpy())


def test_no_augmentation_setting_means_no_augmentation_layer_in_the_model():
    config = trainer_config()
    model = model_lib.create_model(config.model, 3, configs.AugmentationConfig(), seed=1)
    assert "augmentation" not in [layer.name for layer in model.layers]


@pytest.mark.parametrize("horizontal, vertical", [(True, False), (False, True), (False, False)])
def test_flips_only_in_the_directions_asked_for(horizontal, vertical):
    """A mirrored "keep left" sign is a "keep right" sign: no flip the config did not ask for."""
    aug = model_lib.create_augmentation(
        configs.AugmentationConfig(horizontal_flip=horizontal, vertical_flip=vertical, brightness=0.0), seed=3)
    images = _asymmetric_batch(64)
    out = aug(images, training=True).numpy() if aug.layers else images.numpy()
    same = (out == images.numpy()).all(axis=(1, 2, 3))
    left_right = (out == images.numpy()[:, :, ::-1]).all(axis=(1, 2, 3))
    up_down = (out == images.numpy()[:, ::-1]).all(axis=(1, 2, 3))
    assert (same | (left_right & horizontal) | (up_down & vertical)).all()
    assert left_right.any() == horizontal and up_down.any() == vertical


def test_head_dropout_draws_a_stream_of_its_own():
    """A dropout generator seeded like the augmentation layers drew their numbers: masks
    that follow the shifts trained the demo to 0.24 instead of 0.89."""
    config = trainer_config(augmentation={"translation": 0.1})
    model = model_lib.create_model(config.model, 3, config.training.augmentation, seed=42)
    model(np.zeros((2, SIZE, SIZE, 3), "uint8"), training=True)
    def state(layer):
        return layer._random_generator._generator.state.numpy().tolist()

    translation, = [layer for layer in model.get_layer("augmentation").layers
                    if isinstance(layer, tf_keras.layers.RandomTranslation)]
    assert state(model.get_layer("head_dropout_0")) != state(translation)


# --------------------------------------------------------------------------- optimizers

@pytest.mark.parametrize("name, cls", [("adam", "Adam"), ("adamw", "AdamW"), ("sgd", "SGD"),
                                       ("rmsprop", "RMSprop")])
def test_the_optimizer_setting_and_the_phase_learning_rate_reach_the_compiled_model(name, cls):
    config = trainer_config(optimizer=name, weight_decay=0.01)
    model = model_lib.create_model(config.model, 3)
    trainer._compile(model, config.training, config.training.fine_tune, top_k=2)
    opt = model.optimizer
    assert type(opt).__name__ == cls
    assert float(opt.learning_rate.numpy()) == pytest.approx(config.training.fine_tune.learning_rate)
    if name == "sgd":
        assert opt.momentum == 0.9 and opt.nesterov


@pytest.mark.parametrize("weight_decay, expected", [(0.01, 0.01), (0.0, 1e-4)])
def test_adamw_decays_weights_by_the_configured_amount(weight_decay, expected):
    """Decoupled decay: with a zero gradient one step multiplies a weight by 1 - lr * decay."""
    opt = trainer.create_optimizer("adamw", 0.1, weight_decay)
    var = tf.Variable([2.0, -4.0])
    opt.apply_gradients([(tf.zeros(2), var)])
    np.testing.assert_allclose(var.numpy(), np.array([2.0, -4.0]) * (1 - 0.1 * expected), rtol=1e-6)
    # Adam has no decay: the same step leaves the weight alone.
    var = tf.Variable([2.0, -4.0])
    trainer.create_optimizer("adam", 0.1, weight_decay).apply_gradients([(tf.zeros(2), var)])
    np.testing.assert_array_equal(var.numpy(), [2.0, -4.0])


def test_an_unknown_optimizer_names_the_setting():
    with pytest.raises(ValueError, match=r"training.optimizer: unknown optimizer 'lion'"):
        trainer.create_optimizer("lion", 0.1)


# --------------------------------------------------------------------------- label smoothing

def test_label_smoothing_gives_one_hot_labels_and_a_smoothed_loss(shapes_transformed):
    _, transformed_dir, classes, size = shapes_transformed
    config = trainer_config(label_smoothing=0.2)
    ds = trainer.create_dataset([os.path.join(transformed_dir, "train*")], size, 8, training=False,
                                num_classes=len(classes), one_hot=True)
    _, labels = next(iter(ds))
    assert labels.shape == (8, 3) and set(np.unique(labels.numpy())) == {0.0, 1.0}
    model = model_lib.create_model(config.model, 3)
    trainer._compile(model, config.training, config.training.warmup, top_k=2)
    # Cross-entropy against (1 - 0.2) * one_hot + 0.2 / 3, computed by hand.
    probs = tf.constant([[0.7, 0.2, 0.1]])
    target = np.array([1.0, 0.0, 0.0]) * 0.8 + 0.2 / 3
    expected = -np.sum(target * np.log([0.7, 0.2, 0.1]))
    assert float(model.loss(tf.constant([[1.0, 0.0, 0.0]]), probs)) == pytest.approx(expected, rel=1e-5)
    assert [m.name for m in model.compiled_metrics._user_metrics] == ["accuracy", "top_k_accuracy"]


# --------------------------------------------------------------------------- fit_phases settings

def _datasets(shapes_transformed, config):
    _, transformed_dir, classes, size = shapes_transformed
    tf_keras.utils.set_random_seed(config.training.seed)
    data = dict(image_size=size, batch_size=config.training.batch_size, num_classes=len(classes))
    train_ds = trainer.create_dataset([os.path.join(transformed_dir, "train*")], training=True, **data)
    eval_ds = trainer.create_dataset([os.path.join(transformed_dir, "eval*")], training=False, **data)
    return train_ds, eval_ds


def test_steps_per_epoch_caps_every_epoch_and_never_runs_out(shapes_transformed, tmp_path, capsys):
    """3 steps x 4 epochs is 12 batches of a split of 4: every epoch still runs its 3 steps."""
    config = trainer_config(warmup={"epochs": 4, "learning_rate": 0.01}, fine_tune={"epochs": 0},
                            steps_per_epoch=3)
    train_ds, eval_ds = _datasets(shapes_transformed, config)
    assert sum(1 for _ in train_ds) < 12
    model = model_lib.create_model(config.model, 3)
    history = trainer.fit_phases(model, config, train_ds, eval_ds, str(tmp_path / "state"), str(tmp_path / "logs"))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    lines = [line.split(" - ")[0] for line in capsys.readouterr().out.splitlines() if " - loss: " in line]
    assert lines == ["3/3"] * 4


class _SpoilHeadFrom(tf_keras.callbacks.Callback):
    """From epoch ``epoch`` on, scrambles the output layer as each epoch starts: validation
    loss gets worse than at the epoch before, whatever the data."""

    def __init__(self, epoch):
        super().__init__()
        self.first = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= self.first:
            layer = self.model.get_layer(model_lib.OUTPUT_LAYER_NAME)
            rng = np.random.default_rng(epoch)
            layer.set_weights([rng.normal(0, 30, w.shape).astype("float32") for w in layer.get_weights()])


def test_early_stopping_and_reduce_lr_with_patience_restore_the_best_weights(shapes_transformed, tmp_path):
    config = trainer_config(warmup={"epochs": 0}, fine_tune={"epochs": 6, "learning_rate": 1e-4,
                                                             "backbone": "frozen"},
                            early_stopping_patience=2, reduce_lr_patience=1, reduce_lr_factor=0.5)
    train_ds, eval_ds = _datasets(shapes_transformed, config)
    model = model_lib.create_model(config.model, 3)
    history = trainer.fit_phases(model, config, train_ds, eval_ds, str(tmp_path / "state"),
                                 str(tmp_path / "logs"), extra_callbacks=[_SpoilHeadFrom(1)])
    # Epoch 1 is the best; 2 and 3 are worse: patience 2 stops after epoch 3.
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[0]["val_loss"] < min(r["val_loss"] for r in history[1:])
    # ReduceLROnPlateau halved the rate after each epoch without improvement (patience 1):
    # the rate each epoch trained at.
    assert [r["learning_rate"] for r in history] == pytest.approx([1e-4, 1e-4, 5e-5])
    # The phase ends with the best epoch's weights.
    loss = model.evaluate(eval_ds, verbose=0)[0]
    assert loss == pytest.approx(history[0]["val_loss"], rel=1e-4)


def test_a_cosine_phase_follows_its_curve_without_plateau_cuts_and_a_resume_keeps_it(
        shapes_transformed, tmp_path):
    """Cosine fine-tuning: each epoch's rate is the curve's (counted from the phase's own first
    epoch), ReduceLROnPlateau is off even when validation gets worse, and a run killed mid-phase
    resumes on the same curve."""
    from tests.test_resume import _KillAt

    settings = dict(warmup={"epochs": 2, "learning_rate": 1e-3},
                    fine_tune={"epochs": 4, "learning_rate": 1e-4, "backbone": "frozen",
                               "schedule": "cosine"},
                    early_stopping_patience=0, reduce_lr_patience=1, reduce_lr_factor=0.5)
    config = trainer_config(**settings)
    curve = [1e-4 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(4)]
    assert [trainer.cosine_learning_rate(config.training.fine_tune, k) for k in range(4)] == pytest.approx(curve)

    def fit(state, callbacks=()):
        train_ds, eval_ds = _datasets(shapes_transformed, config)
        model = model_lib.create_model(config.model, 3)
        return trainer.fit_phases(model, config, train_ds, eval_ds, str(tmp_path / state),
                                  str(tmp_path / "logs"), extra_callbacks=list(callbacks))

    # The head is spoiled after the warm-up: validation worsens, and only the schedule moves the rate.
    history = fit("a", [_SpoilHeadFrom(2)])
    rates = [r["learning_rate"] for r in history]
    assert rates == pytest.approx([1e-3, 1e-3] + curve, rel=1e-5)
    # (Patience 1 would have cut the rate: a later fine-tuning epoch is no better than its first.)
    assert max(r["val_loss"] for r in history[3:]) >= history[2]["val_loss"]

    with pytest.raises(KeyboardInterrupt):
        fit("b", [_KillAt(4)])
    resumed = fit("b")
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["learning_rate"] for r in resumed][2:] == pytest.approx(curve, rel=1e-5)


# --------------------------------------------------------------------------- mixed precision

def test_a_mixed_float16_policy_keeps_a_float32_output_layer():
    """Softmax in float16 saturates: under mixed precision the output stays float32 (a CPU
    check of the model's dtypes; the GPU run itself is not needed for that)."""
    config = trainer_config()
    model_cfg = dataclasses.replace(config.model, weights="none")
    try:
        tf_keras.mixed_precision.set_global_policy("mixed_float16")
        model = model_lib.create_model(model_cfg, 3)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("head_dense_0").compute_dtype == "float16"
    output = model.get_layer(model_lib.OUTPUT_LAYER_NAME)
    assert output.compute_dtype == "float32" and output.variable_dtype == "float32"
    assert model.output.dtype == tf.float32
