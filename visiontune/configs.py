"""Plain settings for a visiontune run: nested dataclasses loaded from YAML.

The layout follows TF Model Garden's ``official/vision`` configs: one
dataclass per concern (data, model, training, evaluation, pipeline), so that a
fine-tuning choice such as "train only the last 8 layers" is a setting in a
file, never an edit to code.  ``load_config`` reads a YAML file and applies
``section.key=value`` overrides from the command line on top of it (timm's
``train.py`` habit: the file is the baseline, flags win).

Relative paths in a YAML file are resolved against the file's own folder, so a
config in ``configs/`` can say ``../../shared/datasets/gtsrb`` and work from any
working directory.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, List, Optional, Sequence

import yaml

from visiontune.errors import ConfigError  # noqa: F401  (re-exported: configs.ConfigError)


@dataclasses.dataclass
class DataConfig:
    """Where the images are and how ``visiontune prepare`` turns them into TFRecords."""

    # Class-per-folder tree, or the folder that ``labels_csv`` names files relative to.
    source: str = ""
    # CSV (or glob of CSVs, relative to ``source``) giving each image's label.
    # GTSRB: ``*/GT-*.csv`` for train, ``GT-final_test.csv`` for test.  Empty: folder tree.
    labels_csv: str = ""
    csv_delimiter: str = ";"
    filename_column: str = "Filename"
    label_column: str = "ClassId"
    # Optional separate labelled test set, in the same two layouts.
    test_source: str = ""
    test_labels_csv: str = ""
    # Fraction of ``source`` that goes to the eval split, chosen by a hash of the
    # file's relative path: adding files never moves existing ones.
    eval_fraction: float = 0.3
    # Split by a group instead of by file: a regex over the relative path whose
    # first group names the group, e.g. GTSRB's tracks "^(\d+/\d+)_" for
    # 00007/00012_00029.ppm.  Frames of one track then stay on one side.
    split_group_regex: str = ""
    # Output of ``visiontune prepare`` and input of the pipeline's ExampleGen.
    prepared_dir: str = ""
    num_shards: int = 4
    # Files above these limits are rejected (listed in rejects.csv), not read.
    max_file_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024
    # Worker processes for ingest; 0 = all cores.
    workers: int = 0
    # Ordered class names.  Empty: discovered and sorted naturally ("2" before "10").
    classes: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class HeadConfig:
    """The classifier put on top of the backbone (the GTSRB tutorial's head by default)."""

    pooling: str = "avg"  # avg | max
    dense_units: List[int] = dataclasses.field(default_factory=lambda: [128])
    dropout: float = 0.5
    activation: str = "relu"


@dataclasses.dataclass
class AugmentationConfig:
    """Random transforms applied to training images only.

    Flips are off by default: a mirrored "keep left" sign is a "keep right" sign.
    """

    horizontal_flip: bool = False
    vertical_flip: bool = False
    rotation: float = 0.0  # fraction of a full turn, as Keras' RandomRotation
    zoom: float = 0.0  # +- fraction
    translation: float = 0.0  # +- fraction of height/width
    brightness: float = 0.0  # +- fraction of the value range
    contrast: float = 0.0  # +- factor
    # Shrink images to a random side in [downscale_min_size, downscale_max_size]
    # px (max 0: the input size) and scale them back up (min 0 = off): teaches
    # the blur of small, far-away photos.
    downscale_min_size: int = 0
    downscale_max_size: int = 0
    downscale_probability: float = 0.5


@dataclasses.dataclass
class ModelConfig:
    """Backbone, input size and head."""

    backbone: str = "mobilenet_v2"
    # imagenet | none | a path to an .h5 weights file (no top)
    weights: str = "imagenet"
    # Width multiplier for MobileNet/MobileNetV2; ignored by other backbones.
    alpha: float = 1.0
    # Square input side in pixels (32-299); 0 = the backbone's default.
    image_size: int = 0
    # Per-image contrast normalisation before the backbone, inside the model so
    # serving does it too: none | autocontrast (stretch the range to 0-255) |
    # equalize (histogram equalisation).  Helps with very dark or washed-out
    # photos such as GTSRB's.
    contrast: str = "none"
    # Inference only: the model looks at this central fraction of the image,
    # scaled back to the input size (TF Model Garden's ``center_crop_fraction``;
    # 0.875 is ImageNet's standard).  Training sees whole images with random
    # zoom and shifts, so objects look larger to it than in a whole test photo
    # (FixRes, Touvron et al. 2019); the crop evens that out.  1.0: no crop.
    center_crop_fraction: float = 1.0
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)


