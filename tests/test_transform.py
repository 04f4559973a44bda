"""Transform: real TFT on Beam over real prepared TFRecords."""

import glob
import os

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from tests.conftest import SHAPE_CLASSES
from visiontune import features
from visiontune.components import transform


def _read_transformed(transformed_dir, split):
    files = sorted(glob.glob(os.path.join(transformed_dir, f"{split}*")))
    spec = {features.PIXELS_KEY: tf.io.FixedLenFeature([], tf.string),
            features.LABEL_ID_KEY: tf.io.FixedLenFeature([], tf.int64)}
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return [tf.io.parse_single_example(r, spec) for r in ds]


def test_vocabulary_follows_classes_txt_order(shapes_prepared, shapes_transformed):
    _, transformed_dir, classes, _ = shapes_transformed
    # Natural order from prepare: "2" before "10", names after numbers.
    assert classes == SHAPE_CLASSES
    ids = [int(r[features.LABEL_ID_KEY]) for r in _read_transformed(transformed_dir, "train")]
    counts = shapes_prepared.counts["train"]
    assert {i: ids.count(i) for i in set(ids)} == {classes.index(c): n for c, n in counts.items() if n}


def test_pixels_are_compact_uint8_at_the_configured_size(shapes_transformed):
    tft_dir, transformed_dir, _, size = shapes_transformed
    rows = _read_transformed(transformed_dir, "eval")
    assert rows
    for row in rows:
        pixels = transform.decode_pixels_one(row[features.PIXELS_KEY], size)
        assert pixels.dtype == tf.uint8 and pixels.shape == (size, size, 3)
        # serialized uint8: about one byte per value, not four
        assert len(row[features.PIXELS_KEY].numpy()) < size * size * 3 + 64
    spec = tft.TFTransformOutput(tft_dir).transformed_feature_spec()
    assert spec[features.PIXELS_KEY].dtype == tf.string
    assert spec[features.LABEL_ID_KEY].dtype == tf.int64


def test_decode_and_resize_accepts_png_and_jpeg():
    rgb = np.random.RandomState(0).randint(0, 255, (50, 70, 3), dtype=np.uint8)
    for encoded in (tf.io.encode_png(rgb), tf.io.encode_jpeg(rgb, quality=100)):
        out = transform.decode_and_resize(encoded, 48)
        assert out.shape == (48, 48, 3) and out.dtype == tf.uint8
    # Resizing a flat colour must keep the colour exactly (no scaling bug).
    flat = np.full((30, 30, 3), 200, np.uint8)
    assert np.all(transform.decode_and_resize(tf.io.encode_png(flat), 64).numpy() == 200)


def test_unknown_label_maps_to_minus_one():
    table = transform.label_lookup_table(["2", "10"])
    assert table.lookup(tf.constant(["10", "2", "7"])).numpy().tolist() == [1, 0, -1]
