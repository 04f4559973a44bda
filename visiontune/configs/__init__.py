"""Plain settings for a visiontune run: nested dataclasses loaded from YAML, checked when they load.

The layout follows TF Model Garden's ``official/vision`` configs: one
dataclass per concern (data, model, training, evaluation, pipeline), so that a
fine-tuning choice such as "train only the last 8 layers" is a setting in a
file, never an edit to code.  The modules:

* ``schema``: the dataclasses, each field documented in its class's
  ``Attributes:`` and declaring the values it takes (``vertex``: the
  ``vertex:`` section; ``fields``: the ``setting`` helper);
* ``loading``: ``load_config`` (YAML, ``--set`` overrides, strict types,
  duplicate keys refused), ``from_dict``, ``to_dict``;
* ``validation``: ``validate``, every value against its range or choices and
  the settings that depend on each other;
* ``backbones``: the backbone registry's metadata (names, input sizes), which
  ``visiontune.components.backbones`` completes with the Keras constructors.

A mistake is a ``ConfigError`` of one line naming the key (``FILE:LINE: key:
got ..., expected ...``); the command line prints it and exits with status 2
before any TFX component starts.  Like the rest of the bottom layer, nothing
here imports TensorFlow.
"""

from visiontune.configs import backbones
from visiontune.configs.loading import apply_overrides, deep_merge, from_dict, load_config, read_yaml, to_dict
from visiontune.configs.schema import (
    SEGMENTATION_CLASSES,
    AugmentationConfig,
    Config,
    DataConfig,
    EvaluationConfig,
    HeadConfig,
    ModelConfig,
    PhaseConfig,
    PipelineSettings,
    SegmentationConfig,
    TrainingConfig,
    segmentation_settings,
)
from visiontune.configs.validation import validate
from visiontune.configs.vertex import DataflowConfig, VertexConfig, VertexEndpointConfig, VertexTrainingConfig
from visiontune.errors import ConfigError

__all__ = [
    "SEGMENTATION_CLASSES", "AugmentationConfig", "Config", "ConfigError", "DataConfig", "DataflowConfig",
    "EvaluationConfig", "HeadConfig", "ModelConfig", "PhaseConfig", "PipelineSettings", "SegmentationConfig",
    "TrainingConfig", "VertexConfig", "VertexEndpointConfig", "VertexTrainingConfig", "apply_overrides",
    "backbones", "deep_merge", "from_dict", "load_config", "read_yaml", "segmentation_settings", "to_dict",
    "validate",
]