@dataclasses.dataclass
class PhaseConfig:
    """One ``model.fit`` phase of fine-tuning."""

    epochs: int = 0
    learning_rate: float = 1e-3
    # Which backbone layers train in this phase:
    #   frozen           - none (head warm-up)
    #   all              - every layer
    #   freeze_first     - all but the first ``layers`` layers
    #   train_last       - only the last ``layers`` layers (the tutorial's "last 8")
    #   last_block       - the backbone's last block (VGG16: block5_*) and what follows it
    # BatchNorm layers never train and always run in inference mode.
    backbone: str = "frozen"
    layers: int = 0


@dataclasses.dataclass
class TrainingConfig:
    """Optimizer, schedule and the two fine-tuning phases."""

    batch_size: int = 32
    optimizer: str = "adam"  # adam | sgd | rmsprop | adamw
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    warmup: PhaseConfig = dataclasses.field(
        default_factory=lambda: PhaseConfig(epochs=5, learning_rate=1e-3, backbone="frozen"))
    fine_tune: PhaseConfig = dataclasses.field(
        default_factory=lambda: PhaseConfig(epochs=10, learning_rate=1e-4, backbone="train_last", layers=8))
    augmentation: AugmentationConfig = dataclasses.field(default_factory=AugmentationConfig)
    # Callbacks.  0 disables the callback.
    early_stopping_patience: int = 5
    reduce_lr_patience: int = 3
    reduce_lr_factor: float = 0.5
    # Cap on steps per epoch (0 = whole split); useful for smoke tests.
    steps_per_epoch: int = 0
    # A killed Trainer resumes from its last backup; back up at the end of an
    # epoch once this many seconds have passed since the last one (0: every epoch).
    backup_every_seconds: float = 30.0
    seed: int = 42
    # Mixed precision on GPU (float32 output layer); ignored on CPU/TPU.
    mixed_precision: bool = True
    # grpc://... or a TPU name: use TPUStrategy.  Empty: GPUs, else CPU.
    tpu: str = ""


@dataclasses.dataclass
class EvaluationConfig:
    """What the Evaluator computes and what it takes to bless a model."""

    # Split the Evaluator scores (``eval``; ``test`` when a test set was prepared).
    split: str = "eval"
    top_k: int = 3
    # Blessing: overall accuracy at least this, and no worse than the last
    # blessed model by more than ``max_regression`` (absolute).
    min_accuracy: float = 0.5
    max_regression: float = 0.01
    batch_size: int = 64


@dataclasses.dataclass
class PipelineSettings:
    """Names and folders of a run."""

    name: str = "visiontune"
    output_dir: str = "outputs/run"
    # Pusher target: SERVING_DIR/MODEL_NAME/VERSION/
    serving_dir: str = "outputs/serving"
    model_name: str = "visiontune"
    enable_cache: bool = True
    beam_workers: int = 1


