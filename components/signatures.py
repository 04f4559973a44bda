"""Serving signatures of the exported SavedModel (TF Serving layout).

* ``serving_default``: encoded image bytes (what a REST client sends as
  ``{"b64": ...}``; input name ends in ``_bytes`` so every client knows to
  base64 it) -> class names, class ids, probabilities.
* ``serving_examples``: serialized ``tf.Example`` in the ingest format -> the same
  outputs, for the Evaluator and batch prediction.
* ``transform_features``: serialized ``tf.Example`` -> transformed features with
  the integer label, which TFMA applies before computing metrics.

All three run the Transform graph (``tft_layer``): there is one decode/resize.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Sequence

from components import keras_env  # noqa: F401
import tensorflow as tf
import tensorflow_transform as tft
import tf_keras

from components import transform

SERVING_DEFAULT = "serving_default"
SERVING_EXAMPLES = "serving_examples"
TRANSFORM_FEATURES = "transform_features"
IMAGE_BYTES_INPUT = "image_bytes"
EXAMPLES_INPUT = "examples"
# Files TF Serving ignores but clients and reports read.
METADATA_DIR = "assets.extra"
METADATA_FILE = "visiontune.json"


def _outputs(probabilities: tf.Tensor, classes: tf.Tensor) -> Dict[str, tf.Tensor]:
    class_ids = tf.argmax(probabilities, axis=-1)
    return {
        "classes": tf.gather(classes, class_ids),
        "class_ids": class_ids,
        "scores": tf.reduce_max(probabilities, axis=-1),
        "probabilities": probabilities,
    }


def make_signatures(model: tf_keras.Model, tf_transform_output: tft.TFTransformOutput,
                    classes: Sequence[str], image_size: int) -> Dict[str, tf.types.experimental.ConcreteFunction]:
    # Tracked on the model so the Transform graph and its assets are saved with it.
    model.tft_layer = tf_transform_output.transform_features_layer()
    class_names = tf.constant(list(classes), tf.string)
    raw_spec = tf_transform_output.raw_feature_spec()
    serving_spec = {k: v for k, v in raw_spec.items() if k == transform.IMAGE_KEY}

    def predict_transformed(transformed):
        pixels = transform.decode_pixels(transformed[transform.PIXELS_KEY], image_size)
        return _outputs(model(pixels, training=False), class_names)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_INPUT)])
    def serve_image_bytes(image_bytes):
        # The raw schema's image is a [batch, 1] column, as ExampleGen parses it.
        raw = {transform.IMAGE_KEY: tf.reshape(image_bytes, [-1, 1])}
        return predict_transformed(model.tft_layer(raw))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(examples):
        raw = tf.io.parse_example(examples, serving_spec)
        return predict_transformed(model.tft_layer(raw))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def transform_features(examples):
        raw = tf.io.parse_example(examples, raw_spec)
        transformed = model.tft_layer(raw)
        return {transform.LABEL_ID_KEY: transformed[transform.LABEL_ID_KEY]}

    return {
        SERVING_DEFAULT: serve_image_bytes.get_concrete_function(),
        SERVING_EXAMPLES: serve_examples.get_concrete_function(),
        TRANSFORM_FEATURES: transform_features.get_concrete_function(),
    }


def export_saved_model(model: tf_keras.Model, tf_transform_output: tft.TFTransformOutput,
                       classes: Sequence[str], image_size: int, export_dir: str,
                       metadata: Dict) -> None:
    """Writes the SavedModel plus ``assets.extra/`` (classes.txt, visiontune.json)."""
    signatures = make_signatures(model, tf_transform_output, classes, image_size)
    model.save(export_dir, save_format="tf", signatures=signatures, include_optimizer=False)
    extra = os.path.join(export_dir, METADATA_DIR)
    tf.io.gfile.makedirs(extra)
    with tf.io.gfile.GFile(os.path.join(extra, "classes.txt"), "w") as f:
        f.write("".join(f"{c}\n" for c in classes))
    with tf.io.gfile.GFile(os.path.join(extra, METADATA_FILE), "w") as f:
        json.dump({**metadata, "classes": list(classes), "image_size": image_size,
                   "signatures": sorted(signatures)}, f, indent=2)


def read_metadata(saved_model_dir: str) -> Dict:
    with tf.io.gfile.GFile(os.path.join(saved_model_dir, METADATA_DIR, METADATA_FILE)) as f:
        return json.load(f)
