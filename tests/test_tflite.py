"""TensorFlow Lite export (float16, full-integer int8) and ``visiontune predict --tflite``.

The shared tiny model (``exported_model``, MobileNetV2-0.35 at 32 px) is
exported by the real Trainer, which now writes ``assets.extra/tflite/``; its
TFLite answers are compared with the SavedModel's ``serving_default`` on the
same image bytes.  Preprocessing that the tiny model lacks (centre crop,
autocontrast, equalize), mixed precision and segmentation are converted from
untrained models built here: a few seconds each.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tests.conftest import SHAPE_CLASSES, draw_shape
from visiontune import configs, features
from visiontune.components import model as model_lib, segmentation_model, tflite_export
from visiontune.errors import UserError
from visiontune.serving.images import encode_for_serving
from visiontune.serving.tflite import TFLiteModel

SIZE = 32


def _tflite_dir(model_dir: str) -> str:
    return os.path.join(model_dir, features.METADATA_DIR, features.TFLITE_DIR)


def _ops(content: bytes):
    """(op names, [(op name, input and output dtypes)]) read back from the flatbuffer."""
    interpreter = tf.lite.Interpreter(
        model_content=content,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    tensors = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    return ({op["op_name"] for op in ops},
            [(op["op_name"], [tensors[i] for i in [*op["inputs"], *op["outputs"]] if i >= 0]) for op in ops])


@pytest.fixture(scope="module")
def model_dir(exported_model):
    return exported_model.serving_model_dir


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Shapes as PNG, JPEG and PPM (which TensorFlow cannot decode: the client converts it)."""
    folder = tmp_path_factory.mktemp("tflite_images")
    rng = random.Random(7)
    paths = []
    for i, (label, ext) in enumerate([("2", "png"), ("10", "jpg"), ("circle", "ppm"), ("10", "png"),
                                      ("circle", "jpg"), ("2", "ppm")]):
        path = str(folder / f"{label}_{i}.{ext}")
        draw_shape(label, 30 + 4 * i, rng).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def sample_images(shapes_prepared, image_files):
    """Encoded bytes of every prepared shape image (train and eval) plus the test files."""
    files = sorted(glob.glob(os.path.join(shapes_prepared.output_dir, "*", "*")))
    files = [f for f in files if os.path.basename(os.path.dirname(f)) in ("train", "eval")]
    records = [r.numpy() for r in tf.data.TFRecordDataset(files)]
    images = [tf.train.Example.FromString(r).features.feature[features.IMAGE_KEY].bytes_list.value[0]
              for r in records]
    return images + [encode_for_serving(p) for p in image_files]


@pytest.fixture(scope="module")
def saved_model_answers(model_dir, sample_images):
    signature = tf.saved_model.load(model_dir).signatures[features.SERVING_DEFAULT]
    out = signature(image_bytes=tf.constant(sample_images))
    return {k: v.numpy() for k, v in out.items()}


# ---------------------------------------------------------------- the Trainer's export

def test_the_trainer_writes_both_variants_and_their_description(model_dir):
    folder = _tflite_dir(model_dir)
    for name in features.TFLITE_FILES.values():
        assert os.path.getsize(os.path.join(folder, name)) > 100_000
    info = json.load(open(os.path.join(folder, features.TFLITE_METADATA_FILE)))
    assert info["task"] == "classification" and info["classes"] == SHAPE_CLASSES
    assert info["input"]["shape"] == [1, SIZE, SIZE, 3] and info["input"]["dtype"] == "uint8"
    assert info["calibration"]["split"] == "train" and info["calibration"]["images"] > 10
    assert info["errors"] == {}
    f16, i8 = info["models"]["float16"], info["models"]["int8"]
    assert f16["input"]["dtype"] == "uint8" and f16["input"]["scale"] is None
    assert f16["output"] == {"name": "probabilities", "shape": [1, 3], "dtype": "float32", "scale": None,
                             "zero_point": None}
    # Pixels go into the int8 model as they are; probabilities come out as q / 256.
    assert (i8["input"]["dtype"], i8["input"]["scale"], i8["input"]["zero_point"]) == ("uint8", 1.0, 0)
    assert (i8["output"]["dtype"], i8["output"]["scale"], i8["output"]["zero_point"]) == ("uint8", 1 / 256, 0)
    assert i8["bytes"] < f16["bytes"]
    assert f16["select_tf_ops"] == i8["select_tf_ops"] == []
    assert i8["float32_ops"] == []  # no contrast layer: integer from input to output


