"""TFMA settings for the Evaluator: what is measured and what blesses a model.

Overall accuracy and top-k come from Keras metrics; per-class precision,
recall and F1 come from binarizing each class id with ``top_k: 1``, so a class
counts as predicted exactly when it is the arg-max (the default 0.5 threshold on
a one-vs-rest probability would measure something no user sees).

TFMA applies a ``threshold`` to every slice; blessing is a statement about the
model as a whole, so it is set with ``per_slice_thresholds`` on the overall
slice only.  The change threshold only takes effect when a baseline (the last
blessed model) exists: the first model is judged on the floor alone.

``evaluation.max_regression`` 1 (``visiontune compare`` sets it) is no gate at
all: an accuracy in [0, 1] cannot drop by more.  Such a run has no change
threshold and no baseline (``has_regression_gate``): TFMA would score the last
blessed model on every run only to compare it with a bound nothing can cross.
"""

from __future__ import annotations

import copy
import json
from typing import Optional

import tensorflow_model_analysis as tfma

from visiontune import configs, features

ACCURACY = "sparse_categorical_accuracy"
TOP_K_ACCURACY = "top_k_accuracy"


def has_regression_gate(evaluation: configs.EvaluationConfig) -> bool:
    """Whether ``max_regression`` can refuse a model: below 1, so the pipeline needs the last blessed model."""
    return evaluation.max_regression < 1


def blessing_threshold(evaluation: configs.EvaluationConfig) -> tfma.MetricThreshold:
    """The floor ``min_accuracy`` and, when there is a gate, the change threshold ``max_regression``."""
    threshold = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": evaluation.min_accuracy}))
    if has_regression_gate(evaluation):
        threshold.change_threshold.CopyFrom(tfma.GenericChangeThreshold(
            direction=tfma.MetricDirection.HIGHER_IS_BETTER,
            absolute={"value": -evaluation.max_regression}))
    return threshold


def create_eval_config(evaluation: configs.EvaluationConfig, num_classes: Optional[int]) -> tfma.EvalConfig:
    """``num_classes`` None: not known yet (images in); ``fit_to_classes`` completes the config at run time."""
    overall = [tfma.SlicingSpec()]
    blessing = blessing_threshold(evaluation)
    top_k = max(1, evaluation.top_k if num_classes is None else min(evaluation.top_k, num_classes))
    per_class = {"top_k": 1}
    config = tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(
            signature_name=features.SERVING_EXAMPLES,
            # A plain SavedModel to TFMA: otherwise it loads the model once just to
            # detect that it is Keras, then again as Keras (half the Evaluator's time).
            model_type=tfma.constants.TF_GENERIC,
            preprocessing_function_names=[features.TRANSFORM_FEATURES],
            label_key=features.LABEL_ID_KEY,
            prediction_key=features.PROBABILITIES_OUTPUT)],
        slicing_specs=overall,
        metrics_specs=[
            tfma.MetricsSpec(metrics=[
                tfma.MetricConfig(class_name="ExampleCount"),
                tfma.MetricConfig(
                    class_name="SparseCategoricalAccuracy",
                    config=json.dumps({"name": ACCURACY}),
                    per_slice_thresholds=[tfma.PerSliceMetricThreshold(
                        slicing_specs=overall, threshold=blessing)]),
                tfma.MetricConfig(class_name="SparseTopKCategoricalAccuracy",
                                  config=json.dumps({"k": top_k, "name": TOP_K_ACCURACY})),
                tfma.MetricConfig(class_name="MultiClassConfusionMatrixPlot"),
            ]),
            tfma.MetricsSpec(
                binarize=tfma.BinarizationOptions(class_ids={"values": list(range(num_classes or 0))}),
                metrics=[tfma.MetricConfig(class_name=name, config=json.dumps(per_class))
                         for name in ("Precision", "Recall", "F1Score")]),
        ])
    return config


def fit_to_classes(config: tfma.EvalConfig, num_classes: int) -> tfma.EvalConfig:
    """``config`` with one binarized class id per class and top-k at most ``num_classes``.

    What ``create_eval_config`` would have made knowing ``num_classes``: the
    class list of an image dataset is read by the Evaluator at run time.
    """
    config = copy.deepcopy(config)
    for spec in config.metrics_specs:
        if spec.HasField("binarize"):
            spec.binarize.class_ids.values[:] = range(num_classes)
        for metric in spec.metrics:
            if metric.class_name == "SparseTopKCategoricalAccuracy":
                settings = json.loads(metric.config)
                settings["k"] = max(1, min(settings["k"], num_classes))
                metric.config = json.dumps(settings)
    return config


SEGMENTATION_METRICS_MODULE = "visiontune.components.segmentation_metrics"


def create_segmentation_eval_config(evaluation: configs.EvaluationConfig,
                                    num_classes: int) -> tfma.EvalConfig:
    """Pixel accuracy, mean IoU and per-class IoU/precision/recall/F1, void pixels excluded.

    Blessing is on pixel accuracy: the floor is ``evaluation.min_accuracy`` and
    the change threshold ``evaluation.max_regression`` (if any), as for classification.
    No ``label_key``: the ground truth is the transformed ``mask_ids`` (found by
    the metrics themselves), not a per-example label.
    """
    overall = [tfma.SlicingSpec()]
    args = json.dumps({"class_ids": list(range(num_classes)),
                       "ground_truth_key": features.MASK_IDS_KEY,
                       "prediction_key": features.CLASS_IDS_OUTPUT,
                       "ignore_ground_truth_id": features.VOID_ID})
    blessing = blessing_threshold(evaluation)

    def metric(name, **extra):
        return tfma.MetricConfig(class_name=name, module=SEGMENTATION_METRICS_MODULE, config=args, **extra)

    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(
            signature_name=features.SERVING_EXAMPLES,
            model_type=tfma.constants.TF_GENERIC,
            preprocessing_function_names=[features.TRANSFORM_FEATURES])],
        slicing_specs=overall,
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="ExampleCount"),
            metric("PixelAccuracy", per_slice_thresholds=[tfma.PerSliceMetricThreshold(
                slicing_specs=overall, threshold=blessing)]),
            metric("MeanIoU"),
            metric("SegmentationIoU"),
            metric("SegmentationPrecision"),
            metric("SegmentationRecall"),
            metric("SegmentationF1"),
        ])])