@dataclasses.dataclass
class DataflowConfig:
    """Beam on Dataflow for ExampleGen, StatisticsGen, Transform and Evaluator on Vertex AI."""

    # false: those components run Beam's DirectRunner inside their own container.
    enabled: bool = True
    machine_type: str = "n1-standard-4"
    max_workers: int = 4
    disk_size_gb: int = 0  # 0: Dataflow's default
    # Empty: VERTEX.root/dataflow/tmp and VERTEX.root/dataflow/staging.
    temp_location: str = ""
    staging_location: str = ""
    # Worker container: the TFX libraries the workers run must match the launcher's.
    # Empty: vertex.image (the Dockerfile keeps Beam's boot entrypoint for this).
    sdk_container_image: str = ""
    # Extra ``--flag=value`` Beam options, e.g. ["--subnetwork=...", "--no_use_public_ips"].
    extra_args: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class VertexTrainingConfig:
    """The Trainer's Vertex AI Training job (one worker pool)."""

    machine_type: str = "n1-standard-8"
    # NVIDIA_TESLA_T4 | NVIDIA_TESLA_V100 | NVIDIA_TESLA_A100 | NVIDIA_L4 | ...
    # or a TPU: TPU_V2 | TPU_V3 (machine_type cloud-tpu, accelerator_count 8), ...
    # Empty: CPU only.
    accelerator_type: str = ""
    accelerator_count: int = 0
    # TPU slice topology for TPU VM machine types (e.g. 2x2 for ct5lp-hightpu-4t).
    tpu_topology: str = ""
    # What ``training.tpu`` becomes when the accelerator is a TPU, so that
    # ``components.strategy`` builds a TPUStrategy there ("local": resolve the
    # TPU attached to the training VM).
    tpu: str = "local"
    replica_count: int = 1
    boot_disk_size_gb: int = 0  # 0: Vertex's default (100 GB)


@dataclasses.dataclass
class VertexEndpointConfig:
    """Optional deployment of a blessed model to a Vertex AI Endpoint."""

    # Endpoint display name; empty: push to serving_dir only.
    name: str = ""
    machine_type: str = "n1-standard-4"
    min_replica_count: int = 1
    max_replica_count: int = 1
    traffic_percentage: int = 100
    # Prebuilt TF serving container of Vertex AI Prediction.
    serving_image: str = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"


@dataclasses.dataclass
class VertexConfig:
    """Where and how the pipeline runs on Vertex AI Pipelines (``visiontune compile --target vertex``).

    Only read by the Vertex compile; a local run ignores this section.
    """

    project: str = ""
    region: str = "us-central1"
    # gs://BUCKET/PREFIX: the default for every path below.
    root: str = ""
    pipeline_root: str = ""  # empty: ROOT/pipeline_root
    prepared_dir: str = ""   # empty: ROOT/prepared (upload ``visiontune prepare``'s output there)
    serving_dir: str = ""    # empty: ROOT/serving
    # The image built from the repository's Dockerfile, e.g.
    # us-central1-docker.pkg.dev/PROJECT/visiontune/visiontune:0.1.0
    image: str = ""
    # model.weights on Vertex: imagenet | none | gs://.../weights.h5 (empty: model.weights,
    # which must then not be a local file).
    weights: str = ""
    # Runs the pipeline, the Dataflow workers and the training job.  Empty: the default.
    service_account: str = ""
    dataflow: DataflowConfig = dataclasses.field(default_factory=DataflowConfig)
    training: VertexTrainingConfig = dataclasses.field(default_factory=VertexTrainingConfig)
    endpoint: VertexEndpointConfig = dataclasses.field(default_factory=VertexEndpointConfig)


