"""Model factory and fine-tuning policies: exactly which layers train."""

import pytest
import tf_keras

from tests.conftest import MOBILENET_V2_035, require_shared
from visiontune import configs
from visiontune.components import backbones, model as model_lib


def _model(weights="none", size=32, backbone="mobilenet_v2", alpha=0.35):
    cfg = configs.ModelConfig(backbone=backbone, alpha=alpha, image_size=size, weights=weights)
    return model_lib.create_model(cfg, num_classes=5)


def _trainable_backbone_layers(model):
    return [layer.name for layer in model_lib.get_backbone_model(model).layers if layer.trainable and layer.weights]


@pytest.fixture(scope="module")
def pretrained():
    return _model(weights=require_shared(MOBILENET_V2_035), size=64)


@pytest.mark.shared
def test_frozen_trains_only_the_head(pretrained):
    model_lib.apply_fine_tune_policy(pretrained, "frozen")
    assert _trainable_backbone_layers(pretrained) == []
    names = {w.name.split("/")[0] for w in pretrained.trainable_weights}
    assert names == {"head_dense_0", "probabilities"}


@pytest.mark.shared
def test_train_last_n_counts_backbone_layers_and_keeps_batchnorm_frozen(pretrained):
    base = model_lib.get_backbone_model(pretrained)
    trained = model_lib.apply_fine_tune_policy(pretrained, "train_last", 8)
    last8 = base.layers[-8:]
    expected = [layer.name for layer in last8 if layer.weights and not model_lib.is_batch_norm(layer)]
    assert trained == expected and expected  # block_16 depthwise/project, Conv_1
    assert _trainable_backbone_layers(pretrained) == expected
    assert any(model_lib.is_batch_norm(layer) for layer in last8)
    assert all(not layer.trainable for layer in base.layers if model_lib.is_batch_norm(layer))


@pytest.mark.shared
def test_freeze_first_n_and_all(pretrained):
    base = model_lib.get_backbone_model(pretrained)
    trained = model_lib.apply_fine_tune_policy(pretrained, "freeze_first", 100)
    assert trained == [layer.name for layer in base.layers[100:]
                       if layer.weights and not model_lib.is_batch_norm(layer)]
    trained_all = model_lib.apply_fine_tune_policy(pretrained, "all")
    assert set(trained) < set(trained_all)
    assert all(not model_lib.is_batch_norm(base.get_layer(n)) for n in trained_all)