def test_int8_is_integer_only_with_builtin_ops(model_dir):
    content = open(os.path.join(_tflite_dir(model_dir), features.TFLITE_FILES["int8"]), "rb").read()
    interpreter = tf.lite.Interpreter(model_content=content)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.uint8
    names, ops = _ops(content)
    assert not [n for n in names if n.startswith("Flex") or n == "CUSTOM"]
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= names
    floating = [name for name, dtypes in ops if any(d in (np.float32, np.float16) for d in dtypes)]
    assert floating == []


def test_tflite_top1_matches_the_saved_model(model_dir, sample_images, saved_model_answers):
    """float16: every image.  int8: the images the SavedModel is sure of (top-1 ahead by >= 0.3).

    The tiny test model (32 px: a 1 x 1 final feature map, so pooling averages
    no quantisation noise away, 1+1 epochs) moves int8 probabilities by up to
    ~0.25, which can swap near ties (1 of these 42 images, ahead by 0.26).
    On GTSRB at 192 px int8 keeps the SavedModel's top-1 on 97.9 % of the
    2,000 test images and its accuracy within 0.05 points (BENCHMARKS.md,
    "Edge models").
    """
    expected = saved_model_answers["probabilities"]
    ranked = np.sort(expected, axis=-1)
    sure = ranked[:, -1] - ranked[:, -2] >= 0.3
    assert sure.mean() > 0.8
    f16 = TFLiteModel(model_dir, "float16").predict_images(sample_images)
    assert list(f16["class_ids"]) == list(saved_model_answers["class_ids"])
    assert list(f16["classes"]) == list(saved_model_answers["classes"])
    # float16 weights: a probability moves by up to ~0.02 (0.0202 seen for one of 126); the classes are equal.
    np.testing.assert_allclose(f16["probabilities"], expected, atol=0.03)
    int8 = TFLiteModel(model_dir, "int8").predict_images(sample_images)
    assert list(int8["class_ids"][sure]) == list(saved_model_answers["class_ids"][sure])
    assert np.abs(int8["probabilities"] - expected).mean() < 0.05


def test_the_pusher_layout_and_a_file_pick_the_same_models(model_dir, tmp_path, sample_images):
    base = tmp_path / "serving" / "shapes"
    shutil.copytree(model_dir, base / "1700000000")
    int8_file = os.path.join(_tflite_dir(model_dir), features.TFLITE_FILES["int8"])
    by_base, by_file = TFLiteModel(str(base)), TFLiteModel(int8_file)
    assert by_base.variant == by_file.variant == "int8"  # a folder's default
    assert by_file.class_names == SHAPE_CLASSES  # from tflite.json beside the file
    np.testing.assert_array_equal(by_base.predict_images(sample_images[:3])["probabilities"],
                                  by_file.predict_images(sample_images[:3])["probabilities"])


# ---------------------------------------------------------------- visiontune predict --tflite

