"""Serving signatures of the exported SavedModel (TF Serving layout).

* ``serving_default``: encoded image bytes (what a REST client sends as
  ``{"b64": ...}``; input name ends in ``_bytes`` so every client knows to
  base64 it) -> class names, class ids, probabilities.
* ``serving_examples``: serialized ``tf.Example`` in the ingest format -> the same
  outputs, for the Evaluator and batch prediction.
* ``transform_features``: serialized ``tf.Example`` -> transformed features with
  the integer label, which TFMA applies before computing metrics.
* ``classification``: TF Serving's classification SignatureDef (method
  ``tensorflow/serving/classify``, what gRPC ``Classify``/``MultiInference`` and
  REST ``:classify`` require): serialized ``tf.Example`` ``inputs`` -> ``classes``
  (names) and ``scores`` (probabilities), both ``[batch, number of classes]``,
  every class best first (k = all: the lists are short, and a client keeps the
  first k it wants).

All of them run the Transform graph (``tft_layer``): there is one decode/resize.

Why ``classification`` and not ``serving_default``: TF Serving's ``Classify``
without a signature name uses ``serving_default`` and requires it to be a
classify-method signature with one input named ``inputs`` (serialized
``tf.Example``).  Making ``serving_default`` that would break every client of
today's ``serving_default`` (``visiontune predict``, REST/gRPC predict with
``image_bytes``), so classify clients name the signature (``signature_name:
"classification"``); the name is the one TF Estimators gave their
classification signature.  TF2's saver writes method ``tensorflow/serving/predict``
for every signature (``tf.saved_model.save`` has no method argument,
tensorflow#38081), so :func:`set_method_names` rewrites the method in
``saved_model.pb`` after saving, as TF's own
``tf.compat.v1.saved_model.signature_def_utils.MethodNameUpdater`` does, but
atomically, and refreshes ``fingerprint.pb`` to match.

Segmentation models (``task: segmentation``) answer the same two prediction
signatures with:

* ``mask_bytes``: one PNG per image, at the size the client sent, each pixel the
  first mask value of its predicted class (CDnet: 0 background, 255
  foreground), so it reads like the ground-truth masks (base64 in REST);
* ``foreground_probability``: ``[batch, s, s]`` per-pixel probability of
  ``segmentation.foreground_class`` at the model's resolution;
* ``class_ids``: ``[batch, s, s]`` arg-max class per pixel (what TFMA scores).

and ``transform_features`` gives the ground-truth ``mask_ids`` (void =
``features.VOID_ID``).  They have no ``classification`` signature (a mask is
not a class list): ``Classify`` answers TF Serving's "Expected classification
signature method_name" error.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Sequence

import tensorflow as tf
import tensorflow_transform as tft
import tf_keras

from visiontune import features
from visiontune.components import segmentation_model, transform


def _outputs(probabilities: tf.Tensor, classes: tf.Tensor) -> Dict[str, tf.Tensor]:
    class_ids = tf.argmax(probabilities, axis=-1)
    return {
        features.CLASSES_OUTPUT: tf.gather(classes, class_ids),
        features.CLASS_IDS_OUTPUT: class_ids,
        features.SCORES_OUTPUT: tf.reduce_max(probabilities, axis=-1),
        features.PROBABILITIES_OUTPUT: probabilities,
    }


def _signatures(model: tf_keras.Model, tf_transform_output: tft.TFTransformOutput,
                predict_transformed: Callable, labels: Callable
                ) -> Dict[str, tf.types.experimental.ConcreteFunction]:
    """The three signatures around ``predict_transformed`` (transformed features -> outputs).

    ``labels`` picks what ``transform_features`` returns from the transformed features.
    """
    # Tracked on the model so the Transform graph and its assets are saved with it.
    model.tft_layer = tf_transform_output.transform_features_layer()
    raw_spec = tf_transform_output.raw_feature_spec()
    serving_spec = {k: v for k, v in raw_spec.items() if k == features.IMAGE_KEY}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=features.IMAGE_BYTES_INPUT)])
    def serve_image_bytes(image_bytes):
        # The raw schema's image is a [batch, 1] column, as ExampleGen parses it.
        raw = {features.IMAGE_KEY: tf.reshape(image_bytes, [-1, 1])}
        return predict_transformed(model.tft_layer(raw))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=features.EXAMPLES_INPUT)])
    def serve_examples(examples):
        return predict_transformed(model.tft_layer(tf.io.parse_example(examples, serving_spec)))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=features.EXAMPLES_INPUT)])
    def transform_features(examples):
        return labels(model.tft_layer(tf.io.parse_example(examples, raw_spec)))

    return {
        features.SERVING_DEFAULT: serve_image_bytes.get_concrete_function(),
        features.SERVING_EXAMPLES: serve_examples.get_concrete_function(),
        features.TRANSFORM_FEATURES: transform_features.get_concrete_function(),
    }


def _classification_signature(model: tf_keras.Model, tf_transform_output: tft.TFTransformOutput,
                              predict_transformed: Callable, class_names: tf.Tensor
                              ) -> tf.types.experimental.ConcreteFunction:
    """TF Serving's classification signature: every class, best first (see the module docstring)."""
    serving_spec = {k: v for k, v in tf_transform_output.raw_feature_spec().items() if k == features.IMAGE_KEY}
    num_classes = int(class_names.shape[0])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=features.CLASSIFY_INPUTS)])
    def classify(inputs):
        outputs = predict_transformed(model.tft_layer(tf.io.parse_example(inputs, serving_spec)))
        # TF Serving requires DT_FLOAT scores (a mixed-precision head may give float16).
        probabilities = tf.cast(outputs[features.PROBABILITIES_OUTPUT], tf.float32)
        scores, ids = tf.math.top_k(probabilities, k=num_classes)
        return {features.CLASSES_OUTPUT: tf.gather(class_names, ids), features.SCORES_OUTPUT: scores}

    return classify.get_concrete_function()


