"""Transform, Trainer and Evaluator that read the class list from ingest's artifact at run time.

With images as the pipeline's input (``ImageExampleGen``), the classes are
known only once ingest has listed the sources, after the pipeline was
compiled.  These are TFX's own components with one more, optional input,
``classes`` (an ``ingest_artifacts.ClassList``); their executors read it
before doing what TFX's do:

* Transform and Trainer: the list goes into ``custom_config["classes"]``
  (the label lookup, the model's head, the exported class names);
* Evaluator: the per-class metrics get one class id per class, and top-k is
  capped at the number of classes (``evaluation.fit_to_classes``).

The class list is an input artifact, so it is part of each component's cache
key: a changed class list re-runs them, an unchanged one is a cache hit.
Without ``classes`` they are exactly TFX's components (the TFRecords input,
with the classes given at compile time).
"""

from __future__ import annotations

from typing import Any, Dict, List

import tensorflow_model_analysis as tfma
from tfx.components.evaluator import component as evaluator_component, executor as evaluator_executor
from tfx.components.trainer import component as trainer_component, executor as trainer_executor
from tfx.components.transform import component as transform_component, executor as transform_executor
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import component_spec, standard_component_specs
from tfx.utils import json_utils, proto_utils

from visiontune.components import evaluation, ingest_artifacts

CLASSES_KEY = "classes"
_CUSTOM_CONFIG = standard_component_specs.CUSTOM_CONFIG_KEY


def with_class_input(spec_class: type) -> type:
    inputs = dict(spec_class.INPUTS)
    inputs[CLASSES_KEY] = component_spec.ChannelParameter(type=ingest_artifacts.ClassList, optional=True)
    return type(spec_class.__name__, (spec_class,), {"INPUTS": inputs, "__module__": __name__})


class ClassListInput(base_component.BaseComponent):
    """Placed between a TFX component and ``BaseComponent`` in the MRO.

    TFX's component ``__init__`` builds its own spec; this turns that spec into
    the subclass's (the same values plus the ``classes`` channel) before
    ``BaseComponent`` validates it.
    """

    _class_list = None

    def __init__(self, spec, *args, **kwargs):
        values = {**spec.exec_properties, **spec.inputs, **spec.outputs, CLASSES_KEY: self._class_list}
        super().__init__(type(self).SPEC_CLASS(**values), *args, **kwargs)


def custom_config_with_classes(input_dict: Dict[str, List[Any]], exec_properties: Dict[str, Any]
                                ) -> Dict[str, Any]:
    if not input_dict.get(CLASSES_KEY):
        return exec_properties
    custom = json_utils.loads(exec_properties.get(_CUSTOM_CONFIG) or "null") or {}
    custom["classes"] = ingest_artifacts.read_classes(input_dict[CLASSES_KEY])
    return {**exec_properties, _CUSTOM_CONFIG: json_utils.dumps(custom)}


class TransformExecutor(transform_executor.Executor):
    def Do(self, input_dict, output_dict, exec_properties):
        super().Do(input_dict, output_dict, custom_config_with_classes(input_dict, exec_properties))


class TrainerExecutor(trainer_executor.GenericExecutor):
    def Do(self, input_dict, output_dict, exec_properties):
        super().Do(input_dict, output_dict, custom_config_with_classes(input_dict, exec_properties))


class EvaluatorExecutor(evaluator_executor.Executor):
    def Do(self, input_dict, output_dict, exec_properties):
        key = standard_component_specs.EVAL_CONFIG_KEY
        if input_dict.get(CLASSES_KEY) and exec_properties.get(key):
            config = proto_utils.json_to_proto(exec_properties[key], tfma.EvalConfig())
            classes = ingest_artifacts.read_classes(input_dict[CLASSES_KEY])
            config = evaluation.fit_to_classes(config, len(classes))
            exec_properties = {**exec_properties, key: proto_utils.proto_to_json(config)}
        super().Do(input_dict, output_dict, exec_properties)


class Transform(transform_component.Transform, ClassListInput):
    """TFX's Transform (same arguments) plus ``classes=``: a ``ClassList`` channel."""

    SPEC_CLASS = with_class_input(standard_component_specs.TransformSpec)
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(TransformExecutor)

    def __init__(self, *, classes=None, **kwargs):
        self._class_list = classes
        super().__init__(**kwargs)


class Trainer(trainer_component.Trainer, ClassListInput):
    """TFX's Trainer (same arguments) plus ``classes=``: a ``ClassList`` channel."""

    SPEC_CLASS = with_class_input(standard_component_specs.TrainerSpec)
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(TrainerExecutor)

    def __init__(self, *, classes=None, **kwargs):
        self._class_list = classes
        super().__init__(**kwargs)


class Evaluator(evaluator_component.Evaluator, ClassListInput):
    """TFX's Evaluator (same arguments) plus ``classes=``: a ``ClassList`` channel."""

    SPEC_CLASS = with_class_input(standard_component_specs.EvaluatorSpec)
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(EvaluatorExecutor)

    def __init__(self, *, classes=None, **kwargs):
        self._class_list = classes
        super().__init__(**kwargs)

