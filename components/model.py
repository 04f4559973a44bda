"""Builds the classifier: uint8 pixels -> augmentation -> backbone scaling -> backbone -> head.

Scaling and ``preprocess_input`` live inside the model, not in Transform: the
transformed data stays compact uint8, and a SavedModel can never be served with
pixels scaled for another backbone.

Fine-tuning policies (``PhaseConfig.backbone``) decide which backbone layers
train.  BatchNorm layers of a pretrained backbone never train and always run in
inference mode: with a few dozen images per class, a batch's statistics are far
noisier than the ImageNet ones the following layers were trained against, and
updating them wrecks the pretrained features in the first steps (keras-io,
"Transfer learning & fine-tuning").  A backbone trained from scratch
(``weights: none``) has no statistics to protect, so its BatchNorm trains.
"""

from __future__ import annotations

import re
from typing import List, Sequence

import tensorflow as tf
import tf_keras
from tf_keras.src.engine import base_layer

from visiontune import configs
from visiontune.components import backbones

BACKBONE_LAYER_NAME = "backbone"
OUTPUT_LAYER_NAME = "probabilities"
SCRATCH_BN_MOMENTUM = 0.9


@tf_keras.utils.register_keras_serializable(package="visiontune")
class BackbonePreprocess(tf_keras.layers.Layer):
    """Casts uint8 pixels to float and applies the backbone's own ``preprocess_input``."""

    def __init__(self, backbone_name: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone_name = backbone_name
        self._fn = backbones.get_backbone(backbone_name).preprocess_input

    def call(self, inputs):
        return self._fn(tf.cast(inputs, self.compute_dtype))

    def get_config(self):
        return {**super().get_config(), "backbone_name": self.backbone_name}


@tf_keras.utils.register_keras_serializable(package="visiontune")
class Autocontrast(tf_keras.layers.Layer):
    """Stretches each image's value range to [0, 255] (per image, all channels together).

    Colour ratios are kept (one scale for the three channels), which matters
    when colour carries the class, as for traffic signs.
    """

    def call(self, inputs):
        lo = tf.reduce_min(inputs, axis=[1, 2, 3], keepdims=True)
        hi = tf.reduce_max(inputs, axis=[1, 2, 3], keepdims=True)
        return (inputs - lo) * (255.0 / tf.maximum(hi - lo, 1.0))


@tf_keras.utils.register_keras_serializable(package="visiontune")
class Equalize(tf_keras.layers.Layer):
    """Per-image histogram equalisation over all three channels together.

    One mapping for the three channels keeps hues roughly intact (equalising
    channels separately shifts colours, and colour carries the class for
    traffic signs), while dark and low-contrast images get the full range.
    """

    def call(self, inputs):
        shape = tf.shape(inputs)
        values = tf.cast(tf.clip_by_value(tf.round(inputs), 0.0, 255.0), tf.int32)
        flat = tf.reshape(values, [shape[0], -1])
        hist = tf.math.bincount(flat, minlength=256, maxlength=256, axis=-1)
        cdf = tf.cast(tf.cumsum(hist, axis=-1), tf.float32)
        cdf_min = tf.reduce_min(tf.where(cdf > 0, cdf, tf.fill(tf.shape(cdf), 1e30)), axis=-1, keepdims=True)
        total = cdf[:, -1:]
        lut = (cdf - cdf_min) * (255.0 / tf.maximum(total - cdf_min, 1.0))
        lut = tf.clip_by_value(lut, 0.0, 255.0)
        mapped = tf.gather(lut, flat, batch_dims=1)
        return tf.cast(tf.reshape(mapped, shape), inputs.dtype)


@tf_keras.utils.register_keras_serializable(package="visiontune")
class RandomDownscale(base_layer.BaseRandomLayer):
    """Training only: shrinks some images to a random smaller side, then scales them back up.

    Photos of far-away objects arrive small and come out of Transform's resize
    blurry; a training set of close-ups never shows the model that blur.
    GTSRB is the case in point: its test signs have a median width of 42 px
    against 70 px in the 40-per-class training set.  One random side per batch
    (resizing is per batch), applied to each image with ``probability``.
    """

    def __init__(self, min_size: int, probability: float = 0.5, max_size: int = 0, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.min_size = int(min_size)
        self.max_size = int(max_size)  # 0: the input size
        self.probability = float(probability)
        self.seed = seed

    def call(self, inputs, training=None):
        if not training:
            return inputs
        shape = tf.shape(inputs)
        side = shape[1]
        largest = tf.cast(tf.minimum(side, self.max_size) if self.max_size else side, tf.float32)
        small = tf.cast(self._random_generator.random_uniform(
            [], minval=float(self.min_size), maxval=largest + 1.0), tf.int32)
        small = tf.clip_by_value(small, 1, side)
        blurred = tf.image.resize(inputs, [small, small], method="area")
        blurred = tf.cast(tf.image.resize(blurred, shape[1:3], method="bilinear"), inputs.dtype)
        chosen = self._random_generator.random_uniform([shape[0], 1, 1, 1]) < self.probability
        return tf.where(chosen, blurred, inputs)

    def get_config(self):
        return {**super().get_config(), "min_size": self.min_size, "max_size": self.max_size,
                "probability": self.probability, "seed": self.seed}


@tf_keras.utils.register_keras_serializable(package="visiontune")
class InferenceCenterCrop(tf_keras.layers.Layer):
    """At inference only: keeps the central ``fraction`` of each image, scaled back to its size.

    Random zoom and shifts in training, and photos taken from further away in
    use, leave the object smaller in a whole served image than the model saw
    it during training; looking at the centre evens that out (the standard
    ImageNet evaluation crop, 0.875).  In the model, so both serving signatures
    and the Evaluator crop alike; training passes images through untouched.
    """

    def __init__(self, fraction: float, **kwargs):
        super().__init__(**kwargs)
        self.fraction = float(fraction)

    def call(self, inputs, training=None):
        if training or self.fraction >= 1.0:
            return inputs
        shape = tf.shape(inputs)
        side = tf.cast(shape[1:3], tf.float32)
        crop = tf.maximum(tf.cast(tf.round(side * self.fraction), tf.int32), 1)
        offset = (shape[1:3] - crop) // 2
        cropped = tf.slice(inputs, tf.stack([0, offset[0], offset[1], 0]),
                           tf.stack([-1, crop[0], crop[1], -1]))
        return tf.cast(tf.image.resize(cropped, shape[1:3], method="bilinear"), inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "fraction": self.fraction}


def create_augmentation(aug: configs.AugmentationConfig, seed: int) -> tf_keras.Sequential:
    """Random transforms, active only when the model is called with ``training=True``."""
    L = tf_keras.layers
    layers: List[tf_keras.layers.Layer] = []
    mode = {(True, True): "horizontal_and_vertical", (True, False): "horizontal",
            (False, True): "vertical"}.get((aug.horizontal_flip, aug.vertical_flip))
    if mode:
        layers.append(L.RandomFlip(mode, seed=seed))
    if aug.downscale_min_size:
        layers.append(RandomDownscale(aug.downscale_min_size, aug.downscale_probability,
                                      aug.downscale_max_size, seed=seed, name="random_downscale"))
    if aug.rotation:
        layers.append(L.RandomRotation(aug.rotation, fill_mode="reflect", seed=seed))
    if aug.zoom:
        layers.append(L.RandomZoom(aug.zoom, fill_mode="reflect", seed=seed))
    if aug.translation:
        layers.append(L.RandomTranslation(aug.translation, aug.translation, fill_mode="reflect", seed=seed))
    if aug.brightness:
        layers.append(L.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed))
    if aug.contrast:
        layers.append(L.RandomContrast(aug.contrast, seed=seed))
    return tf_keras.Sequential(layers, name="augmentation")


DROPOUT_SEED_OFFSET = 1009


def _dropout(rate: float, seed: int, name: str) -> tf_keras.layers.Dropout:
    """Dropout drawing from a ``tf.random.Generator`` (Keras' default here is a stateful op
    whose state lives in the kernel): its state can be saved, so a resumed Trainer
    draws the masks the uninterrupted run would have drawn (``components.training_state``).

    Its seed must differ from the augmentation layers' (``seed``): generators with
    one seed draw one stream, and masks that follow the random shifts made the
    demo train to 0.24 instead of 0.89 accuracy (measured, 12 epochs).
    """
    return tf_keras.layers.Dropout(rate, seed=seed, rng_type="stateful", name=name)


def create_model(model_cfg: configs.ModelConfig, num_classes: int,
                 augmentation: configs.AugmentationConfig = configs.AugmentationConfig(),
                 seed: int = 42) -> tf_keras.Model:
    """The classifier, taking ``[batch, size, size, 3]`` uint8 pixels, returning probabilities."""
    size = backbones.input_size(model_cfg.backbone, model_cfg.image_size)
    pretrained = backbones.resolve_weights(model_cfg.weights) is not None
    base = backbones.create_backbone(model_cfg.backbone, size, model_cfg.weights, model_cfg.alpha)
    base._name = BACKBONE_LAYER_NAME  # a stable name the fine-tuning policies look up
    if not pretrained:
        # Keras' backbones average BatchNorm statistics with momentum up to 0.999,
        # tuned for ImageNet's millions of steps; a few hundred steps from scratch
        # would leave inference-time statistics mostly at their initial values.
        for layer in base.layers:
            if is_batch_norm(layer):
                layer.momentum = SCRATCH_BN_MOMENTUM

    inputs = tf_keras.Input(shape=(size, size, 3), dtype=tf.uint8, name="image")
    # Rescaling(1) is just a cast to float that every Keras version serializes.
    x = tf_keras.layers.Rescaling(1.0, name="to_float")(inputs)
    if model_cfg.center_crop_fraction < 1.0:
        x = InferenceCenterCrop(model_cfg.center_crop_fraction, name="center_crop")(x)
    augment = create_augmentation(augmentation, seed)
    if augment.layers:
        x = augment(x)
    if model_cfg.contrast == "autocontrast":
        x = Autocontrast(name="autocontrast")(x)
    elif model_cfg.contrast == "equalize":
        x = Equalize(name="equalize")(x)
    x = BackbonePreprocess(model_cfg.backbone, name="preprocess")(x)
    # training=False keeps a pretrained backbone's BatchNorm in inference mode even
    # when its other layers are unfrozen; a scratch backbone lets Keras decide.
    x = base(x, training=False if pretrained else None)
    head = model_cfg.head
    pool = {"avg": tf_keras.layers.GlobalAveragePooling2D, "max": tf_keras.layers.GlobalMaxPooling2D}
    if head.pooling not in pool:
        raise ValueError(f"model.head.pooling: expected avg or max, got {head.pooling!r}")
    x = pool[head.pooling](name="pool")(x)
    for i, units in enumerate(head.dense_units):
        x = tf_keras.layers.Dense(units, activation=head.activation, name=f"head_dense_{i}")(x)
        if head.dropout:
            x = _dropout(head.dropout, seed + DROPOUT_SEED_OFFSET + i, f"head_dropout_{i}")(x)
    if not head.dense_units and head.dropout:
        x = _dropout(head.dropout, seed + DROPOUT_SEED_OFFSET, "head_dropout")(x)
    # float32 output even under mixed precision: softmax in float16 saturates.
    outputs = tf_keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                    name=OUTPUT_LAYER_NAME)(x)
    model = tf_keras.Model(inputs, outputs, name=f"visiontune_{model_cfg.backbone}")
    model.pretrained_backbone = pretrained
    return model


