"""Settings: YAML files, command-line overrides, strict types, values checked when they load."""

import dataclasses
import os
import re
import subprocess
import sys
import typing

import pytest
import yaml

from tests.conftest import require_shared
from visiontune import configs
from visiontune.configs import backbones as registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(n for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith((".yaml", ".yml")))


def _refused(overrides, message, path=None):
    with pytest.raises(configs.ConfigError, match=message) as info:
        configs.load_config(path, list(overrides))
    text = str(info.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- reading files and overrides

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


def test_values_of_the_right_type_are_taken_as_written(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "training:\n"
        "  mixed_precision: no\n"        # YAML 1.1 boolean
        "  warmup:\n    learning_rate: 1e-4\n"   # PyYAML reads this (no dot) as a string
        "  backup_every_seconds: 10\n"   # an integer where a number goes
        "pipeline:\n  enable_cache: 'off'\n"
        "data:\n  classes: [1, 2, 10]\n"  # class names written as numbers
        "vertex:\n")                      # a section with everything commented out
    cfg = configs.load_config(str(cfg_file), ["model.head.dense_units=128,64", "training.seed=7",
                                              "model.head.dropout=0"])
    assert cfg.training.mixed_precision is False and cfg.pipeline.enable_cache is False
    assert cfg.training.warmup.learning_rate == pytest.approx(1e-4)
    assert isinstance(cfg.training.backup_every_seconds, float) and cfg.training.backup_every_seconds == 10.0
    assert cfg.data.classes == ["1", "2", "10"]
    assert cfg.model.head.dense_units == [128, 64] and cfg.training.seed == 7
    assert cfg.model.head.dropout == 0.0 and cfg.vertex == configs.VertexConfig()


def test_unknown_settings_are_named_with_a_suggestion():
    text = _refused(["training.epochz=3"], r"^training\.epochz: unknown setting\(s\) epochz; known in training: ")
    assert "batch_size" in text
    _refused(["training.batchsize=3"], r"training\.batchsize: .*did you mean batch_size\?")
    _refused(["training.learning_rate=0.1"], r"did you mean warmup\.learning_rate or fine_tune\.learning_rate\?")
    _refused(["epochs=3"], r"^epochs: unknown setting\(s\) epochs; known at the top level: data, evaluation")


@pytest.mark.parametrize("override, message", [
    # Strict types: nothing is rounded, truthy or guessed.
    ("training.batch_size=3.9", r"^training\.batch_size: got 3\.9, expected an integer >= 1$"),
    ("training.batch_size=true", r"^training\.batch_size: got true, expected an integer >= 1$"),
    ("training.batch_size=lots", r"^training\.batch_size: got 'lots', expected an integer >= 1$"),
    ("training.mixed_precision=2", r"^training\.mixed_precision: got 2, expected true or false$"),
    ("training.mixed_precision=maybe", r"got 'maybe', expected true or false"),
    ("model.head.dropout=true", r"^model\.head\.dropout: got true, expected a number in \[0, 1\)$"),
    ("model.alpha=.nan", r"^model\.alpha: got nan, expected a number > 0$"),
    ("model.head.dense_units=[64, 0.5]", r"^model\.head\.dense_units\[1\]: got 0\.5, expected an integer >= 1$"),
    ("pipeline.model_name=yes", r"^pipeline\.model_name: got true, expected a non-empty string .*quote"),
    ("model.head={dropout: 0.1, dropout: 0.2}", r"^model\.head\.dropout: duplicate key; expected each setting"),
    ("training=5", r"^training: got 5, expected a mapping of settings \(batch_size, optimizer, "),
    # Ranges.
    ("training.batch_size=-8", r"^training\.batch_size: got -8, expected an integer >= 1$"),
    ("training.batch_size=0", r"expected an integer >= 1"),
    ("evaluation.batch_size=0", r"^evaluation\.batch_size: got 0, expected an integer >= 1$"),
    ("training.warmup.epochs=-1", r"^training\.warmup\.epochs: got -1, expected an integer >= 0$"),
    ("training.fine_tune.learning_rate=-0.001", r"^training\.fine_tune\.learning_rate: got -0\.001, "
                                                r"expected a number > 0$"),
    ("training.warmup.learning_rate=0", r"^training\.warmup\.learning_rate: got 0\.0, expected a number > 0$"),
    ("training.weight_decay=-1", r"expected a number >= 0$"),
    ("training.label_smoothing=1", r"^training\.label_smoothing: got 1\.0, expected a number in \[0, 1\)$"),
    ("training.early_stopping_patience=-1", r"^training\.early_stopping_patience: got -1, expected an integer >= 0$"),
    ("training.reduce_lr_patience=-2", r"expected an integer >= 0$"),
    ("training.reduce_lr_factor=1.5", r"^training\.reduce_lr_factor: got 1\.5, expected a number in \(0, 1\)$"),
    ("training.steps_per_epoch=-1", r"expected an integer >= 0$"),
    ("training.backup_every_seconds=-5", r"expected a number >= 0$"),
    ("training.seed=-1", r"^training\.seed: got -1, expected an integer in \[0, 4294967295\]$"),
    ("training.augmentation.zoom=1.5", r"^training\.augmentation\.zoom: got 1\.5, expected a number in \[0, 1\]$"),
    ("training.augmentation.downscale_probability=2", r"downscale_probability: got 2\.0, expected a number in \[0"),
    ("data.eval_fraction=1", r"^data\.eval_fraction: got 1\.0, expected a number in \[0, 1\)$"),
    ("data.num_shards=0", r"^data\.num_shards: got 0, expected an integer >= 1$"),
    ("data.workers=-1", r"^data\.workers: got -1, expected an integer >= 0$"),
    ("evaluation.top_k=0", r"^evaluation\.top_k: got 0, expected an integer >= 1$"),
    ("evaluation.min_accuracy=80", r"^evaluation\.min_accuracy: got 80\.0, expected a number in \[0, 1\]$"),
    ("model.alpha=0", r"^model\.alpha: got 0\.0, expected a number > 0$"),
    ("model.center_crop_fraction=0", r"^model\.center_crop_fraction: got 0\.0, expected a number in \(0, 1\]$"),
    ("model.center_crop_fraction=1.2", r"expected a number in \(0, 1\]$"),
    ("pipeline.beam_workers=0", r"^pipeline\.beam_workers: got 0, expected an integer >= 1$"),
    ("pipeline.output_dir=", r"^pipeline\.output_dir: got '', expected a non-empty string$"),
    ("vertex.endpoint.traffic_percentage=101", r"expected an integer in \[0, 100\]$"),
    ("vertex.training.accelerator_count=-1", r"expected an integer >= 0$"),
    # Allowed values.
    ("task=detection", r"^task: got 'detection', expected one of classification, segmentation$"),
    ("training.optimizer=adagrad", r"^training\.optimizer: got 'adagrad', expected one of adam, sgd, rmsprop, "
                                   r"adamw$"),
    ("model.head.pooling=sum", r"^model\.head\.pooling: got 'sum', expected one of avg, max$"),
    ("model.head.activation=rleu", r"^model\.head\.activation: got 'rleu', expected one of .*relu, relu6"),
    ("model.contrast=bright", r"^model\.contrast: got 'bright', expected one of none, autocontrast, equalize$"),
    ("evaluation.split=train", r"^evaluation\.split: got 'train', expected one of eval, test$"),
    ("training.warmup.backbone=half", r"^training\.warmup\.backbone: got 'half', expected one of frozen, all, "
                                      r"freeze_first, train_last, last_block$"),
    ("training.fine_tune.backbone=some", r"^training\.fine_tune\.backbone: got 'some', expected one of frozen"),
    ("segmentation.output=linear", r"^segmentation\.output: got 'linear', expected one of softmax, sigmoid$"),
    ("data.csv_delimiter=;;", r"^data\.csv_delimiter: got ';;', expected a single character$"),
    ("data.split_group_regex=^(\\d+", r"^data\.split_group_regex: got .* not a valid regular expression"),
    ("data.classes=[a, b, a]", r"^data\.classes\[2\]: got 'a' a second time, expected distinct"),
    # The backbone registry, without TensorFlow.
    ("model.backbone=resnet9000", r"^model\.backbone: got 'resnet9000', expected one of densenet121, "
                                  r"efficientnet_b0, .*mobilenet_v2, .*xception$"),
    ("model.image_size=500", r"^model\.image_size: got 500, expected 0 \(mobilenet_v2's default, 224 px\) "
                             r"or an integer in \[32, 299\]$"),
    ("model.image_size=16", r"or an integer in \[32, 299\] \(mobilenet_v2 needs at least 32 px\)$"),
    ("model.image_size=-1", r"got -1, expected 0"),
])
def test_invalid_values_fail_when_the_config_loads(override, message):
    _refused([override], message)


@pytest.mark.parametrize("backbone, size, ok", [
    ("inception_v3", 64, False), ("inception_v3", 75, True), ("inception_resnet_v2", 74, False),
    ("xception", 70, False), ("xception", 71, True), ("vgg16", 32, True), ("efficientnet_b0", 31, False),
])
def test_the_backbones_minimum_input_size_is_checked_at_load(backbone, size, ok):
    overrides = [f"model.backbone={backbone}", f"model.image_size={size}"]
    if ok:
        assert configs.load_config(None, overrides).model.image_size == size
        return
    minimum = registry.get(backbone).min_size
    _refused(overrides, rf"^model\.image_size: got {size}, expected 0 \({backbone}'s default, \d+ px\) or an "
                        rf"integer in \[{minimum}, 299\] \({backbone} needs at least {minimum} px\)$")


def test_registry_metadata_needs_no_tensorflow():
    assert registry.input_size("inception_v3") == 299 and registry.input_size("vgg16", 64) == 64
    with pytest.raises(ValueError, match="at least 71 px"):
        registry.input_size("xception", 70)
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'; known: densenet121, "):
        registry.get("resnet9000")
    assert {b.name for b in registry.BACKBONES.values() if b.has_alpha} == {"mobilenet", "mobilenet_v2"}
    code = ("import sys; from visiontune import configs; configs.load_config(None, ['model.backbone=xception']);"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'tfx')"
            " or m.startswith('visiontune.') and m.split('.')[1] not in ('configs', 'errors', 'features')];"
            "print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_weights_must_exist_but_uris_and_keywords_pass(tmp_path):
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model:\n  weights: w.h5\n")
    assert configs.load_config(str(cfg_file)).model.weights == str(weights)  # relative to the file
    for value in ("imagenet", "none", "ImageNet", "gs://bucket/w.h5", "file:///nowhere/w.h5"):
        assert configs.load_config(None, [f"model.weights={value}"]).model.weights == value
    text = _refused([f"model.weights={tmp_path / 'missing.h5'}"],
                    r"^model\.weights: .*missing\.h5: no such file; expected imagenet, none, a URI")
    assert str(tmp_path / "missing.h5") in text
    _refused([f"model.weights={tmp_path}"], r"^model\.weights: .*: a folder; expected imagenet")


def test_phase_policies_that_count_layers_need_a_count():
    _refused(["training.fine_tune.backbone=train_last", "training.fine_tune.layers=0"],
             r"^training\.fine_tune\.layers: got 0, expected an integer >= 1 with backbone: train_last")
    _refused(["training.warmup.backbone=freeze_first"],
             r"^training\.warmup\.layers: got 0, expected an integer >= 1 with backbone: freeze_first")
    _refused(["training.augmentation.downscale_min_size=300", "model.image_size=96"],
             r"downscale_min_size: got 300, expected 0 \(off\) or an integer in \[1, 96\]")


# --------------------------------------------------------------------------- where a mistake is

def test_a_mistake_in_the_file_names_the_file_and_line_one_on_the_command_line_does_not(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model:\n  backbone: vgg16\ntraining:\n  warmup:\n    epochs: 2\n  batch_size: 3.9\n")
    path = str(cfg_file)
    _refused([], rf"^{re.escape(path)}:6: training\.batch_size: got 3\.9, expected an integer >= 1$", path)
    text = _refused(["training.batch_size=-1"], r"^training\.batch_size: got -1, expected an integer >= 1$", path)
    assert path not in text
    # A cross-setting mistake is placed at the line of the setting it depends on.
    cfg_file.write_text("task: segmentation\nmodel:\n  backbone: xception\n")
    _refused([], rf"^{re.escape(path)}:3: model\.image_size: got 0, which is xception's default of 299 px", path)
    cfg_file.write_text("model:\n  backbone: inception_v3\n  image_size: 64\n")
    _refused([], rf"^{re.escape(path)}:3: model\.image_size: got 64", path)


def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("training:\n  batch_size: 16\n  optimizer: sgd\n  batch_size: 64\n")
    _refused([], rf"^{re.escape(str(cfg_file))}:4: training\.batch_size: duplicate key \(first on line 2\)",
             str(cfg_file))
    cfg_file.write_text("model:\n  backbone: vgg16\nmodel:\n  alpha: 0.5\n")
    _refused([], r":3: model: duplicate key \(first on line 1\)", str(cfg_file))
    # The same key in different sections is no duplicate.
    cfg_file.write_text("training:\n  batch_size: 16\nevaluation:\n  batch_size: 16\n")
    assert configs.load_config(str(cfg_file)).evaluation.batch_size == 16


def test_broken_yaml_and_missing_files_are_one_line(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("training:\n  batch_size: [16\n  optimizer: sgd\n")
    _refused([], rf"^{re.escape(str(cfg_file))}:\d+: not valid YAML: .*\(column \d+\)$", str(cfg_file))
    cfg_file.write_text("- a list\n- not a mapping\n")
    _refused([], r"expected a mapping of sections", str(cfg_file))
    _refused([], "cannot read config", str(tmp_path / "nope.yaml"))
    _refused(["training.batch_size"], r"^--set 'training\.batch_size': expected section\.key=value")


# --------------------------------------------------------------------------- segmentation

def test_segmentation_settings_that_depend_on_each_other():
    seg = ["task=segmentation"]
    _refused(seg + ["model.backbone=xception"],
             r"^model\.image_size: got 0, which is xception's default of 299 px; segmentation needs a multiple "
             r"of 32")
    _refused(seg + ["segmentation.class_values=[[0], [255, 0]]"],
             r"^segmentation\.class_values\[1\]: mask value 0 is also in class_values\[0\]")
    _refused(seg + ["segmentation.void_values=[255]"], r"^segmentation\.void_values\[0\]: mask value 255")
    _refused(seg + ["segmentation.class_values=[[0], [256]]"],
             r"^segmentation\.class_values\[1\]\[0\]: got 256, expected an integer in \[0, 255\]$")
    _refused(seg + ["segmentation.class_values=[[0], [1], [2]]"], r"^data\.classes: got none, expected 3 names")
    _refused(seg + ["segmentation.class_values=[[0], [1], [2]]", "data.classes=[a, b]"],
             r"^data\.classes: got 2 names, expected 3")
    _refused(seg + ["segmentation.foreground_class=2"],
             r"^segmentation\.foreground_class: got 2, expected a class index in \[0, 1\]$")
    _refused(seg + ["training.label_smoothing=0.1"], r"^training\.label_smoothing: not supported for segmentation")
    cfg = configs.load_config(None, seg + ["segmentation.class_values=[[0], [1], [2]]", "data.classes=[a, b, c]",
                                           "segmentation.foreground_class=2"])
    assert cfg.training.fine_tune.backbone == "last_block"


def test_segmentation_refuses_a_center_crop():
    # Served masks must cover the whole image the client sent.
    _refused(["task=segmentation", "model.image_size=64", "model.center_crop_fraction=0.875"],
             "center_crop_fraction: not supported for segmentation")


def test_segmentation_refuses_an_ensemble():
    _refused(["task=segmentation", "model.image_size=64", "model.ensemble_size=2"],
             r"^model\.ensemble_size: got 2, expected 1: ensembles are not supported for segmentation")
    _refused(["model.ensemble_size=0"], r"^model\.ensemble_size: got 0, expected an integer >= 1")


# --------------------------------------------------------------------------- the shipped configs

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    path = os.path.join(REPO, "configs", name)
    with open(path) as f:
        weights = (yaml.safe_load(f).get("model") or {}).get("weights", "imagenet")
    if weights.lower() not in ("imagenet", "none") and "://" not in weights:
        require_shared(os.path.normpath(os.path.join(os.path.dirname(path), weights)))
    cfg = configs.load_config(path)
    assert cfg.data.source and cfg.data.prepared_dir
    configs.validate(cfg)  # what a loaded config passes, a rebuilt one passes too
    assert configs.from_dict(configs.Config, configs.to_dict(cfg)) == cfg


def test_the_demo_config_loads(tmp_path):
    from visiontune.pipeline import demo

    cfg = demo.demo_config(str(tmp_path / "demo"))
    assert cfg.model.weights == "none" and cfg.model.image_size == 32
    with pytest.raises(configs.ConfigError, match=r"^demo: training\.batch_size: got 3\.9"):
        demo.demo_config(str(tmp_path / "demo"), ["training.batch_size=3.9"])
    with pytest.raises(configs.ConfigError, match=r"^model\.head\.dropout: got 1\.0"):
        demo.demo_config(str(tmp_path / "demo"), ["model.head.dropout=1"])


def test_validate_checks_configs_built_in_python():
    cfg = configs.Config()
    configs.validate(cfg)
    cfg.training.batch_size = 3.9
    with pytest.raises(configs.ConfigError, match=r"^training\.batch_size: got 3\.9"):
        configs.validate(cfg)
    cfg = configs.Config(model=configs.ModelConfig(image_size="big"))
    with pytest.raises(configs.ConfigError, match=r"^model\.image_size: got 'big'"):
        configs.validate(cfg)


# --------------------------------------------------------------------------- documentation

def _sections(cls):
    yield cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp)


@pytest.mark.parametrize("cls", sorted({c for c in _sections(configs.Config)}, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_every_setting_is_documented_in_its_class_docstring(cls):
    doc = cls.__doc__ or ""
    assert "Attributes:" in doc, cls.__name__
    documented = set(re.findall(r"^      (\w+):", doc.split("Attributes:", 1)[1], re.MULTILINE))
    assert documented == {f.name for f in dataclasses.fields(cls)}, cls.__name__