@dataclasses.dataclass
class SegmentationConfig:
    """``task: segmentation``: image/mask pairs, how mask values become classes, the decoder.

    Class names are ``data.classes`` (default ``background, foreground``); class
    ``i`` is every mask pixel whose value is in ``class_values[i]``.  Pixels with a
    value in ``void_values`` (or in no list) are void: left out of the loss and
    of every metric.  The defaults are CDnet2014's: 0 background, 255
    foreground; 50 shadow, 85 outside the region of interest, 170 unknown motion.
    """

    # Images in SOURCE/image_dir, masks in SOURCE/mask_dir (both relative to
    # data.source, and to data.test_source for the test set).
    image_dir: str = "x"
    mask_dir: str = "y"
    # The mask of an image: mask_regex is matched against the image's file name
    # and mask_template is the expansion (\\1 or \\g<name> for groups), e.g.
    # in000685.jpg -> gt000685.png.
    mask_regex: str = r"^in(\d+)\.\w+$"
    mask_template: str = r"gt\1.png"
    class_values: List[List[int]] = dataclasses.field(default_factory=lambda: [[0], [255]])
    void_values: List[int] = dataclasses.field(default_factory=lambda: [50, 85, 170])
    # The class whose precision/recall/F-measure is the headline (CDnet's
    # foreground) and whose per-pixel probability serving returns.
    foreground_class: int = 1
    # softmax: one channel per class | sigmoid: one foreground channel (2 classes only).
    output: str = "softmax"
    # Transposed-convolution decoder: filters per 2x upsampling step, deepest first.
    decoder_filters: List[int] = dataclasses.field(default_factory=lambda: [256, 128, 64, 32, 16])
    # U-Net style: concatenate the encoder's feature map of the same resolution.
    skip_connections: bool = True


SEGMENTATION_CLASSES = ["background", "foreground"]


@dataclasses.dataclass
class Config:
    """A whole visiontune run."""

    task: str = "classification"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    pipeline: PipelineSettings = dataclasses.field(default_factory=PipelineSettings)
    segmentation: SegmentationConfig = dataclasses.field(default_factory=SegmentationConfig)
    # Deployment on Vertex AI; ignored by local runs.
    vertex: VertexConfig = dataclasses.field(default_factory=VertexConfig)


def segmentation_settings(config: "Config") -> Optional[SegmentationConfig]:
    """The segmentation section when the run is a segmentation task, else None."""
    return config.segmentation if config.task == "segmentation" else None


# Settings holding filesystem paths: resolved against the YAML file's folder.
_PATH_FIELDS = {
    ("data", "source"), ("data", "test_source"), ("data", "prepared_dir"),
    ("data", "labels_csv"), ("data", "test_labels_csv"),
    ("pipeline", "output_dir"), ("pipeline", "serving_dir"), ("model", "weights"),
}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Converts a YAML/command-line value to the field's declared type."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, where) for v in value]
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return bool(value)
    if tp in (int, float):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        return "" if value is None else str(value)
    return value


def from_dict(cls: type, values: Dict[str, Any], where: str = "config") -> Any:
    """Builds dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def _resolve_paths(raw: Dict[str, Any], base_dir: str) -> None:
    for section, key in _PATH_FIELDS:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if not value or not isinstance(value, str):
            continue
        if key == "weights" and value.lower() in ("imagenet", "none"):
            continue
        if "://" in value or os.path.isabs(value):
            continue
        if key.endswith("labels_csv"):
            continue  # relative to its source folder, resolved at ingest
        raw[section][key] = os.path.normpath(os.path.join(base_dir, value))


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies ``a.b.c=value`` strings (value parsed as YAML) to a raw mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = _parse_value(text)
    return raw


def _parse_value(text: str) -> Any:
    """A command-line value as YAML (numbers, lists, booleans), else the plain string.

    Globs such as ``*/GT-*.csv`` are not valid YAML; they stay strings.
    """
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML config (or the defaults) and applies command-line overrides.

    Overrides are resolved against the current directory, like any other
    command-line path; the file's own paths against the file's folder.
    """
    raw: Dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _resolve_paths(raw, os.path.dirname(os.path.abspath(path)))
    override_raw = apply_overrides({}, overrides)
    _resolve_paths(override_raw, os.getcwd())
    deep_merge(raw, override_raw)
    _segmentation_defaults(raw)
    config = from_dict(Config, raw, where=path or "config")
    validate(config)
    return config


def _segmentation_defaults(raw: Dict[str, Any]) -> None:
    """Segmentation fine-tunes only the encoder's last block unless told otherwise (the tutorial's recipe)."""
    if raw.get("task") != "segmentation":
        return
    training = raw.setdefault("training", {})
    fine_tune = training.setdefault("fine_tune", {}) if isinstance(training, dict) else None
    if isinstance(fine_tune, dict) and "backbone" not in fine_tune:
        fine_tune["backbone"] = "last_block"


def deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v


_PHASE_POLICIES = ("frozen", "all", "freeze_first", "train_last", "last_block")


def validate(config: Config) -> None:
    """Rejects settings that would fail late, deep inside a component."""
    if config.task not in ("classification", "segmentation"):
        raise ConfigError(f"task: expected classification or segmentation, got {config.task!r}")
    size = config.model.image_size
    if size and not 32 <= size <= 299:
        raise ConfigError(f"model.image_size: {size} is outside 32-299 px")
    if not 0.0 <= config.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: {config.data.eval_fraction} is not in [0, 1)")
    for name in ("warmup", "fine_tune"):
        phase = getattr(config.training, name)
        if phase.backbone not in _PHASE_POLICIES:
            raise ConfigError(f"training.{name}.backbone: {phase.backbone!r} is not one of "
                              f"{', '.join(_PHASE_POLICIES)}")
        if phase.backbone in ("freeze_first", "train_last") and phase.layers <= 0:
            raise ConfigError(f"training.{name}.layers must be > 0 with backbone: {phase.backbone}")
    if config.model.contrast not in ("none", "autocontrast", "equalize"):
        raise ConfigError(f"model.contrast: expected none, autocontrast or equalize, "
                          f"got {config.model.contrast!r}")
    if not 0.0 < config.model.center_crop_fraction <= 1.0:
        raise ConfigError(f"model.center_crop_fraction: {config.model.center_crop_fraction} "
                          "is not in (0, 1]")
    if config.evaluation.split not in ("eval", "test"):
        raise ConfigError(f"evaluation.split: expected eval or test, got {config.evaluation.split!r}")
    aug = config.training.augmentation
    if aug.downscale_min_size and not 1 <= aug.downscale_min_size <= (size or 299):
        raise ConfigError(f"training.augmentation.downscale_min_size: {aug.downscale_min_size} "
                          f"is not between 1 px and the input size")
    if aug.downscale_max_size and aug.downscale_max_size < aug.downscale_min_size:
        raise ConfigError(f"training.augmentation.downscale_max_size: {aug.downscale_max_size} is "
                          f"below downscale_min_size {aug.downscale_min_size}")
    if not 0.0 <= aug.downscale_probability <= 1.0:
        raise ConfigError(f"training.augmentation.downscale_probability: "
                          f"{aug.downscale_probability} is not in [0, 1]")
    if config.task == "segmentation":
        _validate_segmentation(config)


def _validate_segmentation(config: Config) -> None:
    seg = config.segmentation
    size = config.model.image_size
    if size and size % 32:
        raise ConfigError(f"model.image_size: {size} px; segmentation needs a multiple of 32 "
                          "(the encoder's total stride), e.g. 224 or 256")
    aug = config.training.augmentation
    moving = [name for name in ("rotation", "zoom", "translation") if getattr(aug, name)]
    if moving:
        raise ConfigError(f"training.augmentation.{moving[0]}: not supported for segmentation "
                          "(the mask would have to move with the image); flips, brightness, "
                          "contrast and downscale are")
    if config.model.center_crop_fraction != 1.0:
        raise ConfigError("model.center_crop_fraction: not supported for segmentation "
                          "(served masks cover the whole image)")
    if seg.output not in ("softmax", "sigmoid"):
        raise ConfigError(f"segmentation.output: expected softmax or sigmoid, got {seg.output!r}")
    if seg.output == "sigmoid" and len(seg.class_values) != 2:
        raise ConfigError("segmentation.output: sigmoid needs exactly 2 classes in class_values")
    if not 0 <= seg.foreground_class < len(seg.class_values):
        raise ConfigError(f"segmentation.foreground_class: {seg.foreground_class} is not a class "
                          f"index (0-{len(seg.class_values) - 1})")
    if config.training.label_smoothing:
        raise ConfigError("training.label_smoothing: not supported for segmentation")
