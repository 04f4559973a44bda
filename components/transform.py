"""Transform: decode and resize images, map class names to ids in ``classes.txt`` order.

The same graph runs in the Trainer's data (through TFX Transform) and in both
serving signatures (through ``tft_layer``), so what the model sees at serving
time is byte-for-byte what it was trained on.

Pixels are stored as serialized uint8 tensors, not float32: a 128x128 image is
48 KiB instead of 192 KiB, and the model does its own scaling.

The label vocabulary is *given*, not computed: ``tft.compute_and_apply_vocabulary``
orders by frequency (or as strings, where "10" sorts before "2"), and a
vocabulary that can change between runs would silently remap classes against
the baseline model.  ``classes.txt`` from ``visiontune prepare`` is the one order.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

from components import keras_env  # noqa: F401
import tensorflow as tf

# Feature names of the raw examples written by ``visiontune prepare``.
IMAGE_KEY = "image"
LABEL_KEY = "label"
# Feature names of the transformed examples.
PIXELS_KEY = "pixels"
LABEL_ID_KEY = "label_id"


def decode_and_resize(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """One encoded image (PNG/JPEG/GIF/BMP bytes) -> ``[size, size, 3]`` uint8.

    Antialiased bilinear resizing: plain bilinear aliases badly when a large
    photo is shrunk to a small input size.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def encode_pixels(images: tf.Tensor) -> tf.Tensor:
    """``[batch, h, w, 3]`` uint8 -> ``[batch]`` serialized tensors."""
    return tf.map_fn(tf.io.serialize_tensor, images, fn_output_signature=tf.string)


def decode_pixels(serialized: tf.Tensor, size: int) -> tf.Tensor:
    """Inverse of ``encode_pixels`` for a ``[batch]`` of serialized tensors."""
    serialized = tf.reshape(serialized, [-1])
    images = tf.map_fn(lambda s: tf.io.parse_tensor(s, tf.uint8), serialized,
                       fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    return tf.ensure_shape(images, [None, size, size, 3])


def decode_pixels_one(serialized: tf.Tensor, size: int) -> tf.Tensor:
    """``decode_pixels`` for a single example (for ``tf.data`` maps before batching)."""
    image = tf.io.parse_tensor(serialized, tf.uint8)
    return tf.ensure_shape(image, [size, size, 3])


def _dense_column(tensor: Any) -> tf.Tensor:
    """Raw features arrive as ``[batch, 1]`` (or sparse); the image ops want ``[batch]``."""
    if isinstance(tensor, tf.SparseTensor):
        tensor = tf.sparse.to_dense(tensor, default_value="")
    return tf.reshape(tensor, [-1])


def label_lookup_table(classes: Sequence[str]) -> tf.lookup.StaticHashTable:
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(classes), tf.string), tf.range(len(classes), dtype=tf.int64)),
        default_value=-1)


def preprocessing_fn(inputs: Dict[str, Any], custom_config: Dict[str, Any]) -> Dict[str, tf.Tensor]:
    """TFX Transform entry point.

    ``custom_config``: ``image_size`` (int) and ``classes`` (list, the order of
    ``classes.txt``; ``visiontune prepare`` rejects images whose label is not in it).
    """
    size = int(custom_config["image_size"])
    images = tf.map_fn(lambda b: decode_and_resize(b, size), _dense_column(inputs[IMAGE_KEY]),
                       fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    outputs = {PIXELS_KEY: encode_pixels(images)}
    if LABEL_KEY in inputs:
        # Unknown labels map to -1, which the Trainer's loss rejects by name of
        # the range.  No assert here: at serving time TFT feeds the absent label
        # as "" and an assert would fail every prediction.
        labels = _dense_column(inputs[LABEL_KEY])
        outputs[LABEL_ID_KEY] = label_lookup_table(custom_config["classes"]).lookup(labels)
    return outputs
