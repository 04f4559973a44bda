"""A model that is not blessed is not pushed, and ``visiontune run`` says why.

Both tests run the shared GTSRB pipeline (``first_run`` in conftest.py) again
into its output dir, through the command line with ``--json
--fail-if-not-pushed``:

* the first re-judges the first run's (cached) model against an accuracy floor
  it cannot reach: only the Evaluator and the Pusher run;
* the second trains a deliberately poor model (one step at a negligible
  learning rate) that the regression gate must refuse, with the first model as
  the baseline.

Neither may change the serving folder: the first model stays the only version
and the last blessed model, as the tests after these expect.
"""

from __future__ import annotations

import html
import json
import os
import re

import pytest

from tests.conftest import folder_files, latest_states, run_argv
from visiontune import cli, features
from visiontune.pipeline import local_runner, report

ACCURACY = "sparse_categorical_accuracy"
NOT_PUSHED = 3  # ``run --fail-if-not-pushed``'s exit status


def _run(capsys, gtsrb_slice, *settings):
    """(exit status, the JSON summary, stderr) of ``visiontune run --json --fail-if-not-pushed``."""
    capsys.readouterr()
    code = cli.main(run_argv(gtsrb_slice, *settings) + ["--json", "--fail-if-not-pushed"])
    out, err = capsys.readouterr()
    return code, json.loads(out[out.index("{\n"):]), err  # after Keras's epoch lines, if it trained


def _numbers(pattern, text):
    """The numbers ``pattern``'s groups match in ``text`` (all of it), as floats."""
    match = re.fullmatch(pattern, text)
    assert match, text
    return [float(g) for g in match.groups()]


@pytest.mark.e2e
@pytest.mark.shared
def test_a_model_below_the_accuracy_floor_is_refused_and_the_run_says_why(first_run, gtsrb_slice, capsys):
    config, first = first_run
    accuracy = first.metrics[ACCURACY]
    assert accuracy < 0.999, "the floor below must be out of the first model's reach"
    serving_before = folder_files(config.pipeline.serving_dir)

    code, summary, _ = _run(capsys, gtsrb_slice, "evaluation.min_accuracy=0.999")

    assert code == NOT_PUSHED
    assert not summary["blessed"] and not summary["pushed"] and summary["pushed_dir"] == ""
    assert folder_files(config.pipeline.serving_dir) == serving_before  # nothing new, nothing touched
    # The same model, judged again: a threshold is not a reason to train.
    states = latest_states(local_runner.metadata_path(config))
    assert states["Trainer"] == "CACHED" and states["Evaluator"] == "COMPLETE", states
    assert summary["model_dir"] == first.model_dir
    assert summary["metrics"][ACCURACY] == pytest.approx(accuracy)
    # Why, in words: the metric, its value and the floor it missed.
    assert len(summary["reasons"]) == 1, summary["reasons"]
    value, = _numbers(rf"{ACCURACY} (\S+) is below evaluation\.min_accuracy 0\.999", summary["reasons"][0])
    assert value == pytest.approx(accuracy, abs=1e-4)
    saved = json.load(open(os.path.join(config.pipeline.output_dir, features.RUN_SUMMARY_FILE)))
    assert saved["reasons"] == summary["reasons"] and not saved["pushed"]
    # The run's report was rebuilt for this outcome, and shows the reason.
    page = open(os.path.join(config.pipeline.output_dir, report.REPORT_DIR, report.INDEX_FILE)).read()
    assert "Blessed: <b>no</b>" in page and html.escape(summary["reasons"][0]) in page


