"""The pushed TensorFlow Lite models, run here with ``tf.lite.Interpreter`` (``visiontune predict --tflite``).

Images go the way they go to the server: any format Pillow reads is turned
into bytes TensorFlow decodes (:func:`serving.images.encode_for_serving`),
then decoded and resized by Transform's own ``decode_and_resize``, so the
model sees exactly the pixels the SavedModel's ``serving_default`` would.
:class:`TFLiteModel` answers ``predict_images`` with the same outputs as
that signature, so the client's top-k and mask code reads both alike.

``MODEL`` is a ``.tflite`` file, or a folder holding them: a model version
(``SERVING_DIR/MODEL_NAME/VERSION``, or the Trainer's ``Format-Serving``), its
``assets.extra/tflite``, or a base path (``SERVING_DIR/MODEL_NAME``, whose
newest version is used).  From a folder the ``int8`` model is taken unless
``variant`` says otherwise (it is what an edge device runs), ``float16``
when there is no int8 one.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from visiontune import features
from visiontune.errors import UserError

DEFAULT_VARIANTS = ("int8", "float16")  # the order a folder's models are picked in


class TFLiteModelError(UserError):
    """No TensorFlow Lite model where the user pointed, or not one this runner can use."""


def _tflite_dirs(path: str) -> List[str]:
    """Folders that may hold the models, most specific first."""
    dirs = [path, os.path.join(path, features.METADATA_DIR, features.TFLITE_DIR),
            os.path.join(path, features.TFLITE_DIR)]
    from visiontune.components.model_versions import latest_version

    # ASCII digits only, as the servers count versions: a folder named ² is no version.
    version = latest_version(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if version is not None:
        newest = os.path.join(path, version)
        dirs.append(os.path.join(newest, features.METADATA_DIR, features.TFLITE_DIR))
    return dirs


def _read_metadata(folder: str) -> dict:
    path = os.path.join(folder, features.TFLITE_METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TFLiteModelError(f"{path}: not readable as JSON ({e})") from None


def resolve(path: str, variant: Optional[str] = None) -> Tuple[str, dict]:
    """(``.tflite`` file, the ``tflite.json`` beside it or {}) for a file or folder ``path``."""
    if variant is not None and variant not in features.TFLITE_VARIANTS:
        raise TFLiteModelError(f"unknown variant {variant!r}; expected one of {', '.join(features.TFLITE_VARIANTS)}")
    if os.path.isfile(path):
        if variant is not None:
            raise TFLiteModelError(f"{path} is one model: --variant picks a model in a folder")
        return path, _read_metadata(os.path.dirname(path))
    if not os.path.isdir(path):
        raise TFLiteModelError(f"{path}: no such file or folder (a .tflite file or a pushed model version)")
    for folder in _tflite_dirs(path):
        if not os.path.isdir(folder):
            continue
        files = {v: os.path.join(folder, name) for v, name in features.TFLITE_FILES.items()
                 if os.path.isfile(os.path.join(folder, name))}
        if not files:
            errors = _read_metadata(folder).get("errors")
            if errors:
                raise TFLiteModelError(f"{folder}: the Trainer could not convert this model: " + "; ".join(
                    f"{v}: {e}" for v, e in errors.items()))
            continue
        if variant is not None:
            if variant not in files:
                raise TFLiteModelError(f"{folder}: no {variant} model (it has {', '.join(sorted(files))})")
            return files[variant], _read_metadata(folder)
        chosen = next(v for v in DEFAULT_VARIANTS if v in files)
        return files[chosen], _read_metadata(folder)
    raise TFLiteModelError(f"{path}: no TensorFlow Lite model in it (nor in {features.METADATA_DIR}/"
                           f"{features.TFLITE_DIR}/ of it or of its newest version); models exported "
                           "before TFLite support, or with export.tflite: [], have none")


class TFLiteModel:
    """One ``.tflite`` model with its ``tflite.json``; ``predict_images`` as ``serving_default``."""

    def __init__(self, path: str, variant: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                 num_threads: Optional[int] = None):
        import tensorflow as tf

        from visiontune.components.tflite_export import quiet_native_stderr

        self.path, self.metadata = resolve(path, variant)
        try:
            with quiet_native_stderr():
                self.interpreter = tf.lite.Interpreter(model_path=self.path, num_threads=num_threads)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise TFLiteModelError(f"{self.path}: not a TensorFlow Lite model this interpreter can run "
                                   f"({' '.join(str(e).split())[:200]})") from None
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0]["shape"]) != 4 or inputs[0]["shape"][0] != 1 \
                or inputs[0]["shape"][3] != 3:
            raise TFLiteModelError(f"{self.path}: expected one [1, size, size, 3] image input and one output "
                                   f"(a visiontune export), got inputs {[list(d['shape']) for d in inputs]}")
        self.input, self.output = inputs[0], outputs[0]
        self.image_size = int(self.input["shape"][1])
        self.variant = next((v for v, m in self.metadata.get("models", {}).items()
                             if m.get("file") == os.path.basename(self.path)), None)
        self.class_names = list(class_names or self.metadata.get("classes") or [])
        self.segmentation = self.metadata.get("segmentation") if self.metadata.get("task") == "segmentation" else None

    def close(self) -> None:
        pass

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels ``[size, size, 3]`` -> the model's float output (dequantised), batch of 1."""
        dtype = self.input["dtype"]
        scale, zero_point = self.input["quantization"]
        x = np.asarray(pixels, np.float32)[None]
        if np.issubdtype(dtype, np.integer):
            if scale:  # real value = scale * (q - zero_point); export.tflite's int8 has 1 and 0
                x = np.round(x / scale + zero_point)
            info = np.iinfo(dtype)
            x = np.clip(x, info.min, info.max)
        self.interpreter.set_tensor(self.input["index"], x.astype(dtype))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        scale, zero_point = self.output["quantization"]
        if scale:
            return (y.astype(np.float32) - zero_point) * scale
        return y.astype(np.float32)

    def predict_images(self, images: Sequence[bytes]) -> Dict[str, np.ndarray]:
        """Encoded images (PNG/JPEG...) -> ``serving_default``'s outputs."""
        import tensorflow as tf

        from visiontune.components import signatures, transform

        results, sizes = [], []
        for encoded in images:
            if self.segmentation is not None:  # the mask goes back at the size sent
                pixels, size = transform.decode_resize_and_size(tf.constant(encoded), self.image_size)
                sizes.append(size.numpy())
            else:
                pixels = transform.decode_and_resize(tf.constant(encoded), self.image_size)
            results.append(self.run(pixels.numpy())[0])
        outputs = np.stack(results)
        if self.segmentation is not None:
            sizes = np.stack(sizes)
            values = tf.constant(self.segmentation["mask_values"], tf.uint8)
            answer = signatures.segmentation_outputs(tf.constant(outputs), sizes[:, 0], sizes[:, 1], values,
                                                     int(self.segmentation["foreground_class"]))
            return {k: v.numpy() for k, v in answer.items()}
        class_ids = np.argmax(outputs, axis=-1)
        names = [self.class_names[i] if i < len(self.class_names) else f"#{i}" for i in class_ids]
        return {features.CLASSES_OUTPUT: np.array([n.encode() for n in names], dtype=object),
                features.CLASS_IDS_OUTPUT: class_ids,
                features.SCORES_OUTPUT: np.max(outputs, axis=-1),
                features.PROBABILITIES_OUTPUT: outputs}