ENSEMBLE_MEMBER_PREFIX = "member_"


def create_ensemble(members: Sequence[tf_keras.Model]) -> tf_keras.Model:
    """One classifier averaging the probabilities of ``members`` (same input, same classes).

    The members stay whole sub-models (``member_0``, ``member_1``, ...), each
    with its own preprocessing, so the ensemble takes the same uint8 pixels
    and serves through the same signatures as a single model.  The output is
    a float32 average named like a single model's output layer.
    """
    if len(members) == 1:
        return members[0]
    inputs = tf_keras.Input(shape=members[0].input_shape[1:], dtype=members[0].input.dtype, name="image")
    outputs = []
    for k, member in enumerate(members):
        # A new model over the member's layers (its weights, not a copy) that was never compiled:
        # the trained member's optimizer (Adam's two slots per weight) stays out of the SavedModel.
        view = tf_keras.Model(member.inputs, member.outputs, name=f"{ENSEMBLE_MEMBER_PREFIX}{k}")
        outputs.append(view(inputs))
    average = tf_keras.layers.Average(dtype="float32", name=OUTPUT_LAYER_NAME)(outputs)
    model = tf_keras.Model(inputs, average, name=f"ensemble_of_{len(members)}")
    model.pretrained_backbone = members[0].pretrained_backbone
    return model