def test_predict_tflite_prints_top_k(model_dir, image_files, capsys):
    from visiontune import cli

    expected = TFLiteModel(model_dir, "float16").predict_images([encode_for_serving(p) for p in image_files])
    assert cli.main(["predict", "--tflite", model_dir, "--variant", "float16", "--json", *image_files]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == image_files
    for row, probs in zip(rows, expected["probabilities"]):
        assert [c["class"] for c in row["top_k"]] == [SHAPE_CLASSES[i] for i in np.argsort(-probs, kind="stable")]
        np.testing.assert_allclose([c["probability"] for c in row["top_k"]], np.sort(probs)[::-1], rtol=1e-6)

    assert cli.main(["predict", "--tflite", model_dir, "--top-k", "1", image_files[0]]) == 0
    out = capsys.readouterr().out
    int8 = TFLiteModel(model_dir).predict_images([encode_for_serving(image_files[0])])
    assert out.startswith(f"{image_files[0]}: {int8['classes'][0].decode()} ") and out.count("\n") == 1


def test_predict_tflite_errors_are_one_line(model_dir, image_files, tmp_path, capsys):
    from visiontune import cli

    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    not_model = tmp_path / "model.tflite"
    not_model.write_text("not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--tflite", model_dir, str(not_image)], "not an image Pillow can read"),
        (["--tflite", str(tmp_path / "nope"), image_files[0]], "no such file or folder"),
        (["--tflite", str(empty), image_files[0]], "no TensorFlow Lite model in it"),
        (["--tflite", str(not_model), image_files[0]], "not a TensorFlow Lite model"),
        (["--tflite", model_dir, "--server", "http://127.0.0.1:1", image_files[0]], "drop --server"),
        (["--server", "http://127.0.0.1:1", "--model", "m", "--variant", "int8", image_files[0]],
         "use it with --tflite"),
        (["--server", "http://127.0.0.1:1", image_files[0]], "pass --model"),
    ]
    for args, message in cases:
        assert cli.main(["predict", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


# ---------------------------------------------------------------- converting what the tiny model lacks

def _model(**model):
    cfg = configs.ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=SIZE, weights="none",
                              head=configs.HeadConfig(dense_units=[8]), **model)
    return model_lib.create_model(cfg, 4, configs.AugmentationConfig(rotation=0.04, zoom=0.1), seed=1)


def _random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8)


def _run(content: bytes, pixels: np.ndarray) -> np.ndarray:
    interpreter = tf.lite.Interpreter(model_content=content)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.set_tensor(inp["index"], pixels[None])
    interpreter.invoke()
    scale, zero = out["quantization"]
    y = interpreter.get_tensor(out["index"]).astype(np.float32)
    return (y - zero) * scale if scale else y


def test_builtin_equalize_gives_the_same_pixels():
    x = tf.constant(_random_images(1, 3) // 3, tf.float32)  # dark: equalize has work to do
    np.testing.assert_array_equal(tflite_export.BuiltinEqualize()(x).numpy(), model_lib.Equalize()(x).numpy())


@pytest.mark.parametrize("contrast", ["autocontrast", "equalize"])
def test_contrast_and_crop_convert_with_builtin_ops_only(contrast):
    model = _model(contrast=contrast, center_crop_fraction=0.875)
    pixels = tflite_export.pixel_model(model)
    images = _random_images(8)
    keras_out = model(images, training=False).numpy()
    for variant in features.TFLITE_VARIANTS:
        content = tflite_export.convert(pixels, variant, images)
        names, ops = _ops(content)
        assert not [n for n in names if n.startswith("Flex") or n == "CUSTOM"], (variant, names)
        assert {"SLICE", "RESIZE_BILINEAR"} <= names  # the centre crop
        if variant == "float16":
            got = np.concatenate([_run(content, image) for image in images[:3]])
            np.testing.assert_allclose(got, keras_out[:3], atol=0.01)
        else:
            described = tflite_export.describe(content)
            assert described["input"]["scale"] == 1.0 and described["input"]["zero_point"] == 0
            floating = set(described["float32_ops"])
            if contrast == "autocontrast":  # only the per-image gain 255 / (max - min): no int8 DIV
                assert floating == {"DEQUANTIZE", "DIV", "QUANTIZE"}
            for name, dtypes in ops:  # every conv and the head in int8
                if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "SOFTMAX"):
                    assert all(d in (np.int8, np.int32) for d in dtypes), (name, dtypes)


