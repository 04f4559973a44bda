"""Config mistakes through the real command line: status 2, one line naming the key and what it takes.

Each case runs ``python -m visiontune run --config config.yaml [--set ...]`` in
its own folder.  ``run`` loads the config before it imports TFX, so a refused
config costs a fraction of a second, and nothing may have started: no
prepared data, no pipeline folder, no ML Metadata database.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# The run's folders, relative to the config file: none of them may appear.
BASE = """\
data:
  source: images
  prepared_dir: prepared
pipeline:
  output_dir: run
  serving_dir: serving
"""

# (id, extra YAML for the file, --set values, key as written, what it takes / why, file:line or None)
CASES = [
    ("batch_size_float", "", ["training.batch_size=3.9"], "training.batch_size", "got 3.9, expected an integer >= 1",
     None),
    ("batch_size_float_in_file", "training:\n  batch_size: 3.9\n", [], "training.batch_size",
     "got 3.9, expected an integer >= 1", "config.yaml:8"),
    ("mixed_precision_int", "", ["training.mixed_precision=2"], "training.mixed_precision",
     "got 2, expected true or false", None),
    ("dropout_bool", "model:\n  head:\n    dropout: true\n", [], "model.head.dropout",
     "got true, expected a number in [0, 1)", "config.yaml:9"),
    ("duplicate_key", "training:\n  batch_size: 16\n  optimizer: sgd\n  batch_size: 64\n", [],
     "training.batch_size", "duplicate key (first on line 8)", "config.yaml:10"),
    ("duplicate_section", "training:\n  batch_size: 16\ntraining:\n  optimizer: sgd\n", [], "training",
     "duplicate key (first on line 7)", "config.yaml:9"),
    ("negative_epochs", "", ["training.warmup.epochs=-1"], "training.warmup.epochs",
     "got -1, expected an integer >= 0", None),
    ("negative_learning_rate", "", ["training.fine_tune.learning_rate=-0.001"],
     "training.fine_tune.learning_rate", "got -0.001, expected a number > 0", None),
    ("negative_batch_size", "", ["training.batch_size=-32"], "training.batch_size",
     "got -32, expected an integer >= 1", None),
    ("negative_patience", "", ["training.early_stopping_patience=-1"], "training.early_stopping_patience",
     "expected an integer >= 0", None),
    ("fraction_above_one", "", ["data.eval_fraction=1.5"], "data.eval_fraction",
     "expected a number in [0, 1)", None),
    ("accuracy_percent", "", ["evaluation.min_accuracy=80"], "evaluation.min_accuracy",
     "expected a number in [0, 1]", None),
    ("zero_shards", "", ["data.num_shards=0"], "data.num_shards", "expected an integer >= 1", None),
    ("optimizer", "", ["training.optimizer=adagrad"], "training.optimizer",
     "got 'adagrad', expected one of adam, sgd, rmsprop, adamw", None),
    ("pooling", "", ["model.head.pooling=sum"], "model.head.pooling", "expected one of avg, max", None),
    ("activation", "", ["model.head.activation=rleu"], "model.head.activation", "expected one of elu,", None),
    ("contrast", "", ["model.contrast=bright"], "model.contrast",
     "expected one of none, autocontrast, equalize", None),
    ("task", "task: detection\n", [], "task", "expected one of classification, segmentation", "config.yaml:7"),
    ("evaluation_split", "", ["evaluation.split=train"], "evaluation.split", "expected one of eval, test", None),
    ("warmup_policy", "", ["training.warmup.backbone=half"], "training.warmup.backbone",
     "expected one of frozen, all, freeze_first, train_last, last_block", None),
    ("fine_tune_policy", "", ["training.fine_tune.backbone=top"], "training.fine_tune.backbone",
     "expected one of frozen, all, freeze_first, train_last, last_block", None),
    ("train_last_without_layers", "", ["training.fine_tune.backbone=train_last", "training.fine_tune.layers=0"],
     "training.fine_tune.layers", "expected an integer >= 1 with backbone: train_last", None),
    ("segmentation_output", "", ["task=segmentation", "segmentation.output=linear"], "segmentation.output",
     "expected one of softmax, sigmoid", None),
    ("unknown_backbone", "", ["model.backbone=resnet9000"], "model.backbone",
     "got 'resnet9000', expected one of densenet121, efficientnet_b0, inception_resnet_v2, inception_v3, "
     "mobilenet, mobilenet_v2, resnet50, resnet50v2, vgg16, vgg19, xception", None),
    ("missing_weights", "", ["model.weights=weights/missing.h5"], "model.weights",
     "missing.h5: no such file; expected imagenet, none, a URI", None),
    ("missing_weights_in_file", "model:\n  weights: missing.h5\n", [], "model.weights",
     "missing.h5: no such file; expected imagenet, none, a URI", "config.yaml:8"),
    ("inception_too_small", "", ["model.backbone=inception_v3", "model.image_size=64"], "model.image_size",
     "expected 0 (inception_v3's default, 299 px) or an integer in [75, 299] (inception_v3 needs at least 75 px)",
     None),
    ("xception_too_small", "model:\n  backbone: xception\n  image_size: 70\n", [], "model.image_size",
     "or an integer in [71, 299] (xception needs at least 71 px)", "config.yaml:9"),
    ("unknown_setting", "", ["training.epochz=3"], "training.epochz",
     "unknown setting(s) epochz; known in training: augmentation,", None),
    ("bad_regex", "", ["data.split_group_regex=^(\\d+"], "data.split_group_regex",
     "not a valid regular expression", None),
    ("broken_yaml", "training:\n  batch_size: [16\n", [], "", "not valid YAML", "config.yaml:"),
    # --set of another key of the same section does not take the file's line away
    ("file_error_beside_a_set_key", "training:\n  batch_size: 3.9\n", ["training.optimizer=sgd"],
     "training.batch_size", "got 3.9, expected an integer >= 1", "config.yaml:8"),
]


def _visiontune_run(folder, extra_yaml, sets):
    (folder / "config.yaml").write_text(BASE + extra_yaml)
    args = [sys.executable, "-m", "visiontune.cli", "run", "--config", "config.yaml"]
    for value in sets:
        args += ["--set", value]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=folder)


@pytest.mark.parametrize("extra_yaml, sets, key, allowed, location",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_mistake_is_one_line_and_status_2_before_anything_starts(tmp_path, extra_yaml, sets, key,
                                                                      allowed, location):
    result = _visiontune_run(tmp_path, extra_yaml, sets)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("visiontune run: error: "), line
    message = line[len("visiontune run: error: "):]
    if location:  # from the file: the file and line come first
        assert message.startswith(location), line
    else:  # from --set: the key comes first, and the file is not blamed
        assert message.startswith(f"{key}: "), line
        assert "config.yaml" not in message, line
    assert f"{key}: " in message and allowed in message, line
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"], "something started"


def test_the_base_config_itself_is_valid(tmp_path):
    """The control: every refusal above comes from the mistake added to it."""
    from visiontune import configs

    (tmp_path / "config.yaml").write_text(BASE)
    config = configs.load_config(str(tmp_path / "config.yaml"))
    assert config.pipeline.output_dir == str(tmp_path / "run")