def ensemble_members(model: tf_keras.Model) -> List[tf_keras.Model]:
    """The members of an ensemble built by ``create_ensemble``; ``[model]`` for a single model."""
    members = [layer for layer in model.layers if isinstance(layer, tf_keras.Model)
               and layer.name.startswith(ENSEMBLE_MEMBER_PREFIX)]
    return members or [model]


def get_backbone_model(model: tf_keras.Model) -> tf_keras.Model:
    return model.get_layer(BACKBONE_LAYER_NAME)


def is_batch_norm(layer: tf_keras.layers.Layer) -> bool:
    return isinstance(layer, (tf_keras.layers.BatchNormalization,
                              tf_keras.layers.experimental.SyncBatchNormalization))


def apply_fine_tune_policy(model: tf_keras.Model, policy: str, layers: int = 0,
                           freeze_batch_norm: bool = True) -> List[str]:
    """Sets which backbone layers train; returns the names of the trainable ones.

    ``layers`` counts the backbone's own layers (``backbone.layers``), BatchNorm
    included, as the tutorials' "last 8 layers" do; BatchNorm layers in that
    range still stay frozen.  The head always trains.  Recompile afterwards.
    """
    base = get_backbone_model(model)
    all_layers = base.layers
    if policy == "frozen":
        chosen: Sequence = []
    elif policy == "all":
        chosen = all_layers
    elif policy == "freeze_first":
        chosen = all_layers[layers:]
    elif policy == "train_last":
        chosen = all_layers[-layers:] if layers else []
    elif policy == "last_block":
        chosen = last_block(base)
    else:
        raise ValueError(f"unknown fine-tuning policy {policy!r}")
    chosen_ids = {id(layer) for layer in chosen}
    # A frozen container hides every sublayer's weights from the optimizer, so
    # the backbone itself must be trainable for per-layer switches to count.
    base.trainable = bool(chosen_ids)
    trainable = []
    for layer in all_layers:
        train = id(layer) in chosen_ids and not (freeze_batch_norm and is_batch_norm(layer))
        layer.trainable = train
        if train and layer.weights:
            trainable.append(layer.name)
    return trainable


