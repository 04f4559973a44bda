"""Transform: decode and resize images, map class names to ids in ``classes.txt`` order.

The same graph runs in the Trainer's data (through TFX Transform) and in both
serving signatures (through ``tft_layer``), so what the model sees at serving
time is byte-for-byte what it was trained on.

Pixels are stored as serialized uint8 tensors, not float32: a 128x128 image is
48 KiB instead of 192 KiB, and the model does its own scaling.

For ``task: segmentation`` the mask is resized with the image (nearest
neighbour: interpolating between class values would invent classes) and its
values are mapped to class ids through a 256-entry table; void pixels become
``features.VOID_ID``, which the loss and every metric skip.  The transformed features
also carry the original height and width, so serving can return a mask of the
size the client sent.

The label vocabulary is *given*, not computed: ``tft.compute_and_apply_vocabulary``
orders by frequency (or as strings, where "10" sorts before "2"), and a
vocabulary that can change between runs would silently remap classes against
the baseline model.  ``classes.txt`` from ``visiontune prepare`` is the one order.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import tensorflow as tf

from visiontune import features
from visiontune.errors import UserError


def decode_and_resize(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """One encoded image (PNG/JPEG/GIF/BMP bytes) -> ``[size, size, 3]`` uint8.

    Antialiased bilinear resizing: plain bilinear aliases badly when a large
    photo is shrunk to a small input size.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode_resize_and_size(encoded: tf.Tensor, size: int):
    """``decode_and_resize`` plus the decoded image's ``[height, width]`` (int64)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    original = tf.cast(tf.shape(image)[:2], tf.int64)
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8), original


def decode_mask(encoded: tf.Tensor, size: int, lookup: tf.Tensor) -> tf.Tensor:
    """One mask PNG -> ``[size, size]`` uint8 class ids (``features.VOID_ID`` for void).

    An empty string (the absent mask of a serving request, which TFT feeds as
    "") gives an all-void mask instead of a decode error.
    """
    def decode():
        values = tf.io.decode_png(encoded, channels=1)
        values = tf.image.resize(values, [size, size], method="nearest")
        return tf.gather(lookup, tf.cast(values[..., 0], tf.int32))

    return tf.cond(tf.strings.length(encoded) > 0, decode,
                   lambda: tf.fill([size, size], tf.constant(features.VOID_ID, tf.uint8)))


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


def decode_mask_ids(serialized: tf.Tensor, size: int) -> tf.Tensor:
    """``[batch]`` serialized masks -> ``[batch, size, size]`` uint8 class ids."""
    serialized = tf.reshape(serialized, [-1])
    masks = tf.map_fn(lambda s: tf.io.parse_tensor(s, tf.uint8), serialized,
                      fn_output_signature=tf.TensorSpec([None, None], tf.uint8))
    return tf.ensure_shape(masks, [None, size, size])


def decode_mask_ids_one(serialized: tf.Tensor, size: int) -> tf.Tensor:
    return tf.ensure_shape(tf.io.parse_tensor(serialized, tf.uint8), [size, size])


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
    if features.IMAGE_KEY not in inputs:
        # SchemaGen infers no features from a split without examples; the command line refuses
        # data.eval_fraction 0 before the run, this names what reached Transform otherwise.
        raise UserError(f"Transform: the examples have no {features.IMAGE_KEY!r} feature (they have "
                        f"{sorted(inputs) or 'none'}): a split without examples, or TFRecords not written "
                        "by visiontune's ingest")
    if custom_config.get("task") == "segmentation":
        return _segmentation_features(inputs, size, custom_config["mask_lookup"])
    images = tf.map_fn(lambda b: decode_and_resize(b, size), _dense_column(inputs[features.IMAGE_KEY]),
                       fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    outputs = {features.PIXELS_KEY: encode_pixels(images)}
    if features.LABEL_KEY in inputs:
        # Unknown labels map to -1, which the Trainer's loss rejects by name of
        # the range.  No assert here: at serving time TFT feeds the absent label
        # as "" and an assert would fail every prediction.
        labels = _dense_column(inputs[features.LABEL_KEY])
        outputs[features.LABEL_ID_KEY] = label_lookup_table(custom_config["classes"]).lookup(labels)
    return outputs


def _segmentation_features(inputs: Dict[str, Any], size: int, mask_lookup: Sequence[int]
                           ) -> Dict[str, tf.Tensor]:
    """``custom_config["mask_lookup"]``: 256 class ids, mask value -> class (``features.VOID_ID``: void)."""
    images, shapes = tf.map_fn(
        lambda b: decode_resize_and_size(b, size), _dense_column(inputs[features.IMAGE_KEY]),
        fn_output_signature=(tf.TensorSpec([size, size, 3], tf.uint8), tf.TensorSpec([2], tf.int64)))
    outputs = {features.PIXELS_KEY: encode_pixels(images), features.IMAGE_HEIGHT_KEY: shapes[:, 0],
               features.IMAGE_WIDTH_KEY: shapes[:, 1]}
    if features.MASK_KEY in inputs:
        lookup = tf.constant(list(mask_lookup), tf.uint8)
        masks = tf.map_fn(lambda b: decode_mask(b, size, lookup), _dense_column(inputs[features.MASK_KEY]),
                          fn_output_signature=tf.TensorSpec([size, size], tf.uint8))
        outputs[features.MASK_IDS_KEY] = tf.map_fn(tf.io.serialize_tensor, masks, fn_output_signature=tf.string)
    return outputs