def make_signatures(model: tf_keras.Model, tf_transform_output: tft.TFTransformOutput,
                    classes: Sequence[str], image_size: int) -> Dict[str, tf.types.experimental.ConcreteFunction]:
    class_names = tf.constant(list(classes), tf.string)

    def predict_transformed(transformed):
        pixels = transform.decode_pixels(transformed[features.PIXELS_KEY], image_size)
        return _outputs(model(pixels, training=False), class_names)

    signatures = _signatures(model, tf_transform_output, predict_transformed,
                             lambda transformed: {features.LABEL_ID_KEY: transformed[features.LABEL_ID_KEY]})
    signatures[features.CLASSIFY_SIGNATURE] = _classification_signature(
        model, tf_transform_output, predict_transformed, class_names)
    return signatures


# Signatures whose SignatureDef method is not the saver's tensorflow/serving/predict.
METHODS = {features.CLASSIFY_SIGNATURE: features.CLASSIFY_METHOD}


def set_method_names(export_dir: str, methods: Dict[str, str]) -> None:
    """Sets the SignatureDef methods the saver cannot, in ``saved_model.pb`` (replaced atomically)."""
    from tensorflow.python.saved_model import fingerprinting_utils, loader_impl

    saved_model = loader_impl.parse_saved_model(export_dir)
    for meta_graph in saved_model.meta_graphs:
        for name, method in methods.items():
            if name in meta_graph.signature_def:
                meta_graph.signature_def[name].method_name = method
    path = os.path.join(export_dir, "saved_model.pb")
    tmp = f"{path}.tmp-{os.getpid()}"   # gfile, not os: the export dir may be a bucket
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(saved_model.SerializeToString(deterministic=True))
    tf.io.gfile.rename(tmp, path, overwrite=True)
    # fingerprint.pb holds a checksum of saved_model.pb: keep it true (TF writes it only at save).
    fingerprinting_utils.write_fingerprint(export_dir)


