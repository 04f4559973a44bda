"""The backbone registry's metadata: names and input sizes, without TensorFlow.

As in timm's ``_registry.py``, what is known about a backbone (its name, the
resolution it was trained at, the smallest input it accepts, whether it takes
a width multiplier) lives apart from the code that builds it.  The config
checks ``model.backbone`` and ``model.image_size`` against this table when it
loads, before anything imports TensorFlow; ``visiontune.components.backbones``
looks up the ``tf_keras.applications`` constructor and ``preprocess_input``
each entry names, so the list of backbones exists once.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

from visiontune.errors import ConfigError

# The largest ``model.image_size`` accepted: the biggest default of the registry
# (Inception, Xception); larger inputs only cost time with ImageNet weights.
MAX_IMAGE_SIZE = 299


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """One ``keras.applications`` backbone, as far as the config needs to know it.

    Attributes:
      name: the value of ``model.backbone``.
      keras_class: the ``tf_keras.applications`` constructor, e.g. ``MobileNetV2``.
      keras_module: the ``tf_keras.applications`` module whose ``preprocess_input``
        scales pixels the way the backbone was trained (``tf``, ``caffe`` or
        ``torch`` mode), e.g. ``mobilenet_v2``; ResNet50V2's is ``resnet_v2``.
      default_size: the ImageNet resolution; the input side when
        ``model.image_size`` is 0.
      min_size: the smallest input side the architecture accepts: the
        ``min_size`` its ``keras.applications`` source passes to
        ``obtain_input_shape`` (32 for most, 75 for Inception V3 and
        Inception-ResNet V2, 71 for Xception).
      has_alpha: whether the constructor takes the width multiplier
        ``model.alpha`` (MobileNet, MobileNetV2); other backbones ignore it.
    """

    name: str
    keras_class: str
    keras_module: str
    default_size: int
    min_size: int = 32
    has_alpha: bool = False


BACKBONES: Dict[str, BackboneInfo] = {
    b.name: b for b in [
        BackboneInfo("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, has_alpha=True),
        BackboneInfo("mobilenet", "MobileNet", "mobilenet", 224, has_alpha=True),
        BackboneInfo("vgg16", "VGG16", "vgg16", 224),
        BackboneInfo("vgg19", "VGG19", "vgg19", 224),
        BackboneInfo("resnet50", "ResNet50", "resnet50", 224),
        BackboneInfo("resnet50v2", "ResNet50V2", "resnet_v2", 224),
        BackboneInfo("inception_v3", "InceptionV3", "inception_v3", 299, min_size=75),
        BackboneInfo("xception", "Xception", "xception", 299, min_size=71),
        BackboneInfo("densenet121", "DenseNet121", "densenet", 224),
        BackboneInfo("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, min_size=75),
        BackboneInfo("efficientnet_b0", "EfficientNetB0", "efficientnet", 224),
    ]
}


def names() -> List[str]:
    """The known backbone names, sorted."""
    return sorted(BACKBONES)


def get(name: str) -> BackboneInfo:
    """The registry entry of ``name``; an unknown name lists the known ones."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(names())}") from None


def input_size(name: str, image_size: int = 0) -> int:
    """The square input side: ``image_size``, else the backbone's default; refuses one too small."""
    info = get(name)
    size = image_size or info.default_size
    if size < info.min_size:
        raise ConfigError(f"{name} needs inputs of at least {info.min_size} px, got {size}")
    return size
