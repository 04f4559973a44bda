"""The ``keras.applications`` backbones usable by the Trainer: constructors and input scaling.

Every backbone was trained on ImageNet with its own input scaling (``tf`` mode
scales to [-1, 1], ``caffe`` mode subtracts BGR means, ``torch`` mode
normalises per channel).  Feeding a backbone pixels scaled for another is the
commonest silent fine-tuning bug, so each entry carries its own
``preprocess_input`` and the model applies it itself: the data on disk stays
raw uint8 pixels and no caller can pick the wrong scaling.

Which backbones exist, their input sizes and whether they take ``alpha`` is
the registry's metadata (``visiontune.configs.backbones``, no TensorFlow), so
the config checks them when it loads; this module adds the ``tf_keras``
constructor and ``preprocess_input`` each entry names.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, Optional

import tf_keras
from tf_keras import applications as apps

from visiontune.components import keras_tracing  # noqa: F401  (AutoGraph skips tf_keras's own code)
from visiontune.configs import backbones as registry


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A registry entry (``visiontune.configs.backbones``) with its Keras constructor and scaling."""

    info: registry.BackboneInfo
    constructor: Callable[..., tf_keras.Model]
    preprocess_input: Callable

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def default_size(self) -> int:
        return self.info.default_size

    @property
    def min_size(self) -> int:
        return self.info.min_size

    @property
    def has_alpha(self) -> bool:
        """Whether the constructor takes a width multiplier ``alpha``."""
        return self.info.has_alpha


def _complete(info: registry.BackboneInfo) -> Backbone:
    return Backbone(info, getattr(apps, info.keras_class), getattr(apps, info.keras_module).preprocess_input)


# The registry's entries, each with what builds it: the list of backbones is the registry's.
BACKBONES: Dict[str, Backbone] = {name: _complete(info) for name, info in registry.BACKBONES.items()}


def get_backbone(name: str) -> Backbone:
    """The entry of ``name``; an unknown name (a ``ValueError``) lists the known ones."""
    return BACKBONES[registry.get(name).name]


def input_size(name: str, image_size: int = 0) -> int:
    """The square input side: the configured one, else the backbone's default."""
    return registry.input_size(name, image_size)


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
