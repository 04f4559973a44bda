"""``model.ensemble_size``: members trained one after another, served as one averaging SavedModel.

One real ``trainer.run_fn`` on the shapes data (MobileNetV2-0.35 at 32 px,
1+1 epochs a member), killed as its second member's fine-tuning starts and run
again: the rerun restores the finished member instead of training it, resumes
the second, and exports one SavedModel (and its TFLite files) that averages both.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tests.conftest import SHAPE_CLASSES, trainer_config, trainer_fn_args
from tests.test_resume import _KillAt
from visiontune import features
from visiontune.components import model as model_lib, trainer, transform
from visiontune.pipeline import run_files
from visiontune.serving.tflite import TFLiteModel


@pytest.fixture(scope="module")
def ensemble(shapes_transformed, tmp_path_factory):
    """(fn_args, the rerun's stdout, the killed attempt's member-0 history)."""
    import contextlib
    import io

    tmp = str(tmp_path_factory.mktemp("ensemble"))
    config = trainer_config()
    config.model.ensemble_size = 2
    fn_args = trainer_fn_args(tmp, shapes_transformed, config, SHAPE_CLASSES)
    fit_phases = trainer.fit_phases
    second_state = trainer.member_state_dir(
        os.path.join(tmp, "state", trainer.state_key(fn_args, fn_args.custom_config)), 1)
    first_histories = []

    def killed_in_member_two(model, config, train_ds, eval_ds, state_dir, log_dir, extra_callbacks=()):
        kill = [_KillAt(1)] if state_dir == second_state else []  # member 2's epoch 2 (fine-tuning)
        history = fit_phases(model, config, train_ds, eval_ds, state_dir, log_dir, list(extra_callbacks) + kill)
        first_histories.append(history)
        return history

    trainer.fit_phases = killed_in_member_two
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.run_fn(fn_args)
    finally:
        trainer.fit_phases = fit_phases
    assert not os.path.exists(fn_args.serving_model_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.run_fn(fn_args)
    return fn_args, out.getvalue(), first_histories[0]


def test_a_rerun_restores_finished_members_and_resumes_the_killed_one(ensemble):
    fn_args, stdout, member_0_first = ensemble
    lines = [line for line in stdout.splitlines() if line.startswith(("training ensemble", "resuming"))]
    # Member 1 finished in the killed attempt: restored, not trained again (no epoch runs for it).
    assert lines == ["training ensemble member 1/2 (seed 42)", "training ensemble member 2/2 (seed 43)",
                     "resuming training at epoch 2/2 (phase fine_tune)"]
    history = run_files.training_history(fn_args.model_run_dir)
    assert history["member_histories"][0] == member_0_first == history["history"]
    assert [r["epoch"] for r in history["member_histories"][1]] == [1, 2]
    assert history["epochs_run"] == 4 and history["resumed_after_epochs"] == 3
    assert history["ensemble"] == {"members": 2, "seeds": [42, 43]}
    # Every member's resume state is gone once the ensemble is exported.
    assert os.listdir(fn_args.custom_config["state_root"]) == []


def test_the_export_averages_its_members_through_every_signature(ensemble, shapes_prepared):
    fn_args, _, _ = ensemble
    model_dir = fn_args.serving_model_dir
    with open(os.path.join(model_dir, features.METADATA_DIR, features.MODEL_METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata["ensemble"] == {"members": 2, "seeds": [42, 43]}
    assert metadata["classes"] == SHAPE_CLASSES

    keras_model = tf_keras.models.load_model(model_dir)
    members = model_lib.ensemble_members(keras_model)
    assert [m.name for m in members] == ["member_0", "member_1"]
    # The weights of two models and nothing else: no member's optimizer state rides along.
    saved = tf.train.list_variables(os.path.join(model_dir, "variables", "variables"))
    assert not [name for name, _ in saved if "optimizer" in name.lower()]
    stored = sum(int(np.prod(shape)) for name, shape in saved if "/.ATTRIBUTES/VARIABLE_VALUE" in name)
    # (Beyond the weights: the dropout generators' few state numbers and the save counter.)
    assert keras_model.count_params() <= stored < keras_model.count_params() + 100
    loaded = tf.saved_model.load(model_dir)
    records = [r.numpy() for r in tf.data.TFRecordDataset(
        [os.path.join(shapes_prepared.output_dir, "eval", f) for f in os.listdir(
            os.path.join(shapes_prepared.output_dir, "eval"))])][:8]
    images = [tf.train.Example.FromString(r).features.feature[features.IMAGE_KEY].bytes_list.value[0]
              for r in records]
    served = loaded.signatures[features.SERVING_DEFAULT](image_bytes=tf.constant(images))
    by_examples = loaded.signatures[features.SERVING_EXAMPLES](examples=tf.constant(records))
    probabilities = features.PROBABILITIES_OUTPUT
    np.testing.assert_allclose(by_examples[probabilities].numpy(), served[probabilities].numpy(), atol=1e-6)

    pixels = np.stack([transform.decode_and_resize(tf.constant(i), 32).numpy() for i in images])
    each = [m(pixels, training=False).numpy() for m in members]
    assert not np.allclose(each[0], each[1], atol=1e-3)  # two seeds, two different models
    np.testing.assert_allclose(keras_model(pixels, training=False).numpy(), (each[0] + each[1]) / 2, atol=1e-6)

    # The TFLite files average too: the same top-1 as the SavedModel on the same image bytes.
    info = json.load(open(os.path.join(model_dir, features.METADATA_DIR, features.TFLITE_DIR,
                                       features.TFLITE_METADATA_FILE)))
    assert info["errors"] == {}
    assert info["input"]["inside_the_model"][-1] == "the average of 2 members' probabilities"
    tflite = TFLiteModel(model_dir, "float16").predict_images(images)
    assert list(tflite["probabilities"].argmax(-1)) == list(served["probabilities"].numpy().argmax(-1))