# keras.applications block names: VGG/Xception "block5_conv1", MobileNetV2
# "block_16_project", ResNet/DenseNet "conv5_block3_out", EfficientNet "block7a_se".
_BLOCK_NAME = re.compile(r"^(.*?block_?\d+[a-z]?)_")


def last_block(base: tf_keras.Model) -> List[tf_keras.layers.Layer]:
    """The backbone's last block and every layer after it (e.g. VGG16's block5_*).

    "Fine-tune only the last encoder block" as the segmentation tutorial does:
    the block boundaries come from keras.applications' layer names.
    """
    names = [layer.name for layer in base.layers]
    prefixes = [m.group(1) for m in map(_BLOCK_NAME.match, names) if m]
    if not prefixes:
        raise ValueError(f"backbone {base.name!r} has no block-named layers: use "
                         "backbone: train_last with a layer count instead of last_block")
    prefix = prefixes[-1] + "_"
    start = next(i for i, name in enumerate(names) if name.startswith(prefix))
    return base.layers[start:]


def count_params(model: tf_keras.Model) -> dict:
    trainable = sum(int(tf.size(w)) for w in model.trainable_weights)
    total = sum(int(tf.size(w)) for w in model.weights)
    return {"trainable": trainable, "non_trainable": total - trainable, "total": total}
