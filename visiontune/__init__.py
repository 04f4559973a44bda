"""visiontune: fine-tune ImageNet backbones on your images with TFX and serve them."""

from components import keras_env  # noqa: F401

__version__ = "0.1.0"
