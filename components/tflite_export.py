"""TensorFlow Lite export: the trained model as float16 and full-integer int8 ``.tflite`` files.

The Trainer calls :func:`export_tflite` right after the SavedModel export: it
has the Keras model and the train split (the int8 calibration set), and the
files land in the SavedModel's ``assets.extra/tflite/``, which TF Serving
ignores and the Pusher copies with the rest of a blessed model.

What goes in: uint8 RGB pixels ``[1, S, S, 3]``, what Transform's
``decode_and_resize`` makes of an image (decode, antialiased bilinear resize
to ``S`` x ``S``, round).  Everything after that is inside the Keras model and
so inside the ``.tflite`` files too: the cast to float, the centre crop,
autocontrast or equalize, the backbone's ``preprocess_input``.

* ``float16``: float16 weights, float32 arithmetic (the converter's
  ``supported_types=[tf.float16]``); a ``CAST`` turns the uint8 input to float.
* ``int8``: full-integer post-training quantisation (``TFLITE_BUILTINS_INT8``,
  calibrated on ``export.calibration_images`` train-split images spread evenly
  through the split).  Input uint8 with scale 1 and zero point 0 (a
  ``fake_quant`` over [0, 255] on the input pins that, whatever range the
  calibration images cover), so pixels go in as they are; output uint8
  probabilities, scale 1/256.  Weights and activations are int8 and every
  op is a builtin.  Only what TFLite has no int8 kernel for stays float32,
  between a DEQUANTIZE and a QUANTIZE: autocontrast's one per-image scalar
  division (no int8 ``DIV``), and all of equalize (a histogram of integer
  counts).  ``tflite.json`` lists those ops (``float32_ops``).

Two model parts are changed for the converter, neither in what it computes:
``Equalize`` counts its histogram with ``scatter_nd`` (TFLite's
``SCATTER_ND`` sums repeated indices) instead of ``tf.math.bincount``, whose
``DenseBincount`` would need Select TF ops; and a model trained under mixed
precision is converted from a float32 copy with the same weights (TFLite has
no float16 arithmetic kernels; its float16 variant only stores weights so).

Conversion freezes a concrete function traced without autograph, instead of
the converter's default of saving the Keras model to a temporary SavedModel
first.  Measured on 2 shared CPU cores, MobileNetV2-0.35 at 32 px: 0.9 s
(float16) and 2.6 s (int8, 25 calibration images) instead of 25-35 s each
plus 15 s of tracing (autograph re-converting Keras internals); at 192 px
(GTSRB) 0.8 s and 5.2 s with 200 calibration images (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from visiontune import features
from visiontune.components import model as model_lib, transform

log = logging.getLogger(__name__)

RESIZE = ("decode to RGB, resize to image_size x image_size with antialiased bilinear "
          "(tf.image.resize(method='bilinear', antialias=True)), round and clip to 0-255")


# --------------------------------------------------------------------------- the model, converter-ready

@tf_keras.utils.register_keras_serializable(package="visiontune")
class BuiltinEqualize(model_lib.Equalize):
    """:class:`model.Equalize` from ops TFLite has (no ``DenseBincount``): the same numbers.

    The TFLite models take one image, so the histogram is counted per image
    of the (static) batch with ``scatter_nd``, which adds up repeated indices.
    """

    def call(self, inputs):
        shape = tf.shape(inputs)
        values = tf.cast(tf.clip_by_value(tf.round(inputs), 0.0, 255.0), tf.int32)
        flat = tf.reshape(values, [inputs.shape[0], -1])
        outputs = []
        for image in tf.unstack(flat, axis=0):
            hist = tf.scatter_nd(image[:, None], tf.ones_like(image), [256])
            cdf = tf.cast(tf.cumsum(hist), tf.float32)
            cdf_min = tf.reduce_min(tf.where(cdf > 0, cdf, tf.fill(tf.shape(cdf), 1e30)))
            lut = (cdf - cdf_min) * (255.0 / tf.maximum(cdf[-1] - cdf_min, 1.0))
            outputs.append(tf.gather(tf.clip_by_value(lut, 0.0, 255.0), image))
        return tf.cast(tf.reshape(tf.stack(outputs), shape), inputs.dtype)


def _float32_config(config: Any) -> Any:
    """A layer config with every mixed-precision policy (and float16 input) replaced by float32.

    A nested ``Sequential`` first called on float16 tensors also records them
    as its ``InputLayer``'s dtype.
    """
    if isinstance(config, dict):
        if config.get("class_name") in ("Policy", "DTypePolicy"):
            return "float32"
        return {k: "float32" if k == "dtype" and v in ("float16", "bfloat16") else _float32_config(v)
                for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_config(v) for v in config]
    return config


def _all_layers(layer) -> List[tf_keras.layers.Layer]:
    return [layer] + [sub for child in getattr(layer, "layers", []) for sub in _all_layers(child)]


def pixel_model(model: tf_keras.Model) -> tf_keras.Model:
    """``model`` with a float32 pixel input (0-255) and ops the converter takes; same outputs.

    Layers are shared with ``model`` (no copy of the weights) unless it was
    built under mixed precision: then every layer is rebuilt in float32 and
    gets ``model``'s weights.
    """
    mixed = any(layer.dtype_policy.name != "float32" for layer in _all_layers(model)
                if not isinstance(layer, tf_keras.layers.InputLayer))

    members = model_lib.ensemble_members(model)

    def clone(layer):
        if isinstance(layer, model_lib.Equalize):
            return BuiltinEqualize(name=layer.name)
        if len(members) > 1 and any(layer is m for m in members):
            # An ensemble member: cloned layer by layer too, so its own Equalize is replaced.
            return tf_keras.models.clone_model(layer, clone_function=clone)
        if mixed:
            return layer.__class__.from_config(_float32_config(layer.get_config()))
        return layer

    inputs = tf_keras.Input(model.input_shape[1:], batch_size=1, dtype=tf.float32,
                            name=features.TFLITE_INPUT)
    copy = tf_keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)
    if mixed:
        copy.set_weights(model.get_weights())
    return copy


def _function(pixels: tf_keras.Model, variant: str):
    """The concrete function converted: uint8 pixels in (float16), or float pixels quantised as uint8 (int8)."""
    shape = [1, *pixels.input_shape[1:]]
    if variant == "int8":
        # The input's quantisation is then exactly scale 1, zero point 0: pixels go in as they are.
        spec = tf.TensorSpec(shape, tf.float32, name=features.TFLITE_INPUT)

        def run(image):
            image = tf.quantization.fake_quant_with_min_max_args(image, min=0.0, max=255.0, num_bits=8)
            return pixels(image, training=False)
    else:
        spec = tf.TensorSpec(shape, tf.uint8, name=features.TFLITE_INPUT)

        def run(image):
            return pixels(tf.cast(image, tf.float32), training=False)
    return tf.function(run, input_signature=[spec], autograph=False).get_concrete_function()


def convert(pixels: tf_keras.Model, variant: str, calibration: Optional[np.ndarray] = None) -> bytes:
    """One ``.tflite`` file's bytes; ``calibration``: uint8 images ``[n, S, S, 3]`` (int8 only)."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_function(pixels, variant)], pixels)
    converter.experimental_lower_to_saved_model = False  # freeze the function: no Keras SavedModel detour
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if calibration is None or not len(calibration):
            raise ValueError("int8 needs calibration images")
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    else:
        raise ValueError(f"unknown TFLite variant {variant!r}; known: {', '.join(features.TFLITE_VARIANTS)}")
    with warnings.catch_warnings(), quiet_native_stderr():
        # The uint8 input's statistics come from the fake_quant above, not from the old flags.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return converter.convert()