@pytest.mark.shared
def test_pretrained_batchnorm_runs_in_inference_mode(pretrained):
    """Even with every layer unfrozen, a training step must not move BN statistics."""
    import numpy as np

    model_lib.apply_fine_tune_policy(pretrained, "all")
    bn = next(layer for layer in model_lib.get_backbone_model(pretrained).layers if model_lib.is_batch_norm(layer))
    before = [w.numpy().copy() for w in bn.weights]
    pretrained.compile(optimizer=tf_keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    x = np.random.RandomState(0).randint(0, 255, (4, 64, 64, 3)).astype("uint8")
    pretrained.train_on_batch(x, np.array([0, 1, 2, 3]))
    for b, w in zip(before, bn.weights):
        assert np.array_equal(b, w.numpy()), w.name


def test_scratch_backbone_trains_its_batchnorm():
    model = _model(weights="none")
    trained = model_lib.apply_fine_tune_policy(model, "all", freeze_batch_norm=False)
    assert any(model_lib.is_batch_norm(model_lib.get_backbone_model(model).get_layer(n)) for n in trained)


def _kernel_in_file(path, layer):
    """A layer's kernel as the Keras weights file stores it (``LAYER/LAYER/kernel``)."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f[layer]
        name = next(n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]
                    if (n.decode() if isinstance(n, bytes) else n).endswith("kernel"))
        return group[name][()]


@pytest.mark.shared
def test_imagenet_weights_load_from_a_path_at_any_size():
    import numpy as np

    path = require_shared(MOBILENET_V2_035)
    model = _model(weights=path, size=96)
    assert model_lib.count_params(model)["total"] > 410_208
    # The file's weights are in the model: the first and the last convolution's kernels.
    base = model_lib.get_backbone_model(model)
    for layer in ("Conv1", "Conv_1"):
        np.testing.assert_array_equal(base.get_layer(layer).kernel.numpy(), _kernel_in_file(path, layer))
    scratch = model_lib.get_backbone_model(_model(weights="none", size=96))
    assert not np.array_equal(scratch.get_layer("Conv1").kernel.numpy(), _kernel_in_file(path, "Conv1"))


@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_every_registered_backbone_builds_with_its_own_preprocessing(name):
    size = max(backbones.get_backbone(name).min_size, 32)
    model = model_lib.create_model(configs.ModelConfig(backbone=name, weights="none", image_size=size,
                                                       alpha=0.35 if "mobilenet" in name else 1.0), 3)
    assert model.output_shape == (None, 3)
    assert model.get_layer("preprocess").backbone_name == name


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        backbones.get_backbone("resnet9000")
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        backbones.resolve_weights("/nope/weights.h5")
    with pytest.raises(ValueError, match="at least 75 px"):
        backbones.input_size("inception_v3", 64)


def test_contrast_normalisation_layers_stretch_dark_images():
    import numpy as np

    dark = np.random.RandomState(0).randint(5, 40, (2, 16, 16, 3)).astype("float32")
    for layer in (model_lib.Autocontrast(), model_lib.Equalize()):
        out = layer(dark).numpy()
        assert out.min() == 0.0 and out.max() == 255.0, type(layer).__name__
        # Monotonic per image: brighter input pixels never map to darker outputs.
        order = np.argsort(dark[0].ravel(), kind="stable")
        assert np.all(np.diff(out[0].ravel()[order]) >= -1e-3)


@pytest.mark.parametrize("contrast", ["autocontrast", "equalize"])
def test_contrast_setting_puts_the_layer_in_the_model(contrast):
    cfg = configs.ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights="none", image_size=32,
                              contrast=contrast)
    assert model_lib.create_model(cfg, 3).get_layer(contrast)


def test_center_crop_applies_only_at_inference():
    import numpy as np

    # A 32 px image: a 2 px black frame around white; 0.875 keeps the central 28 px.
    image = np.zeros((1, 32, 32, 3), "float32")
    image[:, 2:30, 2:30] = 255.0
    layer = model_lib.InferenceCenterCrop(0.875)
    np.testing.assert_array_equal(layer(image, training=False).numpy(), np.full_like(image, 255.0))
    np.testing.assert_array_equal(layer(image, training=True).numpy(), image)


def test_center_crop_setting_puts_the_layer_in_the_model():
    cfg = configs.ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights="none", image_size=32,
                              center_crop_fraction=0.875)
    assert model_lib.create_model(cfg, 3).get_layer("center_crop").fraction == 0.875
    plain = model_lib.create_model(configs.ModelConfig(backbone="mobilenet_v2", alpha=0.35,
                                                       weights="none", image_size=32), 3)
    assert "center_crop" not in [layer.name for layer in plain.layers]


def test_autograph_leaves_tf_keras_alone_and_still_converts_our_layers():
    """TensorFlow's rule skips ``keras``; Keras 2 is ``tf_keras`` now, so ``backbones`` adds the same rule.

    Without it every tf_keras layer's ``call`` is rewritten at each trace (a tiny Trainer run: 102 s vs 39 s);
    a layer of ours (or a test's) with Python control flow on tensors still works inside ``tf.function``.
    """
    import tensorflow as tf
    from tensorflow.python.autograph.impl import conversion

    assert conversion.is_allowlisted(tf_keras.layers.Conv2D.call)
    assert conversion.is_allowlisted(tf_keras.Model.train_step)
    assert not conversion.is_allowlisted(model_lib.RandomDownscale.call)

    class HalveIfLarge(tf_keras.layers.Layer):  # Python control flow on a tensor: needs AutoGraph
        def call(self, x):
            if tf.reduce_sum(x) > 10.0:
                x = x / 2.0
            return x

    layer = HalveIfLarge()
    traced = tf.function(lambda x: layer(x))
    assert float(tf.reduce_sum(traced(tf.fill([2, 8], 1.0)))) == 8.0
    assert float(tf.reduce_sum(traced(tf.fill([2, 2], 1.0)))) == 4.0
