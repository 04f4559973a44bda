"""TFX's Vertex AI Training Trainer with the ``classes`` input of ``class_aware`` (imported only for Vertex).

Its own module because TFX's Google Cloud extension is slow and heavy to
import, and a local run never needs it.  The class list goes into
``custom_config`` before the training job starts, so the job's executor
receives it with the other properties.
"""

from __future__ import annotations

from tfx.dsl.components.base import executor_spec
from tfx.extensions.google_cloud_ai_platform.trainer import component as cloud_component, executor as cloud_executor
from tfx.types import standard_component_specs

from visiontune.components.class_aware import ClassListInput, custom_config_with_classes, with_class_input


class VertexTrainerExecutor(cloud_executor.GenericExecutor):
    def Do(self, input_dict, output_dict, exec_properties):
        return super().Do(input_dict, output_dict, custom_config_with_classes(input_dict, exec_properties))


class Trainer(cloud_component.Trainer, ClassListInput):
    """The Vertex AI Training Trainer (same arguments) plus ``classes=``: a ``ClassList`` channel."""

    SPEC_CLASS = with_class_input(standard_component_specs.TrainerSpec)
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(VertexTrainerExecutor)

    def __init__(self, *, classes=None, **kwargs):
        self._class_list = classes
        super().__init__(**kwargs)