@contextlib.contextmanager
def quiet_native_stderr():
    """Hides TFLite's own C++ lines where C++ logs are off (``TF_CPP_MIN_LOG_LEVEL=3``).

    The converter's ("Ignored output_format.") go through absl before it is
    initialised and the interpreter's ("Created TensorFlow Lite XNNPACK
    delegate") through TFLite's logger: ``TF_CPP_MIN_LOG_LEVEL``, which
    ``visiontune``'s quiet mode sets to 3, reaches neither.  A failed
    conversion still says why: the converter's exception carries it.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --------------------------------------------------------------------------- calibration

def calibration_images(file_patterns: Sequence[str], image_size: int, count: int) -> np.ndarray:
    """Up to ``count`` transformed images, evenly spaced through the split: uint8 ``[n, S, S, 3]``.

    Evenly spaced, not the first ``count``: a split written class by class
    would otherwise calibrate on a few classes only.
    """
    files = sorted(f for p in file_patterns for f in tf.io.gfile.glob(p))
    if not files:
        raise FileNotFoundError(f"no transformed examples match {list(file_patterns)}")
    records = tf.data.TFRecordDataset(files, compression_type="GZIP")
    total = int(records.reduce(np.int64(0), lambda n, _: n + 1))
    step = max(total // count, 1)
    spec = {features.PIXELS_KEY: tf.io.FixedLenFeature([], tf.string)}
    chosen = (records.enumerate().filter(lambda i, _: i % step == 0).take(count)
              .map(lambda _, r: transform.decode_pixels_one(
                  tf.io.parse_single_example(r, spec)[features.PIXELS_KEY], image_size)))
    return np.stack([image.numpy() for image in chosen])


# --------------------------------------------------------------------------- what a device needs to know

def _tensor(detail: Dict[str, Any], name: str) -> Dict[str, Any]:
    scale, zero_point = detail["quantization"]
    quantized = bool(scale)
    return {"name": name, "shape": [int(d) for d in detail["shape"]], "dtype": np.dtype(detail["dtype"]).name,
            "scale": float(scale) if quantized else None, "zero_point": int(zero_point) if quantized else None}


def describe(content: bytes) -> Dict[str, Any]:
    """Input, output and ops of a ``.tflite`` model (read back with the interpreter)."""
    interpreter = tf.lite.Interpreter(
        model_content=content,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # the only API that lists a model's ops
    float_ops = {op["op_name"] for op in ops
                 if any(tensors[i]["dtype"] == np.float32 for i in [*op["inputs"], *op["outputs"]] if i >= 0)}
    names = sorted({op["op_name"] for op in ops})
    return {"input": _tensor(inp, features.TFLITE_INPUT),
            "output": _tensor(out, features.PROBABILITIES_OUTPUT),
            "ops": names,
            "select_tf_ops": [n for n in names if n.startswith("Flex")],
            "float32_ops": sorted(float_ops)}


_INSIDE = {model_lib.InferenceCenterCrop: "centre crop", model_lib.Autocontrast: "autocontrast",
           model_lib.Equalize: "equalize", model_lib.BackbonePreprocess: "the backbone's preprocess_input"}


def _inside(model: tf_keras.Model) -> List[str]:
    """The preprocessing steps inside the model, in order (an ensemble: each member's)."""
    members = model_lib.ensemble_members(model)
    steps = ["cast to float"]
    for layer in members[0].layers:
        for cls, what in _INSIDE.items():
            if isinstance(layer, cls):
                fraction = getattr(layer, "fraction", None)
                steps.append(f"{what} {fraction:g}" if fraction is not None else what)
    if len(members) > 1:
        steps.append(f"the average of {len(members)} members' probabilities")
    return steps


# --------------------------------------------------------------------------- the export

def _failed(variant: str, error: Exception) -> str:
    message = f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]
    log.warning("TFLite %s: conversion failed, not exported: %s", variant, message)
    return message


