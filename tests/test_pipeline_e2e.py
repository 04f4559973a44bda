"""End to end: the real pipeline (LocalDagRunner, Beam, TFMA) on a slice of GTSRB.

Needs ../shared (GTSRB and the MobileNetV2-0.35 weights); skipped with the
reason when it is absent.  CI has it, so CI runs this.
"""

import csv
import glob
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import configs, local_runner
from tests.conftest import GTSRB, MOBILENET_V2_035, require_shared

pytestmark = pytest.mark.e2e
CLASSES = ["1", "2", "12", "13", "14", "38"]  # ids as GTSRB writes them; "12" after "2"


@pytest.fixture(scope="module")
def gtsrb_slice(tmp_path_factory):
    """Six GTSRB classes (all 40 training images each) and their official test images."""
    require_shared(GTSRB)
    require_shared(MOBILENET_V2_035)
    root = tmp_path_factory.mktemp("gtsrb")
    train = root / "train"
    train.mkdir()
    for cid in CLASSES:
        os.symlink(os.path.join(GTSRB, "train", f"{int(cid):05d}"), train / f"{int(cid):05d}")
    with open(os.path.join(GTSRB, "test", "GT-final_test.csv")) as f:
        rows = [r for r in csv.DictReader(f, delimiter=";") if r["ClassId"] in CLASSES][:120]
    test_csv = root / "test.csv"
    with open(test_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
    return root, str(train), str(test_csv), rows


def _config(root, train, test_csv, **overrides):
    base = [
        f"data.source={train}", "data.labels_csv=*/GT-*.csv",
        f"data.test_source={os.path.join(GTSRB, 'test', 'Images')}", f"data.test_labels_csv={test_csv}",
        f"data.prepared_dir={root / 'prepared'}", "data.num_shards=2", "data.workers=1",
        "model.backbone=mobilenet_v2", "model.alpha=0.35", f"model.weights={MOBILENET_V2_035}",
        "model.image_size=48", "model.head.dense_units=[32]", "model.head.dropout=0.1",
        "training.batch_size=32", "training.warmup.epochs=3", "training.warmup.learning_rate=0.003",
        "training.fine_tune.epochs=3", "training.fine_tune.learning_rate=0.0005",
        "training.fine_tune.backbone=train_last", "training.fine_tune.layers=20",
        "training.early_stopping_patience=0",
        "evaluation.split=test", "evaluation.min_accuracy=0.4", "evaluation.max_regression=0.5",
        f"pipeline.output_dir={root / 'run'}", f"pipeline.serving_dir={root / 'serving'}",
        "pipeline.model_name=signs", "pipeline.name=gtsrb-e2e",
    ]
    return configs.load_config(None, base + [f"{k}={v}" for k, v in overrides.items()])


def _png(path):
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")  # PPM: TF cannot decode it
    return buf.getvalue()


def _executions_by_state(config):
    from ml_metadata.proto import metadata_store_pb2
    from pipeline import results

    store = results._store(local_runner.metadata_path(config))
    by_type = {t.id: t.name for t in store.get_execution_types()}
    latest = {}
    for e in store.get_executions():
        latest[by_type[e.type_id].rsplit(".", 1)[-1]] = metadata_store_pb2.Execution.State.Name(e.last_known_state)
    return latest


@pytest.fixture(scope="module")
def first_run(gtsrb_slice):
    root, train, test_csv, rows = gtsrb_slice
    config = _config(root, train, test_csv)
    return config, local_runner.run(config)


def test_first_run_is_blessed_and_pushed_in_tf_serving_layout(first_run, gtsrb_slice):
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
    saved = json.load(open(os.path.join(config.pipeline.output_dir, "run_summary.json")))
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
    for component in ("ImportExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator",
                      "Transform", "Trainer"):
        assert states[component] == "CACHED", (component, states)
    # The Evaluator runs again (its baseline is now the first model, i.e. itself),
    # but the identical model is not pushed as a second version.
    assert summary.pushed and summary.pushed_dir == first.pushed_dir
    assert len(glob.glob(os.path.join(config.pipeline.serving_dir, "signs", "*"))) == 1


def test_second_model_is_judged_against_the_first_as_baseline(first_run, gtsrb_slice):
    root, train, test_csv, _ = gtsrb_slice
    config = _config(root, train, test_csv, **{"training.seed": 7})
    first_dir = first_run[1].pushed_dir
    summary = local_runner.run(config)
    assert _executions_by_state(config)["Trainer"] == "COMPLETE"
    assert summary.baseline_metrics["sparse_categorical_accuracy"] == pytest.approx(
        first_run[1].metrics["sparse_categorical_accuracy"])
    if summary.pushed:
        assert summary.pushed_dir != first_dir
        assert len(glob.glob(os.path.join(config.pipeline.serving_dir, "signs", "*"))) == 2
