"""End to end: the real pipeline (LocalDagRunner, Beam, TFMA) on a slice of GTSRB.

Needs ../shared (GTSRB and the MobileNetV2-0.35 weights); skipped with the
reason when it is absent.  CI has it, so CI runs this.  A second model judged
against the first (the regression gate) is in test_blessing.py.
"""

import glob
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import GTSRB, GTSRB_CLASSES, latest_states
from visiontune.pipeline import local_runner

pytestmark = [pytest.mark.e2e, pytest.mark.shared]
CLASSES = GTSRB_CLASSES


def _png(path):
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")  # PPM: TF cannot decode it
    return buf.getvalue()


def _executions_by_state(config):
    return latest_states(local_runner.metadata_path(config))


def test_first_run_is_blessed_and_pushed_in_tf_serving_layout(first_run, first_run_snapshot):
    config, summary = first_run
    assert summary.blessed and summary.pushed, summary.message()
    versions = glob.glob(os.path.join(config.pipeline.serving_dir, "signs", "*"))
    assert [os.path.basename(v).isdigit() for v in versions] == [True]
    assert summary.pushed_dir == versions[0]
    assert os.path.exists(os.path.join(versions[0], "saved_model.pb"))
    assert f"pushed: {versions[0]}" in summary.message()
    # Per-class figures carry the class names, in classes.txt order.
    assert [c.name for c in summary.per_class] == CLASSES
    assert summary.metrics["example_count"] == 120
    # The confusion matrix agrees with TFMA's per-class recall.
    matrix = np.array(summary.confusion_matrix)
    assert matrix.sum() == 120 and summary.classes == CLASSES
    for i, row in enumerate(summary.per_class):
        if matrix[i].sum():
            assert row.recall == pytest.approx(matrix[i, i] / matrix[i].sum(), abs=1e-6)
    saved = json.load(open(os.path.join(first_run_snapshot, "run_summary.json")))  # as the run left it
    assert saved["pushed_dir"] == summary.pushed_dir


def test_pushed_model_answers_both_signatures_above_chance(first_run, gtsrb_slice):
    config, summary = first_run
    _, _, _, rows = gtsrb_slice
    model = tf.saved_model.load(summary.pushed_dir)
    images = [_png(os.path.join(GTSRB, "test", "Images", r["Filename"])) for r in rows]
    out = model.signatures["serving_default"](image_bytes=tf.constant(images))
    predicted = [c.decode() for c in out["classes"].numpy()]
    accuracy = np.mean([p == r["ClassId"] for p, r in zip(predicted, rows)])
    assert accuracy > 2 / len(CLASSES), accuracy
    # The pipeline's own evaluation of the same images agrees with the client's view.
    assert accuracy == pytest.approx(summary.metrics["sparse_categorical_accuracy"], abs=1e-6)

    example = tf.train.Example()
    example.features.feature["image"].bytes_list.value.append(images[0])
    by_example = model.signatures["serving_examples"](examples=tf.constant([example.SerializeToString()]))
    np.testing.assert_allclose(by_example["probabilities"].numpy()[0], out["probabilities"].numpy()[0],
                               rtol=1e-5, atol=1e-6)


def test_rerun_with_unchanged_inputs_reuses_cached_outputs(first_run, gtsrb_slice):
    config, first = first_run
    summary = local_runner.run(config)
    states = _executions_by_state(config)
    for component in ("ImageExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator",
                      "Transform", "Trainer"):
        assert states[component] == "CACHED", (component, states)
    # The Evaluator runs again (its baseline is now the first model, i.e. itself),
    # but the identical model is not pushed as a second version.
    assert summary.pushed and summary.pushed_dir == first.pushed_dir
    assert len(glob.glob(os.path.join(config.pipeline.serving_dir, "signs", "*"))) == 1
    # The summary names the model this run used (cached), not the newest one trained
    # (test_blessing.py trains a worse one into this folder before this test).
    assert summary.model_dir == first.model_dir
