"""TFMA metrics for segmentation, on TFMA's own per-class pixel confusion matrices.

TFMA 0.47 counts true/false positives and negatives per class over pixels
(``SemanticSegmentationConfusionMatrix``, void left out through
``ignore_ground_truth_id``) but only derives TP and FP counts from them.  These
classes derive what a user compares models by:

* per class (``sub_key.class_id``): ``iou``, ``precision``, ``recall``,
  ``f1_score`` (CDnet's F-measure for the foreground class);
* overall: ``pixel_accuracy`` (correct non-void pixels / non-void pixels) and
  ``mean_iou``.

The Evaluator names them by ``module`` in its ``MetricConfig``; ground truth is
the ``mask_ids`` the ``transform_features`` signature returns and the
prediction is the ``class_ids`` output, both ``[s, s]`` per example.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from tensorflow_model_analysis.metrics import (
    metric_types,
    metric_util,
    semantic_segmentation_confusion_matrix_metrics as ss,
)

Matrix = ss.Matrix


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


class _PerClassMetric(ss.SemanticSegmentationConfusionMatrixMetricBase):
    def __init__(self, class_ids: List[int], ground_truth_key: str, prediction_key: str,
                 decode_ground_truth: bool = False, decode_prediction: bool = False,
                 ignore_ground_truth_id: Optional[int] = None, name: Optional[str] = None):
        super().__init__(class_ids=class_ids, ground_truth_key=ground_truth_key,
                         prediction_key=prediction_key, decode_ground_truth=decode_ground_truth,
                         decode_prediction=decode_prediction,
                         ignore_ground_truth_id=ignore_ground_truth_id, name=name)


class SegmentationIoU(_PerClassMetric):
    def _default_name(self) -> str:
        return "iou"

    def _metric_value(self, m: Matrix) -> float:
        return _ratio(m.tp, m.tp + m.fp + m.fn)


class SegmentationPrecision(_PerClassMetric):
    def _default_name(self) -> str:
        return "precision"

    def _metric_value(self, m: Matrix) -> float:
        return _ratio(m.tp, m.tp + m.fp)


class SegmentationRecall(_PerClassMetric):
    def _default_name(self) -> str:
        return "recall"

    def _metric_value(self, m: Matrix) -> float:
        return _ratio(m.tp, m.tp + m.fn)


class SegmentationF1(_PerClassMetric):
    def _default_name(self) -> str:
        return "f1_score"

    def _metric_value(self, m: Matrix) -> float:
        return _ratio(2 * m.tp, 2 * m.tp + m.fp + m.fn)


class _OverallMetric(metric_types.Metric):
    """A single number from the confusion matrices of all classes."""

    def __init__(self, class_ids: List[int], ground_truth_key: str, prediction_key: str,
                 decode_ground_truth: bool = False, decode_prediction: bool = False,
                 ignore_ground_truth_id: Optional[int] = None, name: Optional[str] = None):
        super().__init__(metric_util.merge_per_key_computations(self._computations),
                         name=name, class_ids=class_ids, ground_truth_key=ground_truth_key,
                         prediction_key=prediction_key, decode_ground_truth=decode_ground_truth,
                         decode_prediction=decode_prediction,
                         ignore_ground_truth_id=ignore_ground_truth_id)

    def _value(self, matrices: List[Matrix]) -> float:
        raise NotImplementedError

    def _computations(self, class_ids: List[int], ground_truth_key: str, prediction_key: str,
                      decode_ground_truth: bool = False, decode_prediction: bool = False,
                      ignore_ground_truth_id: Optional[int] = None, name: Optional[str] = None,
                      model_name: str = "", output_name: str = "", example_weighted: bool = False,
                      **kwargs: Any) -> metric_types.MetricComputations:
        args = dict(class_ids=class_ids, ground_truth_key=ground_truth_key,
                    prediction_key=prediction_key, decode_ground_truth=decode_ground_truth,
                    decode_prediction=decode_prediction,
                    ignore_ground_truth_id=ignore_ground_truth_id)
        matrix = ss.SemanticSegmentationConfusionMatrix(
            name=metric_util.generate_private_name_from_arguments(name=name, **args), **args)
        computations = matrix.computations(model_names=[model_name], output_names=[output_name],
                                           example_weighted=example_weighted)
        matrix_key = computations[-1].keys[-1]
        key = metric_types.MetricKey(name=name, model_name=model_name, output_name=output_name)

        def result(metrics: Dict[metric_types.MetricKey, Any]) -> Dict[metric_types.MetricKey, float]:
            matrices = [metrics[matrix_key._replace(sub_key=metric_types.SubKey(class_id=c))]
                        for c in class_ids]
            return {key: self._value(matrices)}

        computations.append(metric_types.DerivedMetricComputation(keys=[key], result=result))
        return computations


class PixelAccuracy(_OverallMetric):
    def _default_name(self) -> str:
        return "pixel_accuracy"

    def _value(self, matrices: List[Matrix]) -> float:
        # Every class's matrix counts each non-void pixel once.
        first = matrices[0]
        return _ratio(sum(m.tp for m in matrices), first.tp + first.fp + first.fn + first.tn)


class MeanIoU(_OverallMetric):
    def _default_name(self) -> str:
        return "mean_iou"

    def _value(self, matrices: List[Matrix]) -> float:
        return sum(_ratio(m.tp, m.tp + m.fp + m.fn) for m in matrices) / len(matrices)


for _cls in (SegmentationIoU, SegmentationPrecision, SegmentationRecall, SegmentationF1,
             PixelAccuracy, MeanIoU):
    metric_types.register_metric(_cls)
