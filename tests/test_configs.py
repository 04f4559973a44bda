"""Settings: YAML files, command-line overrides, clear errors."""

import os

import pytest

from visiontune import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_yaml_paths_resolve_against_the_file_and_flags_win(tmp_path):
    cfg_file = tmp_path / "sub" / "run.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "data:\n  source: ../images\n  labels_csv: '*/GT-*.csv'\n"
        "model:\n  backbone: vgg16\n  weights: imagenet\n"
        "training:\n  fine_tune:\n    backbone: train_last\n    layers: 8\n")
    cfg = configs.load_config(str(cfg_file), ["model.backbone=resnet50", "training.batch_size=8",
                                              "model.head.dense_units=[256, 64]"])
    assert cfg.data.source == str(tmp_path / "images")
    assert cfg.data.labels_csv == "*/GT-*.csv"  # relative to the source, left alone
    assert cfg.model.weights == "imagenet"
    assert cfg.model.backbone == "resnet50" and cfg.training.batch_size == 8
    assert cfg.model.head.dense_units == [256, 64]
    assert cfg.training.fine_tune.layers == 8 and cfg.training.fine_tune.backbone == "train_last"


def test_unknown_settings_are_named():
    with pytest.raises(configs.ConfigError, match=r"config.training: unknown setting\(s\) epochz"):
        configs.load_config(None, ["training.epochz=3"])


@pytest.mark.parametrize("override, message", [
    ("model.image_size=500", "outside 32-299"),
    ("training.fine_tune.backbone=some", "is not one of"),
    ("training.batch_size=lots", "expected int"),
    ("evaluation.split=train", "expected eval or test"),
    ("model.center_crop_fraction=0", r"is not in \(0, 1\]"),
    ("model.center_crop_fraction=1.2", r"is not in \(0, 1\]"),
])
def test_invalid_values_fail_before_anything_runs(override, message):
    with pytest.raises(configs.ConfigError, match=message):
        configs.load_config(None, [override])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(configs.ConfigError, match="cannot read config"):
        configs.load_config(str(tmp_path / "nope.yaml"))


def test_shipped_configs_load():
    for name in os.listdir(os.path.join(REPO, "configs")):
        cfg = configs.load_config(os.path.join(REPO, "configs", name))
        assert cfg.data.source and cfg.data.prepared_dir


def test_segmentation_refuses_a_center_crop():
    # Served masks must cover the whole image the client sent.
    with pytest.raises(configs.ConfigError, match="center_crop_fraction: not supported for segmentation"):
        configs.load_config(None, ["task=segmentation", "model.image_size=64",
                                   "model.center_crop_fraction=0.875"])