def segmentation_outputs(probabilities: tf.Tensor, heights: tf.Tensor, widths: tf.Tensor,
                         mask_values: tf.Tensor, foreground_class: int) -> Dict[str, tf.Tensor]:
    """The segmentation outputs from the model's ``[batch, s, s, channels]`` output (also the TFLite runner's)."""
    probabilities = segmentation_model.class_probabilities(probabilities)

    def full_size_png(args):
        probs, height, width = args
        resized = tf.image.resize(probs, tf.cast(tf.stack([height, width]), tf.int32), method="bilinear")
        ids = tf.argmax(resized, axis=-1, output_type=tf.int32)
        return tf.io.encode_png(tf.gather(mask_values, ids)[..., None])

    masks = tf.map_fn(full_size_png, (probabilities, heights, widths),
                      fn_output_signature=tf.TensorSpec([], tf.string))
    return {
        features.MASK_BYTES_OUTPUT: masks,
        features.CLASS_IDS_OUTPUT: tf.argmax(probabilities, axis=-1),
        features.FOREGROUND_PROBABILITY_OUTPUT: probabilities[..., foreground_class],
    }


def make_segmentation_signatures(model: tf_keras.Model, tf_transform_output: tft.TFTransformOutput,
                                 image_size: int, mask_values: Sequence[int], foreground_class: int
                                 ) -> Dict[str, tf.types.experimental.ConcreteFunction]:
    values = tf.constant(list(mask_values), tf.uint8)

    def predict_transformed(transformed):
        pixels = transform.decode_pixels(transformed[features.PIXELS_KEY], image_size)
        return segmentation_outputs(model(pixels, training=False), transformed[features.IMAGE_HEIGHT_KEY],
                                    transformed[features.IMAGE_WIDTH_KEY], values, foreground_class)

    def labels(transformed):
        return {features.MASK_IDS_KEY: transform.decode_mask_ids(transformed[features.MASK_IDS_KEY],
                                                                   image_size)}

    return _signatures(model, tf_transform_output, predict_transformed, labels)


def export_saved_model(model: tf_keras.Model, tf_transform_output: tft.TFTransformOutput,
                       classes: Sequence[str], image_size: int, export_dir: str,
                       metadata: Dict, segmentation=None) -> None:
    """Writes the SavedModel plus ``assets.extra/`` (classes.txt, visiontune.json).

    ``segmentation`` (a ``SegmentationConfig``) exports the segmentation signatures.
    """
    if segmentation is not None:
        signatures = make_segmentation_signatures(
            model, tf_transform_output, image_size, [v[0] for v in segmentation.class_values],
            segmentation.foreground_class)
    else:
        signatures = make_signatures(model, tf_transform_output, classes, image_size)
    # save_traces=False: Keras would otherwise trace every layer's call again to store them for
    # a Keras reload without the layer classes (22 s of a tiny 37 s Trainer run; 9 s without).
    # TF Serving, TFMA (model_type tf_generic) and our server only call the signatures, and
    # tf_keras.models.load_model still rebuilds the model from its config: every custom layer
    # is registered (package "visiontune"), so importing visiontune.components.model suffices.
    model.save(export_dir, save_format="tf", signatures=signatures, include_optimizer=False, save_traces=False)
    methods = {k: v for k, v in METHODS.items() if k in signatures}
    if methods:
        set_method_names(export_dir, methods)
    extra = os.path.join(export_dir, features.METADATA_DIR)
    tf.io.gfile.makedirs(extra)
    with tf.io.gfile.GFile(os.path.join(extra, features.CLASSES_FILE), "w") as f:
        f.write("".join(f"{c}\n" for c in classes))
    with tf.io.gfile.GFile(os.path.join(extra, features.MODEL_METADATA_FILE), "w") as f:
        json.dump({**metadata, "classes": list(classes), "image_size": image_size,
                   "signatures": sorted(signatures)}, f, indent=2)


def read_metadata(saved_model_dir: str) -> Dict:
    with tf.io.gfile.GFile(os.path.join(saved_model_dir, features.METADATA_DIR, features.MODEL_METADATA_FILE)) as f:
        return json.load(f)
