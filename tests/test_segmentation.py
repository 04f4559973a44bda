"""``task: segmentation``: ingest of image/mask pairs, the mask Transform, the encoder-decoder,
the pixel metrics, and the whole pipeline on ../shared/datasets/cdnet2014."""

from __future__ import annotations

import base64
import glob
import io
import json
import os

import numpy as np
import pytest

from tests.conftest import MOBILENET_V2_035, SHARED, require_shared
from visiontune import features

CDNET = os.path.join(SHARED, "datasets", "cdnet2014")
# CDnet's values: 0 background, 255 foreground, 50/85/170 void.
BG, FG, SHADOW = 0, 255, 50


def _palette_mask(values: np.ndarray):
    """A mode-P mask whose palette maps index v to an unrelated colour, as real tools write."""
    from PIL import Image

    img = Image.fromarray(values.astype(np.uint8), mode="P")
    img.putpalette([c for v in range(256) for c in ((v * 7) % 256, (v * 13) % 256, v)])
    return img


def _square_scene(size: int, seed: int):
    """(RGB image, mask values): a bright square (foreground) with a void shadow ring."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    mask = np.full((size, size), BG, np.uint8)
    a = int(rng.integers(4, size // 2))
    b = a + size // 3
    mask[a - 2:b + 2, a - 2:b + 2] = SHADOW
    mask[a:b, a:b] = FG
    pixels[a:b, a:b] = rng.integers(190, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels), mask


def write_pairs(root: str, count: int = 8, size: int = 48) -> str:
    os.makedirs(os.path.join(root, "x"), exist_ok=True)
    os.makedirs(os.path.join(root, "y"), exist_ok=True)
    for i in range(count):
        image, mask = _square_scene(size, i)
        image.save(os.path.join(root, "x", f"in{i:06d}.jpg"), quality=95)
        _palette_mask(mask).save(os.path.join(root, "y", f"gt{i:06d}.png"))
    return root


def _seg_config(source: str, prepared: str, **data):
    from visiontune import configs

    return configs.load_config(None, ["task=segmentation", f"data.source={source}",
                                      f"data.prepared_dir={prepared}", "data.workers=1",
                                      "data.eval_fraction=0.25", "model.image_size=64"]
                               + [f"data.{k}={v}" for k, v in data.items()])


def _read_examples(folder: str):
    import tensorflow as tf

    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        for record in tf.data.TFRecordDataset(path):
            out.append(tf.train.Example.FromString(record.numpy()))
    return out


# ----------------------------------------------------------------------------- ingest

def test_prepare_pairs_keeps_palette_indices_and_rejects_bad_pairs(tmp_path):
    from PIL import Image

    from visiontune import configs
    from visiontune.components import prepare

    src = write_pairs(str(tmp_path / "src"), count=8)
    # A missing mask, a mask of the wrong size, a colour mask, an orphan mask, a non-matching name.
    Image.new("RGB", (48, 48)).save(tmp_path / "src" / "x" / "in000100.jpg")
    Image.new("RGB", (48, 48)).save(tmp_path / "src" / "x" / "in000101.jpg")
    _palette_mask(np.zeros((40, 48))).save(tmp_path / "src" / "y" / "gt000101.png")
    Image.new("RGB", (48, 48)).save(tmp_path / "src" / "x" / "in000102.jpg")
    Image.new("RGB", (48, 48), (255, 0, 0)).save(tmp_path / "src" / "y" / "gt000102.png")
    _palette_mask(np.zeros((48, 48))).save(tmp_path / "src" / "y" / "gt000999.png")
    Image.new("RGB", (48, 48)).save(tmp_path / "src" / "x" / "frame.jpg")

    config = _seg_config(src, str(tmp_path / "out"))
    result = prepare.prepare_dataset(config.data, progress=False,
                                     segmentation=configs.segmentation_settings(config))
    assert result.classes == ["background", "foreground"]
    assert result.task == "segmentation"
    assert sum(result.totals.values()) == 8
    reasons = {os.path.basename(f): r for f, r in result.rejects}
    assert "no mask" in reasons["in000100.jpg"]
    assert "48x40" in reasons["in000101.jpg"] and "48x48" in reasons["in000101.jpg"]
    assert "colour" in reasons["in000102.jpg"]
    assert "mask without an image" in reasons["gt000999.png"]
    assert "mask_regex" in reasons["frame.jpg"]
    # Every input file is either in the output or in rejects.csv: 8 pairs + 5 rejects.
    assert len(result.rejects) == 5

    examples = _read_examples(str(tmp_path / "out" / "train")) + _read_examples(str(tmp_path / "out" / "eval"))
    assert len(examples) == 8
    by_name = {e.features.feature["filename"].bytes_list.value[0].decode(): e for e in examples}
    example = by_name["x/in000003.jpg"]
    assert "label" not in example.features.feature
    mask = Image.open(io.BytesIO(example.features.feature["mask"].bytes_list.value[0]))
    assert mask.format == "PNG" and mask.mode == "L"
    # The palette indices, not the palette's colours.
    _, expected = _square_scene(48, 3)
    np.testing.assert_array_equal(np.asarray(mask), expected)
    # Per-class counts: images containing the class.
    assert result.counts["train"]["foreground"] + result.counts["eval"]["foreground"] == 8


def test_segmentation_settings_are_checked():
    from visiontune import configs

    base = ["task=segmentation"]
    with pytest.raises(configs.ConfigError, match="multiple of 32"):
        configs.load_config(None, base + ["model.image_size=100"])
    with pytest.raises(configs.ConfigError, match="rotation"):
        configs.load_config(None, base + ["training.augmentation.rotation=0.1"])
    with pytest.raises(configs.ConfigError, match="sigmoid"):
        configs.load_config(None, base + ["segmentation.output=sigmoid",
                                          "segmentation.class_values=[[0],[1],[2]]"])
    # The tutorial's default: only the encoder's last block is fine-tuned.
    assert configs.load_config(None, base).training.fine_tune.backbone == "last_block"
    assert configs.load_config(None, base + ["training.fine_tune.backbone=all"]
                               ).training.fine_tune.backbone == "all"


# ----------------------------------------------------------------------------- transform

def test_transform_resizes_masks_nearest_and_maps_void():
    import tensorflow as tf

    from visiontune.components import masks, transform

    image, values = _square_scene(48, 1)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    lookup = masks.lookup_table([[0], [255]], features.VOID_ID)
    inputs = {"image": tf.constant([[buf.getvalue()], [buf.getvalue()]]),
              "mask": tf.constant([[masks.encode_mask(values)], [b""]])}
    out = transform.preprocessing_fn(inputs, {"image_size": 96, "task": "segmentation",
                                              "mask_lookup": lookup, "classes": ["bg", "fg"]})
    assert out["image_height"].numpy().tolist() == [48, 48]
    assert out["image_width"].numpy().tolist() == [48, 48]
    ids = transform.decode_mask_ids(out["mask_ids"], 96).numpy()
    assert ids.dtype == np.uint8 and ids.shape == (2, 96, 96)
    # Nearest neighbour: only class ids and void, never a value in between.
    assert set(np.unique(ids[0]).tolist()) == {0, 1, features.VOID_ID}
    expected = np.array(lookup, np.uint8)[np.repeat(np.repeat(values, 2, 0), 2, 1)]
    np.testing.assert_array_equal(ids[0], expected)
    # A serving request has no mask: all void instead of a decode error.
    assert set(np.unique(ids[1]).tolist()) == {features.VOID_ID}


# ----------------------------------------------------------------------------- model

def test_encoder_decoder_shapes_skips_and_last_block_policy():
    from visiontune import configs
    from visiontune.components import model as model_lib, segmentation_model

    cfg = configs.load_config(None, ["task=segmentation", "model.backbone=vgg16", "model.weights=none",
                                     "model.image_size=64"])
    model = segmentation_model.create_segmentation_model(cfg.model, cfg.segmentation, 2)
    assert model.output_shape == (None, 64, 64, 2)
    encoder = model_lib.get_backbone_model(model)
    # One skip per resolution between 1/2 and 1/16: VGG16's last conv at each.
    assert [t.name.split("/")[0] for t in encoder.outputs[1:]] == [
        "block5_conv3", "block4_conv3", "block3_conv3", "block2_conv2"]
    trainable = model_lib.apply_fine_tune_policy(model, "last_block")
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]

    sigmoid = configs.load_config(None, ["task=segmentation", "model.backbone=vgg16", "model.weights=none",
                                         "model.image_size=64", "segmentation.output=sigmoid",
                                         "segmentation.skip_connections=false"])
    model = segmentation_model.create_segmentation_model(sigmoid.model, sigmoid.segmentation, 2)
    assert model.output_shape == (None, 64, 64, 1)
    assert len(model_lib.get_backbone_model(model).outputs) == 1


def test_pixel_metrics_from_confusion_matrices():
    from visiontune.components import segmentation_metrics as sm

    fg = sm.Matrix(tp=8, fp=2, fn=4, tn=86)
    bg = sm.Matrix(tp=86, fp=4, fn=2, tn=8)
    assert sm.SegmentationIoU(class_ids=[1], ground_truth_key="m", prediction_key="p"
                              )._metric_value(fg) == pytest.approx(8 / 14)
    assert sm.SegmentationF1(class_ids=[1], ground_truth_key="m", prediction_key="p"
                             )._metric_value(fg) == pytest.approx(16 / 22)
    metric = sm.PixelAccuracy(class_ids=[0, 1], ground_truth_key="m", prediction_key="p")
    assert metric._value([bg, fg]) == pytest.approx(94 / 100)
    assert metric.name == "pixel_accuracy"
    assert sm.MeanIoU(class_ids=[0, 1], ground_truth_key="m", prediction_key="p"
                      )._value([bg, fg]) == pytest.approx((86 / 92 + 8 / 14) / 2)


# ----------------------------------------------------------------------------- pipeline (CDnet2014)

@pytest.fixture(scope="module")
def cdnet_run(tmp_path_factory):
    require_shared(CDNET)
    require_shared(MOBILENET_V2_035)
    from visiontune import configs
    from visiontune.pipeline import local_runner

    root = tmp_path_factory.mktemp("cdnet")
    config = configs.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                              "cdnet2014.yaml"), [
        f"data.prepared_dir={root}/prepared", f"pipeline.output_dir={root}/run",
        f"pipeline.serving_dir={root}/serving", "data.workers=1", "model.image_size=64",
        "training.warmup.epochs=2", "evaluation.min_accuracy=0.5",
        # No fine-tuning phase (its recompile was a fifth of the Trainer's time; the GTSRB run has one)
        # and no TFLite models (segmentation's TFLite export is tested in test_tflite.py).
        "training.fine_tune.epochs=0", "export.tflite=[]"])
    summary = local_runner.run(config)
    return config, summary


@pytest.mark.e2e
@pytest.mark.shared
def test_cdnet_pipeline_pushes_a_model_whose_metrics_match_its_masks(cdnet_run):
    import tensorflow as tf

    from visiontune.pipeline import report

    config, summary = cdnet_run
    assert summary.pushed, summary.message()
    metrics = summary.metrics
    assert metrics["example_count"] == 10
    assert {"pixel_accuracy", "mean_iou"} <= set(metrics)
    assert [c.name for c in summary.per_class] == ["background", "foreground"]
    assert all(c.iou is not None for c in summary.per_class)

    # TFMA's pixel accuracy is the share of non-void test pixels the model gets right.
    model = tf.saved_model.load(summary.pushed_dir)
    # The test examples as ImageExampleGen wrote them (gzipped TFRecords), found through ML Metadata.
    from visiontune.pipeline import local_runner, run_metadata

    store = run_metadata.open_store(local_runner.metadata_path(config))
    examples = run_metadata.outputs(store, run_metadata.latest_execution(store, "ImageExampleGen").id)["examples"]
    test_files = glob.glob(os.path.join(examples[0].uri, "Split-test", "*"))
    records = [r.numpy() for r in tf.data.TFRecordDataset(test_files, compression_type="GZIP")]
    predicted = model.signatures["serving_examples"](examples=tf.constant(records))["class_ids"].numpy()
    truth = model.signatures["transform_features"](examples=tf.constant(records))["mask_ids"].numpy()
    valid = truth != features.VOID_ID
    assert valid.sum() < truth.size  # CDnet's test masks do have void pixels
    assert metrics["pixel_accuracy"] == pytest.approx((predicted[valid] == truth[valid]).mean(), abs=1e-6)

    # serving_default: raw JPEG bytes in, a full-size mask PNG in CDnet's values out.
    jpeg = open(os.path.join(CDNET, "test", "x", "in000700.jpg"), "rb").read()
    out = model.signatures["serving_default"](image_bytes=tf.constant([jpeg]))
    mask = tf.io.decode_png(out["mask_bytes"][0]).numpy()
    assert mask.shape == (240, 320, 1)
    assert set(np.unique(mask).tolist()) <= {0, 255}
    probability = out["foreground_probability"].numpy()
    assert probability.shape == (1, 64, 64) and 0.0 <= probability.min() <= probability.max() <= 1.0
    # No classification signature (a mask is not a class list); warm-up requests predict masks only.
    assert "classification" not in model.signatures
    warmup_file = os.path.join(summary.pushed_dir, features.METADATA_DIR, features.WARMUP_REQUESTS_FILE)
    from tensorflow_serving.apis import prediction_log_pb2

    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(warmup_file)]
    assert logs and {log.WhichOneof("log_type") for log in logs} == {"predict_log"}

    # The run's report shows the overlays and the per-class IoU.
    data = json.load(open(os.path.join(config.pipeline.output_dir, report.REPORT_DIR, report.DATA_FILE)))
    assert data["task"] == "segmentation" and len(data["overlays"]) == report.MAX_OVERLAYS
    page = open(os.path.join(config.pipeline.output_dir, report.REPORT_DIR, report.INDEX_FILE)).read()
    assert "ground truth" in page and "IoU" in page
    assert base64.b64encode(open(os.path.join(config.pipeline.output_dir, report.REPORT_DIR,
                                              "overlays.png"), "rb").read()[:300]).decode()[:40] in page


@pytest.mark.e2e
@pytest.mark.shared
def test_cdnet_masks_over_rest_and_grpc_and_predict_command(cdnet_run, tmp_path, capsys):
    """A client sends JPEG bytes and gets the mask PNG (base64 over REST) of the frame's size."""
    import tensorflow as tf

    from tests.test_serving import start_builtin
    from visiontune import cli
    from visiontune.features import MASK_BYTES_OUTPUT as MASK_OUTPUT
    from visiontune.serving.client import PredictionError

    config, summary = cdnet_run
    base_path = os.path.dirname(summary.pushed_dir)
    served = start_builtin(base_path, name="cdnet")
    try:
        served.wait_available(int(os.path.basename(summary.pushed_dir)))
        jpeg = open(os.path.join(CDNET, "test", "x", "in000847.jpg"), "rb").read()
        expected = tf.saved_model.load(summary.pushed_dir).signatures["serving_default"](
            image_bytes=tf.constant([jpeg]))[MASK_OUTPUT].numpy()[0]
        body = served.rest().predict_json({"instances": [{"b64": base64.b64encode(jpeg).decode()}]})
        assert base64.b64decode(body["predictions"][0][MASK_OUTPUT]["b64"]) == expected
        assert served.grpc().predict_images([jpeg])[MASK_OUTPUT][0] == expected
        # :classify answers TF Serving's error, naming the missing classification signature.
        with pytest.raises(PredictionError) as e:
            served.rest().request("POST", "/v1/models/cdnet:classify", json.dumps(
                {"examples": [{"image": {"b64": base64.b64encode(jpeg).decode()}}]}).encode())
        assert e.value.http_status == 400 and "this model has no classification signature" in e.value.message

        image = os.path.join(CDNET, "test", "x", "in000847.jpg")
        assert cli.main(["predict", "--server", served.rest_url, "--model", "cdnet",
                         "--masks-dir", str(tmp_path), image]) == 0
        assert "mask 320x240" in capsys.readouterr().out
        assert open(tmp_path / "in000847_mask.png", "rb").read() == expected
    finally:
        served.stop()
