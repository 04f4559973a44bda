"""Registry of ``keras.applications`` backbones usable by the Trainer.

Every backbone was trained on ImageNet with its own input scaling (``tf`` mode
scales to [-1, 1], ``caffe`` mode subtracts BGR means, ``torch`` mode
normalises per channel).  Feeding a backbone pixels scaled for another is the
commonest silent fine-tuning bug, so each entry carries its own
``preprocess_input`` and the model applies it itself: the data on disk stays
raw uint8 pixels and no caller can pick the wrong scaling.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, Optional

import tf_keras
from tf_keras import applications as apps


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str
    constructor: Callable[..., tf_keras.Model]
    preprocess_input: Callable
    default_size: int
    min_size: int = 32
    # Whether the constructor takes a width multiplier ``alpha``.
    has_alpha: bool = False


BACKBONES: Dict[str, Backbone] = {
    b.name: b for b in [
        Backbone("mobilenet_v2", apps.MobileNetV2, apps.mobilenet_v2.preprocess_input, 224, has_alpha=True),
        Backbone("mobilenet", apps.MobileNet, apps.mobilenet.preprocess_input, 224, has_alpha=True),
        Backbone("vgg16", apps.VGG16, apps.vgg16.preprocess_input, 224),
        Backbone("vgg19", apps.VGG19, apps.vgg19.preprocess_input, 224),
        Backbone("resnet50", apps.ResNet50, apps.resnet50.preprocess_input, 224),
        Backbone("resnet50v2", apps.ResNet50V2, apps.resnet_v2.preprocess_input, 224),
        Backbone("inception_v3", apps.InceptionV3, apps.inception_v3.preprocess_input, 299, min_size=75),
        Backbone("xception", apps.Xception, apps.xception.preprocess_input, 299, min_size=71),
        Backbone("densenet121", apps.DenseNet121, apps.densenet.preprocess_input, 224),
        Backbone("inception_resnet_v2", apps.InceptionResNetV2,
                 apps.inception_resnet_v2.preprocess_input, 299, min_size=75),
        Backbone("efficientnet_b0", apps.EfficientNetB0, apps.efficientnet.preprocess_input, 224),
    ]
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None


def input_size(name: str, image_size: int = 0) -> int:
    """The square input side: the configured one, else the backbone's default."""
    backbone = get_backbone(name)
    size = image_size or backbone.default_size
    if size < backbone.min_size:
        raise ValueError(f"{name} needs inputs of at least {backbone.min_size} px, got {size}")
    return size


def resolve_weights(weights: str) -> Optional[str]:
    """Maps the config's ``weights`` to what ``keras.applications`` takes.

    ``imagenet`` lets Keras use its cache (or download); ``none`` trains from
    scratch; anything else must be an existing ``.h5`` file, checked here so a
    typo fails before any data is read.  A remote file (``gs://...``, as on
    Vertex AI Training) is copied to a local cache first: Keras reads ``.h5``
    files with h5py, which only opens local paths.
    """
    if not weights or weights.lower() == "none":
        return None
    if weights.lower() == "imagenet":
        return "imagenet"
    if "://" in weights:
        return _local_copy(weights)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"model.weights: {weights}: no such weights file")
    return weights


def _local_copy(uri: str) -> str:
    import hashlib
    import tempfile

    import tensorflow as tf

    if not tf.io.gfile.exists(uri):
        raise FileNotFoundError(f"model.weights: {uri}: no such weights file")
    stat = tf.io.gfile.stat(uri)  # a replaced file gets a new cache entry
    key = hashlib.sha256(f"{uri}|{stat.length}|{stat.mtime_nsec}".encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "visiontune_weights", f"{key}_{os.path.basename(uri)}")
    if not os.path.isfile(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tf.io.gfile.copy(uri, local + ".part", overwrite=True)
        os.replace(local + ".part", local)
    return local


def create_backbone(name: str, image_size: int, weights: str = "imagenet",
                    alpha: float = 1.0) -> tf_keras.Model:
    """Builds a headless backbone taking float pixels of side ``image_size``."""
    backbone = get_backbone(name)
    kwargs = dict(include_top=False, weights=resolve_weights(weights),
                  input_shape=(image_size, image_size, 3))
    if backbone.has_alpha:
        kwargs["alpha"] = alpha
    return backbone.constructor(**kwargs)
