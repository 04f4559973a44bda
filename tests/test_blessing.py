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