def export_tflite(model: tf_keras.Model, export_dir: str, classes: Sequence[str], image_size: int,
                  variants: Sequence[str], train_files: Sequence[str], calibration_count: int = 200,
                  segmentation=None) -> Optional[Dict[str, Any]]:
    """Writes ``assets.extra/tflite/`` (the variants and ``tflite.json``); returns what it wrote.

    A variant that fails to convert is logged and recorded in ``tflite.json``
    under ``errors``: the SavedModel the training produced still gets
    evaluated and pushed.  ``segmentation`` (a ``SegmentationConfig``): the
    models output per-pixel probabilities, and the JSON says how to read them.
    """
    variants = [v for v in features.TFLITE_VARIANTS if v in variants]
    if not variants:
        return None
    out_dir = os.path.join(export_dir, features.METADATA_DIR, features.TFLITE_DIR)
    tf.io.gfile.makedirs(out_dir)
    start = time.perf_counter()
    info: Dict[str, Any] = {
        "task": "segmentation" if segmentation is not None else "classification",
        "classes": list(classes), "image_size": image_size,
        "input": {"name": features.TFLITE_INPUT, "shape": [1, image_size, image_size, 3], "dtype": "uint8",
                  "color": "RGB", "layout": "NHWC", "resize": RESIZE, "inside_the_model": _inside(model)},
        "models": {}, "errors": {},
    }
    if segmentation is not None:
        info["segmentation"] = {"output": segmentation.output, "foreground_class": segmentation.foreground_class,
                                "mask_values": [v[0] for v in segmentation.class_values]}
    calibration = None
    try:
        pixels = pixel_model(model)
    except Exception as e:  # noqa: BLE001 - a model that does not convert must not cost the SavedModel
        variants, info["errors"] = [], {v: _failed(v, e) for v in variants}
    if "int8" in variants:
        try:
            calibration = calibration_images(train_files, image_size, calibration_count)
            info["calibration"] = {"split": "train", "images": len(calibration)}
        except Exception as e:  # noqa: BLE001 - as above
            variants.remove("int8")
            info["errors"]["int8"] = _failed("int8", e)
    prepared = time.perf_counter() - start
    for variant in variants:
        start = time.perf_counter()
        try:
            content = convert(pixels, variant, calibration)
        except Exception as e:  # noqa: BLE001 - as above
            info["errors"][variant] = _failed(variant, e)
            continue
        seconds = time.perf_counter() - start
        name = features.TFLITE_FILES[variant]
        with tf.io.gfile.GFile(os.path.join(out_dir, name), "wb") as f:
            f.write(content)
        described = describe(content)
        if variant != "int8":
            del described["float32_ops"]  # all of them: float16 only stores the weights so
        info["models"][variant] = {"file": name, "bytes": len(content),
                                   "conversion_seconds": round(seconds, 2), **described}
        log.info("TFLite %s: %s, %.0f KiB, converted in %.1f s", variant, name, len(content) / 1024, seconds)
    info["preparation_seconds"] = round(prepared, 2)
    with tf.io.gfile.GFile(os.path.join(out_dir, features.TFLITE_METADATA_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return info