@pytest.mark.e2e
@pytest.mark.shared
def test_a_model_worse_than_the_last_blessed_one_is_refused(first_run, gtsrb_slice, capsys):
    config, first = first_run
    serving_before = folder_files(config.pipeline.serving_dir)

    # One training step at a negligible learning rate: the head stays about random.
    code, summary, _ = _run(capsys, gtsrb_slice, "training.warmup.epochs=1", "training.warmup.learning_rate=1e-9",
                            "training.fine_tune.epochs=0", "training.steps_per_epoch=1",
                            "evaluation.min_accuracy=0", "evaluation.max_regression=0.05")

    assert latest_states(local_runner.metadata_path(config))["Trainer"] == "COMPLETE"
    assert summary["model_dir"] != first.model_dir
    # The baseline is the first model, and the candidate is worse by more than allowed ...
    baseline, candidate = summary["baseline_metrics"][ACCURACY], summary["metrics"][ACCURACY]
    assert baseline == pytest.approx(first.metrics[ACCURACY])
    assert candidate < baseline - 0.05, (candidate, baseline)
    # ... so it is refused on the change alone (the floor is 0), and the reason gives both numbers.
    assert code == NOT_PUSHED
    assert not summary["blessed"] and not summary["pushed"]
    assert folder_files(config.pipeline.serving_dir) == serving_before
    assert len(summary["reasons"]) == 1, summary["reasons"]
    numbers = _numbers(rf"{ACCURACY} (\S+) is (\S+) below the last blessed model's (\S+), "
                       r"more than evaluation\.max_regression 0\.05 allows", summary["reasons"][0])
    assert numbers == pytest.approx([candidate, baseline - candidate, baseline], abs=1e-4)


def test_each_kind_of_failed_threshold_is_one_line_with_its_numbers():
    """TFMA's failures as its validator writes them (see components/evaluation.py for the thresholds)."""
    from tensorflow_model_analysis.proto import config_pb2, validation_result_pb2

    from visiontune.pipeline import results

    def failure(value=None, is_diff=False, **threshold):
        f = validation_result_pb2.ValidationFailure()
        f.metric_key.name = ACCURACY
        f.metric_key.is_diff = is_diff
        if value is not None:
            f.metric_value.double_value.value = value
        else:
            f.message = "Metric not found."
        if "lower" in threshold:
            f.metric_threshold.value_threshold.CopyFrom(
                config_pb2.GenericValueThreshold(lower_bound={"value": threshold["lower"]}))
        if "change" in threshold:
            f.metric_threshold.change_threshold.CopyFrom(config_pb2.GenericChangeThreshold(
                direction=config_pb2.MetricDirection.HIGHER_IS_BETTER, absolute={"value": threshold["change"]}))
        return f

    assert results.failure_reason(failure(0.41, lower=0.5), {}) == \
        f"{ACCURACY} 0.4100 is below evaluation.min_accuracy 0.5"
    assert results.failure_reason(failure(-0.125, is_diff=True, change=-0.01), {ACCURACY: 0.875}) == \
        f"{ACCURACY} 0.7500 is 0.1250 below the last blessed model's 0.8750, " \
        "more than evaluation.max_regression 0.01 allows"
    assert results.failure_reason(failure(-0.125, is_diff=True, change=-0.01), {}) == \
        f"{ACCURACY} changed by -0.1250 against the last blessed model, more than evaluation.max_regression " \
        "0.01 allows"
    assert results.failure_reason(failure(None, lower=0.5), {}) == f"{ACCURACY}: Metric not found."


@pytest.mark.parametrize("max_regression, gated", [(0.05, True), (1, False)])
def test_without_a_regression_gate_the_pipeline_evaluates_no_baseline(tmp_path, max_regression, gated):
    """``max_regression`` 1 (``visiontune compare``'s) cannot refuse a model: no Resolver, no baseline
    model, no change threshold, so the Evaluator scores one model and a re-run can reuse it."""
    import tensorflow_model_analysis as tfma
    from google.protobuf import json_format

    from visiontune import configs
    from visiontune.pipeline import pipeline as pipeline_lib

    config = configs.load_config(None, [f"data.source={tmp_path / 'images'}", f"pipeline.output_dir={tmp_path}",
                                        f"evaluation.max_regression={max_regression}"])
    pipeline = pipeline_lib.create_pipeline(config, pipeline_root=str(tmp_path))
    ids = [c.id for c in pipeline.components]
    evaluator = {c.id: c for c in pipeline.components}["Evaluator"]
    assert (pipeline_lib.RESOLVER_ID in ids) == gated, ids
    assert ("baseline_model" in evaluator.inputs) == gated, evaluator.inputs
    eval_config = evaluator.exec_properties["eval_config"]
    if isinstance(eval_config, str):
        eval_config = json_format.Parse(eval_config, tfma.EvalConfig())
    thresholds = [t.threshold for spec in eval_config.metrics_specs for m in spec.metrics
                  for t in m.per_slice_thresholds]
    assert len(thresholds) == 1 and thresholds[0].value_threshold.lower_bound.value == 0.5
    assert thresholds[0].HasField("change_threshold") == gated
    if gated:
        assert thresholds[0].change_threshold.absolute.value == -max_regression
