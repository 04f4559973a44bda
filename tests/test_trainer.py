"""Trainer and the exported SavedModel's signatures, on a real Transform output."""

import glob
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import SHAPE_CLASSES, trainer_config
from visiontune import features
from visiontune.components import signatures, trainer, transform

# The tiny config and the export are shared with the serving tests (tests/conftest.py).
_config = trainer_config


@pytest.fixture(scope="module")
def exported(exported_model):
    return exported_model


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _eval_examples(shapes_prepared):
    files = sorted(glob.glob(os.path.join(shapes_prepared.output_dir, "eval", "*")))
    return [r.numpy() for r in tf.data.TFRecordDataset(files)]


def test_export_has_tf_serving_layout_and_metadata(exported):
    model_dir = exported.serving_model_dir
    assert os.path.exists(os.path.join(model_dir, "saved_model.pb"))
    loaded = tf.saved_model.load(model_dir)
    assert set(loaded.signatures) == {"serving_default", "serving_examples", "transform_features",
                                      "classification"}
    # TF Serving's classification method, set after saving; fingerprint.pb still describes saved_model.pb.
    from tensorflow.python.saved_model import fingerprinting_utils, loader_impl

    defs = loader_impl.parse_saved_model(model_dir).meta_graphs[0].signature_def
    assert defs["classification"].method_name == "tensorflow/serving/classify"
    assert {defs[k].method_name for k in defs if k != "classification" and not k.startswith("__")} == {
        "tensorflow/serving/predict"}
    assert (fingerprinting_utils.singleprint_from_fingerprint_proto(model_dir)
            == fingerprinting_utils.singleprint_from_saved_model_proto(model_dir))
    assert not [f for f in os.listdir(model_dir) if ".tmp" in f]
    meta = signatures.read_metadata(model_dir)
    assert meta["classes"] == SHAPE_CLASSES and meta["image_size"] == 32
    history = json.load(open(os.path.join(exported.model_run_dir, features.HISTORY_FILE)))
    assert [r["phase"] for r in history["history"]] == ["warmup", "fine_tune"]
    assert all(r["epoch_seconds"] > 0 for r in history["history"])
    # The resume state is cleaned up once the model is exported.
    assert not glob.glob(os.path.join(exported.custom_config["state_root"], "*"))


def test_both_signatures_give_the_same_probabilities(exported, shapes_prepared):
    loaded = tf.saved_model.load(exported.serving_model_dir)
    records = _eval_examples(shapes_prepared)[:6]
    images = [tf.train.Example.FromString(r).features.feature["image"].bytes_list.value[0] for r in records]
    by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(images))
    by_example = loaded.signatures["serving_examples"](examples=tf.constant(records))
    np.testing.assert_allclose(by_bytes["probabilities"].numpy(), by_example["probabilities"].numpy(),
                               rtol=1e-5, atol=1e-6)
    assert by_bytes["probabilities"].shape == (6, 3)
    names = [c.decode() for c in by_bytes["classes"].numpy()]
    assert names == [SHAPE_CLASSES[i] for i in by_bytes["class_ids"].numpy()]


def test_the_export_reloads_as_a_keras_model_from_its_config(exported, shapes_prepared):
    """Saved without per-layer traces (faster): Keras rebuilds it from the config and gives the served answers."""
    import tensorflow_transform as tft
    import tf_keras

    records = _eval_examples(shapes_prepared)[:6]
    tft_output = tft.TFTransformOutput(exported.transform_output)
    raw = tf.io.parse_example(tf.constant(records), tft_output.raw_feature_spec())
    pixels = transform.decode_pixels(tft_output.transform_raw_features(raw)[features.PIXELS_KEY], 32)
    keras_model = tf_keras.models.load_model(exported.serving_model_dir, compile=False)
    served = tf.saved_model.load(exported.serving_model_dir).signatures["serving_examples"](
        examples=tf.constant(records))
    np.testing.assert_allclose(keras_model(pixels, training=False).numpy(), served["probabilities"].numpy(),
                               rtol=1e-5, atol=1e-6)


def test_serving_default_accepts_png_and_jpeg_of_the_same_image(exported):
    loaded = tf.saved_model.load(exported.serving_model_dir)
    rgb = Image.new("RGB", (40, 40), (30, 60, 90))
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG", quality=100)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([_png(rgb), jpeg.getvalue()]))
    probs = out["probabilities"].numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[0], probs[1], atol=0.02)


def test_transform_features_signature_gives_label_ids(exported, shapes_prepared):
    loaded = tf.saved_model.load(exported.serving_model_dir)
    records = _eval_examples(shapes_prepared)
    out = loaded.signatures["transform_features"](examples=tf.constant(records))
    labels = [tf.train.Example.FromString(r).features.feature["label"].bytes_list.value[0].decode()
              for r in records]
    assert out["label_id"].numpy().ravel().tolist() == [SHAPE_CLASSES.index(name) for name in labels]


def _epoch_orders(ds, epochs=2):
    """Per epoch, (label, pixel sum) of every example in the order ``ds`` yields them."""
    orders = []
    for _ in range(epochs):
        rows = [np.stack([labels.numpy(), tf.reduce_sum(tf.cast(images, tf.int64), axis=[1, 2, 3]).numpy()], 1)
                for images, labels in ds]
        orders.append(np.concatenate(rows).tolist())
    return orders


def test_training_order_depends_on_the_seed_only(shapes_transformed):
    """What the model is fed (the same seed reproduces a run's accuracy exactly): the same
    examples in the same order for the same seed, cached in memory or not (which depends
    on the machine's RAM), a new order every epoch; evaluation in file order."""
    _, transformed_dir, _, size = shapes_transformed
    files = [os.path.join(transformed_dir, "train*")]

    def orders(seed, cache):
        tf.random.set_seed(seed)  # as run_fn's tf_keras.utils.set_random_seed
        return _epoch_orders(trainer.create_dataset(files, size, 8, training=True, seed=seed, cache=cache))

    first, second = orders(42, cache=True)
    assert orders(42, cache=False) == [first, second]
    assert first != second and sorted(first) == sorted(second)
    assert orders(7, cache=True)[0] != first
    unshuffled = _epoch_orders(trainer.create_dataset(files, size, 8, training=False), epochs=1)[0]
    assert unshuffled != first and sorted(unshuffled) == sorted(first)
