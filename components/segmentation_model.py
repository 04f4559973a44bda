"""Builds the segmentation model: uint8 pixels -> backbone encoder -> transposed-convolution decoder.

The encoder is a backbone from the same registry as classification, with its
own ``preprocess_input`` inside the model.  The decoder doubles the resolution
with a ``Conv2DTranspose`` per step until it is back at the input size; with
``skip_connections`` (U-Net) each step also sees the encoder's feature map of
the same resolution, which carries the fine detail (object outlines) that the
deepest, 32x smaller features have lost.

Skip features are found from the encoder's layer shapes, not from per-backbone
layer names: at each resolution the *last* layer producing it (VGG16's
``block2_conv2`` at 1/2, MobileNetV2's ``block_1_expand_relu`` ...), so any
backbone in the registry works.  The input size must therefore be a multiple
of the encoder's total stride (32), or the decoder's steps would not land on
the skip resolutions.

The encoder is the nested model named ``backbone``, so the fine-tuning
policies of ``components.model`` apply unchanged (BatchNorm frozen, in
inference mode, for a pretrained encoder).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import tensorflow as tf
import tf_keras

from visiontune import configs
from visiontune.components import backbones, model as model_lib

ENCODER_STRIDE = 32
# The decoder's BatchNorm starts from nothing and sees a few hundred steps (25
# frames, a few per batch): Keras' default momentum of 0.99 would leave its
# inference-time statistics far from the data for most of training, so the
# eval loss lags the train loss by tens of epochs (measured on CDnet2014).
DECODER_BN_MOMENTUM = 0.9


def skip_layers(base: tf_keras.Model, size: int) -> Dict[int, str]:
    """Downsampling factor -> name of the last encoder layer at ``size / factor`` px."""
    found: Dict[int, str] = {}
    for layer in base.layers[1:]:
        shape = layer.output.shape if not isinstance(layer.output, list) else None
        if shape is None or len(shape) != 4 or not shape[1]:
            continue
        factor = size // shape[1]
        if shape[1] * factor == size and factor in (1, 2, 4, 8, 16):
            found[factor] = layer.name  # later layers overwrite earlier ones
    return found


def create_segmentation_model(model_cfg: configs.ModelConfig, seg: configs.SegmentationConfig,
                              num_classes: int,
                              augmentation: configs.AugmentationConfig = configs.AugmentationConfig(),
                              seed: int = 42) -> tf_keras.Model:
    """``[batch, s, s, 3]`` uint8 -> ``[batch, s, s, classes]`` probabilities (or ``[.., 1]`` sigmoid)."""
    size = backbones.input_size(model_cfg.backbone, model_cfg.image_size)
    if size % ENCODER_STRIDE:
        raise ValueError(f"model.image_size {size}: segmentation needs a multiple of {ENCODER_STRIDE}")
    pretrained = backbones.resolve_weights(model_cfg.weights) is not None
    base = backbones.create_backbone(model_cfg.backbone, size, model_cfg.weights, model_cfg.alpha)
    if not pretrained:
        for layer in base.layers:
            if model_lib.is_batch_norm(layer):
                layer.momentum = model_lib.SCRATCH_BN_MOMENTUM
    deepest = base.output.shape[1]
    steps = (size // deepest).bit_length() - 1
    skips = skip_layers(base, size) if seg.skip_connections else {}
    skips.pop(1, None)  # full-resolution features: the decoder's last step needs none
    skip_factors = sorted((f for f in skips if f < size // deepest), reverse=True)
    encoder = tf_keras.Model(base.input, [base.output] + [base.get_layer(skips[f]).output
                                                          for f in skip_factors],
                             name=model_lib.BACKBONE_LAYER_NAME)

    inputs = tf_keras.Input(shape=(size, size, 3), dtype=tf.uint8, name="image")
    x = tf_keras.layers.Rescaling(1.0, name="to_float")(inputs)
    # Flips move pixels, so they happen to image and mask together in the
    # Trainer's tf.data pipeline; only photometric changes belong in the model.
    photometric = dataclasses.replace(augmentation, horizontal_flip=False, vertical_flip=False)
    augment = model_lib.create_augmentation(photometric, seed)
    if augment.layers:
        x = augment(x)
    if model_cfg.contrast == "autocontrast":
        x = model_lib.Autocontrast(name="autocontrast")(x)
    elif model_cfg.contrast == "equalize":
        x = model_lib.Equalize(name="equalize")(x)
    x = model_lib.BackbonePreprocess(model_cfg.backbone, name="preprocess")(x)
    features = encoder(x, training=False if pretrained else None)
    if not isinstance(features, (list, tuple)):
        features = [features]  # no skips: a one-output encoder returns a tensor
    x, skip_maps = features[0], dict(zip(skip_factors, features[1:]))

    filters: List[int] = list(seg.decoder_filters) or [32]
    L = tf_keras.layers
    factor = size // deepest
    for step in range(steps):
        n = filters[min(step, len(filters) - 1)]
        factor //= 2
        x = L.Conv2DTranspose(n, 3, strides=2, padding="same", use_bias=False, name=f"up{step}")(x)
        x = L.BatchNormalization(momentum=DECODER_BN_MOMENTUM, name=f"up{step}_bn")(x)
        x = L.ReLU(name=f"up{step}_relu")(x)
        if factor in skip_maps:
            x = L.Concatenate(name=f"up{step}_skip")([x, skip_maps[factor]])
            x = L.Conv2D(n, 3, padding="same", use_bias=False, name=f"up{step}_conv")(x)
            x = L.BatchNormalization(momentum=DECODER_BN_MOMENTUM, name=f"up{step}_conv_bn")(x)
            x = L.ReLU(name=f"up{step}_conv_relu")(x)
    sigmoid = seg.output == "sigmoid"
    # float32 output even under mixed precision: softmax in float16 saturates.
    outputs = L.Conv2D(1 if sigmoid else num_classes, 1, activation="sigmoid" if sigmoid else "softmax",
                       dtype="float32", name=model_lib.OUTPUT_LAYER_NAME)(x)
    model = tf_keras.Model(inputs, outputs, name=f"visiontune_seg_{model_cfg.backbone}")
    model.pretrained_backbone = pretrained
    return model


def class_probabilities(outputs: tf.Tensor) -> tf.Tensor:
    """The model's output as ``[batch, s, s, classes]`` probabilities (a sigmoid becomes 2)."""
    if outputs.shape[-1] == 1:
        return tf.concat([1.0 - outputs, outputs], axis=-1)
    return outputs
