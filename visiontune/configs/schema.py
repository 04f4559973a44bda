"""The settings of a visiontune run: one dataclass per concern, every field documented.

As TF Model Garden's ``official/core/config_definitions.py``, each class says
in its ``Attributes:`` section what every field means and why it defaults the
way it does.  Each field's metadata says what values it takes (``ge``/``gt``/
``le``/``lt`` bounds, ``choices``, ``required``, ``regex``): ``validation``
checks them when the config loads and names them when a value is refused.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

from visiontune import features
from visiontune.configs import backbones
from visiontune.configs.fields import FRACTION, setting
from visiontune.configs.vertex import VertexConfig

TASKS = ("classification", "segmentation")
POOLINGS = ("avg", "max")
# The string activations ``tf_keras.activations.get`` resolves (tf_keras 2.16).
ACTIVATIONS = ("elu", "exponential", "gelu", "hard_sigmoid", "leaky_relu", "linear", "log_softmax",
               "mish", "relu", "relu6", "selu", "sigmoid", "silu", "softmax", "softplus", "softsign",
               "swish", "tanh")
CONTRASTS = ("none", "autocontrast", "equalize")
# What ``components.trainer.create_optimizer`` builds.
OPTIMIZERS = ("adam", "sgd", "rmsprop", "adamw")
# What ``components.model.apply_fine_tune_policy`` understands.
PHASE_POLICIES = ("frozen", "all", "freeze_first", "train_last", "last_block")
# What ``components.trainer`` does with a phase's learning rate from epoch to epoch.
SCHEDULES = ("constant", "cosine")
EVAL_SPLITS = ("eval", "test")
SEGMENTATION_OUTPUTS = ("softmax", "sigmoid")
SEGMENTATION_CLASSES = ["background", "foreground"]


EXAMPLE_GENS = ("images", "tfrecords")


@dataclasses.dataclass
class DataConfig:
    """Where the images are and how ingest turns them into ``tf.Example`` TFRecords.

    Attributes:
      example_gen: the pipeline's first component.  ``images``: ImageExampleGen
        reads ``source`` (and ``test_source``) on Beam, local folders or
        ``gs://``, and records the examples, the class list and the rejects
        in ML Metadata.  ``tfrecords``: ImportExampleGen reads
        ``prepared_dir``, TFRecords of ``tf.Example`` in ``train/``, ``eval/``
        (and ``test/``) folders, with ``classes.txt`` beside them or the
        classes in ``classes``: what ``visiontune prepare`` writes, or your own.
      source: a class-per-folder tree, or the folder that ``labels_csv`` names
        files relative to.
      labels_csv: a CSV (or a glob of CSVs, relative to ``source``) giving each
        image's label.  GTSRB: ``*/GT-*.csv`` for train, ``GT-final_test.csv``
        for test.  Empty: the folder tree gives the labels.
      csv_delimiter: the CSV's one-character field separator (GTSRB's ``;``).
      filename_column: the CSV column naming the image file.
      label_column: the CSV column giving its label.
      test_source: an optional separate labelled test set, in the same two
        layouts; it becomes the ``test`` split.
      test_labels_csv: the test set's CSV (relative to ``test_source``).
      eval_fraction: the share of ``source`` that goes to the eval split, in
        [0, 1), chosen by a hash of the file's relative path: adding files
        never moves existing ones.
      split_group_regex: split by a group instead of by file: a regular
        expression over the relative path whose first group names the group,
        e.g. GTSRB's tracks ``^(\\d+/\\d+)_`` for ``00007/00012_00029.ppm``.
        Frames of one track then stay on one side.
      prepared_dir: the output of ``visiontune prepare``; the pipeline's input
        when ``example_gen`` is ``tfrecords``.
      num_shards: TFRecord files per split (at least 1).
      max_file_bytes: files larger than this are rejected (listed in
        ``rejects.csv``), not read.
      max_pixels: images with more pixels than this are rejected, not decoded.
      workers: worker processes for ingest (ImageExampleGen and
        ``visiontune prepare``: Beam's DirectRunner in multi-processing mode
        above 1); 0: all cores from 20,000 images on, one process below
        (starting Beam's workers costs more than they save).
      classes: the ordered class names.  Empty: discovered and sorted
        naturally ("2" before "10").  Labels not listed are rejected.
    """

    example_gen: str = setting("images", choices=EXAMPLE_GENS)
    source: str = ""
    labels_csv: str = ""
    csv_delimiter: str = setting(";", required=True, expect="a single character")
    filename_column: str = "Filename"
    label_column: str = "ClassId"
    test_source: str = ""
    test_labels_csv: str = ""
    eval_fraction: float = setting(0.3, ge=0.0, lt=1.0)
    split_group_regex: str = setting("", regex=True)
    prepared_dir: str = ""
    num_shards: int = setting(4, ge=1)
    max_file_bytes: int = setting(50 * 1024 * 1024, ge=1)
    max_pixels: int = setting(64 * 1024 * 1024, ge=1)
    workers: int = setting(0, ge=0)
    classes: List[str] = setting([])


@dataclasses.dataclass
class HeadConfig:
    """The classifier put on top of the backbone (the GTSRB tutorial's head by default).

    Attributes:
      pooling: how the backbone's feature map becomes a vector: ``avg``
        (GlobalAveragePooling2D) or ``max`` (GlobalMaxPooling2D).
      dense_units: hidden Dense layers between pooling and the softmax, units
        of each; ``[]``: pooling -> dropout -> softmax.
      dropout: the Dropout rate after each hidden layer (or after pooling
        without one), in [0, 1); 0: none.
      activation: the hidden layers' Keras activation, e.g. ``relu``.
    """

    pooling: str = setting("avg", choices=POOLINGS)
    dense_units: List[int] = setting([128], ge=1)
    dropout: float = setting(0.5, ge=0.0, lt=1.0)
    activation: str = setting("relu", choices=ACTIVATIONS)


@dataclasses.dataclass
class AugmentationConfig:
    """Random transforms applied to training images only.

    Flips are off by default: a mirrored "keep left" sign is a "keep right"
    sign.  The factors follow Keras' preprocessing layers, which refuse
    factors above 1.

    Attributes:
      horizontal_flip: mirror left-right at random.
      vertical_flip: mirror top-bottom at random.
      rotation: +- fraction of a full turn, as Keras' RandomRotation.
      zoom: +- fraction (RandomZoom).
      translation: +- fraction of height and width (RandomTranslation).
      brightness: +- fraction of the value range (RandomBrightness).
      contrast: +- factor (RandomContrast).
      downscale_min_size: shrink images to a random side in
        [downscale_min_size, downscale_max_size] px and scale them back up,
        which teaches the blur of small, far-away photos; 0: off.  At most the
        input size.
      downscale_max_size: the largest side of that shrink; 0: the input size.
      downscale_probability: the share of images that are shrunk.
    """

    horizontal_flip: bool = False
    vertical_flip: bool = False
    rotation: float = setting(0.0, **FRACTION)
    zoom: float = setting(0.0, **FRACTION)
    translation: float = setting(0.0, **FRACTION)
    brightness: float = setting(0.0, **FRACTION)
    contrast: float = setting(0.0, **FRACTION)
    downscale_min_size: int = setting(0, ge=0)
    downscale_max_size: int = setting(0, ge=0)
    downscale_probability: float = setting(0.5, **FRACTION)


@dataclasses.dataclass
class ModelConfig:
    """Backbone, input size and head.

    Attributes:
      backbone: a ``keras.applications`` backbone of the registry
        (``visiontune.configs.backbones``), e.g. ``mobilenet_v2``.
      weights: ``imagenet`` | ``none`` (train from scratch) | the path of an
        existing ``.h5`` weights file without the top (checked when the config
        loads) | a URI such as ``gs://.../weights.h5`` (copied when used).
      alpha: the width multiplier of MobileNet and MobileNetV2 (> 0); ignored
        by other backbones.  ImageNet weights exist for some values only
        (MobileNet 0.25/0.5/0.75/1.0, MobileNetV2 0.35/0.5/0.75/1.0/1.3/1.4).
      image_size: the square input side in pixels, from the backbone's
        minimum (32; 75 for Inception, 71 for Xception) to 299; 0: the
        backbone's default (224, or 299 for Inception and Xception).
      contrast: per-image contrast normalisation before the backbone, inside
        the model so serving does it too: ``none`` | ``autocontrast`` (stretch
        the range to 0-255) | ``equalize`` (histogram equalisation).  Helps
        with very dark or washed-out photos such as GTSRB's.
      center_crop_fraction: at inference only, the model looks at this central
        fraction of the image, in (0, 1], scaled back to the input size (TF
        Model Garden's ``center_crop_fraction``; 0.875 is ImageNet's standard).
        Training sees whole images with random zoom and shifts, so objects
        look larger to it than in a whole test photo (FixRes, Touvron et al.
        2019); the crop evens that out.  1.0: no crop.  Classification only.
      head: the classifier on top of the backbone.
      ensemble_size: how many classifiers of this shape are trained, one
        after another, each with its own seed (``training.seed`` + 0, 1, ...:
        head initialisation, shuffling, augmentation, dropout), and exported
        as one SavedModel that averages their probabilities (same signatures,
        same TFLite files).  Members that err differently vote each other's
        mistakes down; training and inference cost grow with the count.
        1: one model.  Classification only.
    """

    backbone: str = setting("mobilenet_v2", choices=backbones.names())
    weights: str = setting("imagenet", expect="imagenet, none, a URI (gs://.../weights.h5) "
                                              "or the path of an existing .h5 file")
    alpha: float = setting(1.0, gt=0.0)
    image_size: int = setting(0, ge=0, le=backbones.MAX_IMAGE_SIZE,
                              expect=f"0 (the backbone's default) or a side in px, from the "
                                     f"backbone's minimum (32, 71 or 75) to {backbones.MAX_IMAGE_SIZE}")
    contrast: str = setting("none", choices=CONTRASTS)
    center_crop_fraction: float = setting(1.0, gt=0.0, le=1.0)
    ensemble_size: int = setting(1, ge=1)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)


@dataclasses.dataclass
class PhaseConfig:
    """One ``model.fit`` phase of fine-tuning.

    Attributes:
      epochs: epochs of this phase; 0 skips it.
      learning_rate: the optimizer's learning rate in this phase (> 0).
      backbone: which backbone layers train in this phase:
        ``frozen`` none (head warm-up); ``all`` every layer; ``freeze_first``
        all but the first ``layers`` layers; ``train_last`` only the last
        ``layers`` layers (the tutorial's "last 8"); ``last_block`` the
        backbone's last block (VGG16: ``block5_*``) and what follows it.
        BatchNorm layers of a pretrained backbone never train and always run
        in inference mode.
      layers: the layer count of ``freeze_first`` and ``train_last`` (>= 1
        with those policies), counting the backbone's own layers, BatchNorm
        included.
      schedule: ``constant``: ``learning_rate`` throughout, lowered only by
        ``training.reduce_lr_*`` when validation stalls; ``cosine``: decays
        from ``learning_rate`` towards 0 along half a cosine over the phase's
        epochs (set at each epoch's start, so a resumed run follows the same
        curve), and ``reduce_lr_*`` is off in this phase.  A schedule of known
        length spends no epochs waiting for a plateau to be noticed.
    """

    epochs: int = setting(0, ge=0)
    learning_rate: float = setting(1e-3, gt=0.0)
    backbone: str = setting("frozen", choices=PHASE_POLICIES)
    layers: int = setting(0, ge=0)
    schedule: str = setting("constant", choices=SCHEDULES)


@dataclasses.dataclass
class TrainingConfig:
    """Optimizer, schedule and the two fine-tuning phases.

    Attributes:
      batch_size: images per training step (>= 1).
      optimizer: ``adam`` | ``sgd`` (momentum 0.9, Nesterov) | ``rmsprop`` |
        ``adamw``.
      weight_decay: AdamW's decoupled weight decay (0: AdamW's 1e-4); ignored
        by the other optimizers.
      label_smoothing: in [0, 1); classification only.
      warmup: the first phase: head only, backbone frozen.
      fine_tune: the second phase: part or all of the backbone, at a lower
        rate (``last_block`` by default for segmentation).
      augmentation: random transforms of training images.
      early_stopping_patience: epochs without a better validation loss before
        a phase stops (restoring its best weights); 0: never stops early.
      reduce_lr_patience: epochs without a better validation loss before the
        learning rate is multiplied by ``reduce_lr_factor``; 0: never.
      reduce_lr_factor: that factor, in (0, 1).
      steps_per_epoch: a cap on steps per epoch (0: the whole split); useful
        for smoke tests.
      backup_every_seconds: ignored, kept so that older configs still load: a
        killed Trainer resumes at the next unfinished epoch, since the resume
        state is written after every epoch (``components.training_state``).
      seed: the random seed of weights, shuffling and augmentation (NumPy
        takes 0 to 2**32 - 1).
      mixed_precision: mixed precision on GPU (float32 output layer); ignored
        on CPU and TPU.
      tpu: ``grpc://...``, a TPU name or ``local``: use TPUStrategy.  Empty:
        GPUs, else CPU.
    """

    batch_size: int = setting(32, ge=1)
    optimizer: str = setting("adam", choices=OPTIMIZERS)
    weight_decay: float = setting(0.0, ge=0.0)
    label_smoothing: float = setting(0.0, ge=0.0, lt=1.0)
    warmup: PhaseConfig = dataclasses.field(
        default_factory=lambda: PhaseConfig(epochs=5, learning_rate=1e-3, backbone="frozen"))
    fine_tune: PhaseConfig = dataclasses.field(
        default_factory=lambda: PhaseConfig(epochs=10, learning_rate=1e-4, backbone="train_last", layers=8))
    augmentation: AugmentationConfig = dataclasses.field(default_factory=AugmentationConfig)
    early_stopping_patience: int = setting(5, ge=0)
    reduce_lr_patience: int = setting(3, ge=0)
    reduce_lr_factor: float = setting(0.5, gt=0.0, lt=1.0)
    steps_per_epoch: int = setting(0, ge=0)
    backup_every_seconds: float = setting(0.0, ge=0.0)
    seed: int = setting(42, ge=0, le=2**32 - 1)
    mixed_precision: bool = True
    tpu: str = ""


@dataclasses.dataclass
class EvaluationConfig:
    """What the Evaluator computes and what it takes to bless a model.

    Attributes:
      split: the split the Evaluator scores: ``eval``, or ``test`` when a test
        set was prepared.
      top_k: the k of top-k accuracy (>= 1; at most the class count is used).
      min_accuracy: blessing: overall accuracy (pixel accuracy for
        segmentation) at least this, in [0, 1] ...
      max_regression: ... and no worse than the last blessed model by more
        than this (absolute, in [0, 1]; 1 is no check, and the last blessed
        model is then not evaluated at all).
      batch_size: images per Evaluator batch (>= 1).
    """

    split: str = setting("eval", choices=EVAL_SPLITS)
    top_k: int = setting(3, ge=1)
    min_accuracy: float = setting(0.5, **FRACTION)
    max_regression: float = setting(0.01, **FRACTION)
    batch_size: int = setting(64, ge=1)


@dataclasses.dataclass
class ExportConfig:
    """What the Trainer exports beside the SavedModel that TF Serving loads.

    The TensorFlow Lite models go into the SavedModel's
    ``assets.extra/tflite/`` (TF Serving ignores ``assets.extra``), so the
    Pusher pushes them with a blessed model only.  Each takes what Transform
    gives the model: uint8 RGB pixels ``[1, S, S, 3]`` (``S`` = the input
    size), decoded and resized to ``S`` x ``S`` with antialiased bilinear;
    scaling, contrast normalisation and the centre crop are inside.
    ``tflite.json`` beside them says what to feed and how to read the output.

    Attributes:
      tflite: the TensorFlow Lite variants to write: ``float16`` (float16
        weights, float32 arithmetic; float32 probabilities out) and ``int8``
        (full-integer quantisation calibrated on train-split images: int8
        weights and activations, uint8 pixels in with scale 1 and zero point
        0, uint8 probabilities out with scale 1/256; only autocontrast's
        per-image gain and equalize, which have no int8 TFLite kernels, stay
        float32 inside).  Segmentation models output per-pixel probabilities.
        ``[]``: none (no conversion time).
      calibration_images: how many train-split images calibrate the int8
        activation ranges (>= 1), taken evenly spaced through the split (never
        from eval or test).
    """

    tflite: List[str] = setting(list(features.TFLITE_VARIANTS), choices=features.TFLITE_VARIANTS)
    calibration_images: int = setting(200, ge=1)


@dataclasses.dataclass
class PipelineSettings:
    """Names and folders of a run.

    Attributes:
      name: the TFX pipeline name (its ML Metadata context).
      output_dir: the run's artifacts and its ML Metadata database.
      serving_dir: the Pusher's target: ``SERVING_DIR/MODEL_NAME/VERSION/``.
      model_name: the served model's name.
      enable_cache: reuse the outputs of components whose inputs and settings
        did not change.
      beam_workers: Beam DirectRunner workers (>= 1); in memory with 1 worker
        is fastest for small data.
    """

    name: str = setting("visiontune", required=True)
    output_dir: str = setting("outputs/run", required=True)
    serving_dir: str = setting("outputs/serving", required=True)
    model_name: str = setting("visiontune", required=True)
    enable_cache: bool = True
    beam_workers: int = setting(1, ge=1)


@dataclasses.dataclass
class SegmentationConfig:
    """``task: segmentation``: image/mask pairs, how mask values become classes, the decoder.

    Class names are ``data.classes`` (default ``background, foreground``); class
    ``i`` is every mask pixel whose value is in ``class_values[i]``.  Pixels with a
    value in ``void_values`` (or in no list) are void: left out of the loss and
    of every metric.  The defaults are CDnet2014's: 0 background, 255
    foreground; 50 shadow, 85 outside the region of interest, 170 unknown motion.

    Attributes:
      image_dir: the images' folder, relative to ``data.source`` (and to
        ``data.test_source`` for the test set).
      mask_dir: the masks' folder, relative to the same.
      mask_regex: matched against an image's file name ...
      mask_template: ... and expanded (``\\1`` or ``\\g<name>`` for groups) to
        its mask's name, e.g. ``in000685.jpg`` -> ``gt000685.png``.
      class_values: the mask values (0-255) of each class, one list per class;
        a value may belong to one class only.
      void_values: mask values (0-255) left out of the loss and the metrics.
      foreground_class: the class whose precision/recall/F-measure is the
        headline (CDnet's foreground) and whose per-pixel probability serving
        returns; an index into ``class_values``.
      output: ``softmax``: one channel per class | ``sigmoid``: one foreground
        channel (2 classes only).
      decoder_filters: the transposed-convolution decoder's filters per 2x
        upsampling step, deepest first (>= 1 each).
      skip_connections: U-Net style: concatenate the encoder's feature map of
        the same resolution.
    """

    image_dir: str = setting("x", required=True)
    mask_dir: str = setting("y", required=True)
    mask_regex: str = setting(r"^in(\d+)\.\w+$", required=True, regex=True)
    mask_template: str = setting(r"gt\1.png", required=True)
    class_values: List[List[int]] = setting([[0], [255]], ge=0, le=255)
    void_values: List[int] = setting([50, 85, 170], ge=0, le=255)
    foreground_class: int = setting(1, ge=0)
    output: str = setting("softmax", choices=SEGMENTATION_OUTPUTS)
    decoder_filters: List[int] = setting([256, 128, 64, 32, 16], ge=1)
    skip_connections: bool = True


@dataclasses.dataclass
class Config:
    """A whole visiontune run.

    Attributes:
      task: ``classification`` | ``segmentation`` (the ``segmentation``
        section then applies).
      data: the images and how they are prepared.
      model: backbone, input size and head.
      training: optimizer, schedule, fine-tuning phases, augmentation.
      evaluation: the Evaluator's split and blessing thresholds.
      export: the TensorFlow Lite models exported beside the SavedModel.
      pipeline: names and folders of the run.
      segmentation: masks and decoder of ``task: segmentation``.
      vertex: deployment on Vertex AI; ignored by local runs.
    """

    task: str = setting("classification", choices=TASKS)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    pipeline: PipelineSettings = dataclasses.field(default_factory=PipelineSettings)
    segmentation: SegmentationConfig = dataclasses.field(default_factory=SegmentationConfig)
    vertex: VertexConfig = dataclasses.field(default_factory=VertexConfig)


def segmentation_settings(config: Config) -> Optional[SegmentationConfig]:
    """The segmentation section when the run is a segmentation task, else None."""
    return config.segmentation if config.task == "segmentation" else None
