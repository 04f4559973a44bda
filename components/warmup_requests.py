"""``assets.extra/tf_serving_warmup_requests``: real requests TF Serving replays before it serves a version.

TF Serving (``saved_model_warmup_util.cc``) reads this TFRecord file of
``tensorflow.serving.PredictionLog`` records when it loads a version and runs
each request once before it reports the version AVAILABLE, so the first
client does not pay for TensorFlow's first-call costs (graph optimisation,
kernel and memory set-up; ``benchmarks/serving_warmup.py`` measures them).  A
request that fails fails the load, there and in the built-in server
(``serving/warmup.py`` replays the same file).

What is in it (:func:`warmup_logs`), all built from the first
``WARMUP_IMAGES`` images of the eval split:

* one ``PredictLog`` per image on ``serving_default`` (``image_bytes``, one image);
* one ``PredictLog`` of all of them at once (a batch);
* for a classifier, one ``ClassifyLog`` of all of them on the ``classification``
  signature (its own function, so warmed separately).

The images: the Trainer reads the *transformed* eval split, whose ``pixels``
are each eval image decoded and resized to the model's input size (what
Transform does; the raw split is not a Trainer input).  Each request carries
those pixels re-encoded as a lossless PNG, which the signatures decode and
resize to the size they already have: the real eval image, at model
resolution.  The requests name no model (TF Serving runs them on the version
it loads, whatever the name; the Pusher's model name is not known here).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import tensorflow as tf

from visiontune import features
from visiontune.components import transform

WARMUP_IMAGES = 4   # eval images in the requests: few, so the file stays small and the load fast


def eval_images(file_patterns: Sequence[str], image_size: int, count: int = WARMUP_IMAGES) -> List[bytes]:
    """The first ``count`` transformed eval images as PNG bytes (fewer when the split is smaller)."""
    files = sorted(f for p in file_patterns for f in tf.io.gfile.glob(p))
    if not files:
        return []
    spec = {features.PIXELS_KEY: tf.io.FixedLenFeature([], tf.string)}
    images = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP").take(count):
        pixels = tf.io.parse_single_example(record, spec)[features.PIXELS_KEY]
        images.append(tf.io.encode_png(transform.decode_pixels_one(pixels, image_size)).numpy())
    return images


def _example(png: bytes) -> bytes:
    """A raw ``tf.Example`` as ingest writes one; the serving signatures read only its image."""
    return tf.train.Example(features=tf.train.Features(feature={
        features.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[png]))})).SerializeToString()


def warmup_logs(images: Sequence[bytes], classification: bool) -> list:
    """The ``PredictionLog`` records for ``images`` (see the module docstring)."""
    from tensorflow_serving.apis import prediction_log_pb2

    logs = []
    for batch in [[png] for png in images] + ([list(images)] if len(images) > 1 else []):
        log = prediction_log_pb2.PredictionLog()
        request = log.predict_log.request
        request.model_spec.signature_name = features.SERVING_DEFAULT
        request.inputs[features.IMAGE_BYTES_INPUT].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
        logs.append(log)
    if classification and images:
        log = prediction_log_pb2.PredictionLog()
        request = log.classify_log.request
        request.model_spec.signature_name = features.CLASSIFY_SIGNATURE
        for png in images:
            request.input.example_list.examples.add().ParseFromString(_example(png))
        logs.append(log)
    return logs


def write_warmup_requests(export_dir: str, eval_files: Sequence[str], image_size: int,
                          classification: bool) -> Optional[str]:
    """Writes the file into ``export_dir``'s ``assets.extra`` (aside, then renamed); its path, or None
    when the eval split is empty (the server then warms up with a synthetic image)."""
    logs = warmup_logs(eval_images(eval_files, image_size), classification)
    if not logs:
        return None
    extra = os.path.join(export_dir, features.METADATA_DIR)
    tf.io.gfile.makedirs(extra)
    path = os.path.join(extra, features.WARMUP_REQUESTS_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.TFRecordWriter(tmp) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return path