def test_a_mixed_precision_model_converts_from_a_float32_copy():
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model(contrast="autocontrast")
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    pixels = tflite_export.pixel_model(model)
    assert {layer.dtype_policy.name for layer in tflite_export._all_layers(pixels)} == {"float32"}
    images = _random_images(2, 5)
    content = tflite_export.convert(pixels, "float16")
    np.testing.assert_allclose(np.concatenate([_run(content, im) for im in images]),
                               model(images, training=False).numpy(), atol=0.01)


def test_calibration_takes_train_images_spread_through_the_split(shapes_transformed):
    _, transformed_dir, _, size = shapes_transformed
    train = [os.path.join(transformed_dir, "train*")]
    everything = tflite_export.calibration_images(train, size, 10_000)
    some = tflite_export.calibration_images(train, size, 5)
    assert everything.dtype == np.uint8 and everything.shape[1:] == (size, size, 3)
    step = len(everything) // 5
    np.testing.assert_array_equal(some, everything[::step][:5])


def test_segmentation_models_export_masks(shapes_transformed, tmp_path, image_files):
    _, transformed_dir, _, size = shapes_transformed
    seg = configs.SegmentationConfig(decoder_filters=[8])
    cfg = configs.ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=size, weights="none")
    model = segmentation_model.create_segmentation_model(cfg, seg, 2)
    info = tflite_export.export_tflite(model, str(tmp_path), ["background", "foreground"], size,
                                       ["int8", "float16"], [os.path.join(transformed_dir, "train*")], 20, seg)
    assert info["errors"] == {} and info["segmentation"]["mask_values"] == [0, 255]
    assert info["models"]["int8"]["output"]["shape"] == [1, size, size, 2]
    assert info["models"]["int8"]["select_tf_ops"] == []
    image = encode_for_serving(image_files[3])  # 42 x 42
    pixels = tf.constant(_random_images(1, 2))
    for variant in features.TFLITE_VARIANTS:
        edge = TFLiteModel(str(tmp_path), variant)
        got = edge.predict_images([image])
        mask = tf.io.decode_png(got[features.MASK_BYTES_OUTPUT][0]).numpy()
        assert mask.shape == (42, 42, 1) and set(np.unique(mask)) <= {0, 255}
        if variant == "float16":  # an untrained decoder: near ties, so most pixels, not all
            keras_ids = np.argmax(model(pixels, training=False).numpy()[0], axis=-1)
            lite_ids = np.argmax(edge.run(pixels.numpy()[0])[0], axis=-1)
            assert (keras_ids == lite_ids).mean() > 0.9


def test_a_failed_conversion_is_recorded_and_the_rest_exported(tmp_path, caplog):
    info = tflite_export.export_tflite(_model(), str(tmp_path), ["a", "b", "c", "d"], SIZE,
                                       ["int8", "float16"], [str(tmp_path / "no-such-split*")])
    assert list(info["models"]) == ["float16"] and "no transformed examples" in info["errors"]["int8"]
    assert "TFLite int8: conversion failed" in caplog.text
    written = json.load(open(os.path.join(_tflite_dir(str(tmp_path)), features.TFLITE_METADATA_FILE)))
    assert written["errors"] == info["errors"]
    assert TFLiteModel(str(tmp_path)).variant == "float16"  # a folder without int8 falls back
    with pytest.raises(UserError, match="no int8 model"):
        TFLiteModel(str(tmp_path), "int8")


# ---------------------------------------------------------------- the setting

def test_the_export_setting():
    assert configs.load_config(None, []).export.tflite == ["float16", "int8"]
    assert configs.load_config(None, ["export.tflite=[]"]).export.tflite == []
    assert configs.load_config(None, ["export.tflite=int8"]).export.tflite == ["int8"]
    for override, message in [("export.tflite=[int8, int4]", "export.tflite[1]: got 'int4', expected one of "
                                                              "float16, int8"),
                              ("export.tflite=[int8, int8]", "a second time"),
                              ("export.calibration_images=0", "expected an integer >= 1")]:
        with pytest.raises(configs.ConfigError, match=r"^" + override.split("=")[0].replace(".", r"\.")) as e:
            configs.load_config(None, [override])
        assert message in str(e.value)
