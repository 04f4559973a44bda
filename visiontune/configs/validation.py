"""Checks a config's values when it loads, with messages naming the key and what it takes.

Two kinds of checks, both before any TFX component starts:

* every field against its own metadata (``fields.setting``): bounds, choices,
  non-empty strings, regular expressions that compile;
* settings that depend on each other or on the outside world: the backbone's
  minimum input size, a local weights file that must exist, the fine-tuning
  policies that need a layer count, what segmentation cannot do.

A refused value raises a ``ConfigError`` whose ``key`` attribute is the dotted
setting (``training.batch_size``), so ``load_config`` can say which file and
line it came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import typing
from typing import Any, Dict

from visiontune.configs import backbones
from visiontune.configs.schema import SEGMENTATION_CLASSES, Config
from visiontune.errors import ConfigError

# Checked by hand below (the allowed values depend on other settings).
_CUSTOM = {"model.image_size", "model.weights"}

# A served model's name is one folder under the serving dir and one segment of TF Serving's REST paths.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
MODEL_NAME_RULE = ("a single folder name of letters, digits, '_', '.' and '-' (not starting with '.' or '-', "
                   "at most 200 characters)")


def model_name_problem(name: str) -> str:
    """Why ``name`` cannot be a served model's name ("" when it can): ``../../x`` would push outside."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        return f"got {show(name)}, expected {MODEL_NAME_RULE}"
    return ""


def setting_error(key: str, message: str, *related: str) -> ConfigError:
    """A ``ConfigError`` for ``key`` (``related``: other keys it depends on, for locating it)."""
    error = ConfigError(f"{key}: {message}")
    error.key = key  # type: ignore[attr-defined]
    error.related = related  # type: ignore[attr-defined]
    return error


def show(value: Any) -> str:
    """A value as the user wrote it: ``true``, ``3.9``, ``'adagrad'``; a long one shortened.

    A message is one line: long strings, lists and mappings (a YAML alias
    bomb's are exponential) end in ``...``.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 120, 120, 2
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range(meta: Dict[str, Any]) -> str:
    low = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    high = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if low and high:
        return f" in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {_number(high[1])}"
    return ""


def describe(tp: Any, meta: Dict[str, Any], plural: bool = False) -> str:
    """What a field takes, in words: ``an integer >= 1``, ``one of avg, max``, ``true or false``."""
    if meta.get("expect"):
        return meta["expect"]
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return ("lists of " if plural else "a list of ") + describe(item, meta, plural=True)
    if tp is bool:
        return "booleans (true or false)" if plural else "true or false"
    if tp is int:
        return ("integers" if plural else "an integer") + _range(meta)
    if tp is float:
        return ("numbers" if plural else "a number") + _range(meta)
    if meta.get("regex"):
        return "regular expressions" if plural else "a regular expression (Python re syntax)"
    if meta.get("required"):
        return "non-empty strings" if plural else "a non-empty string"
    return "strings" if plural else "a string"


def refused(key: str, value: Any, tp: Any, meta: Dict[str, Any], *related: str) -> ConfigError:
    return setting_error(key, f"got {show(value)}, expected {describe(tp, meta)}", *related)


def has_type(value: Any, tp: Any) -> bool:
    """Whether ``value`` is already of the field type ``tp`` (no conversion)."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(has_type(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _check_value(key: str, value: Any, tp: Any, meta: Dict[str, Any]) -> None:
    if not has_type(value, tp):
        raise refused(key, value, tp, meta)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _check_value(f"{key}[{i}]", v, item, meta)
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise refused(key, value, tp, meta)
    if meta.get("required") and not value.strip():
        raise refused(key, value, tp, meta)
    if tp in (int, float):
        low_ok = value >= meta["ge"] if "ge" in meta else value > meta["gt"] if "gt" in meta else True
        high_ok = value <= meta["le"] if "le" in meta else value < meta["lt"] if "lt" in meta else True
        if not (low_ok and high_ok):
            raise refused(key, value, tp, meta)
    if meta.get("regex") and value:
        try:
            re.compile(value)
        except re.error as e:
            raise setting_error(key, f"got {show(value)}, which is not a valid regular expression "
                                     f"({e}); expected {describe(tp, meta)}") from None


def check_fields(obj: Any, prefix: str = "") -> None:
    """Every field of dataclass ``obj`` (and of its sections) against its own metadata."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, hints[f.name]):
                raise setting_error(key, f"got {show(value)}, expected a mapping of settings")
            check_fields(value, key + ".")
        elif key not in _CUSTOM:
            _check_value(key, value, hints[f.name], f.metadata)


def field_metadata(cls: type, name: str) -> Dict[str, Any]:
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


def input_side(config: Config) -> int:
    """The model's input side: ``model.image_size``, else the backbone's default."""
    return config.model.image_size or backbones.get(config.model.backbone).default_size


def validate(config: Config, local_files: bool = True) -> None:
    """Rejects settings that would fail late, deep inside a component, or silently.

    ``local_files``: also check that a local ``model.weights`` file exists.  Off
    for the Vertex compile, which runs elsewhere and uses ``vertex.weights``
    (a ``gs://`` copy) when it is set.
    """
    check_fields(config)
    problem = model_name_problem(config.pipeline.model_name)
    if problem:
        raise setting_error("pipeline.model_name", problem)
    _check_model(config, local_files)
    _check_data(config)
    _check_training(config)
    _check_export(config)
    if config.task == "segmentation":
        _check_segmentation(config)


def validate_for_pipeline(config: Config) -> None:
    """What running the pipeline needs beyond what ``visiontune prepare`` accepts.

    The Trainer validates on the eval split and the Evaluator may score it:
    ``data.eval_fraction: 0`` (a prepared set without one, for other readers)
    would leave Transform an empty split, whose schema has no features.
    """
    data = config.data
    if data.source and data.eval_fraction == 0:
        raise setting_error("data.eval_fraction", "got 0, expected a number in (0, 1) to run the pipeline: "
                            "the Trainer validates on the eval split (0 is for `visiontune prepare` only)")


def _check_model(config: Config, local_files: bool) -> None:
    model = config.model
    info = backbones.get(model.backbone)
    size = model.image_size
    if not isinstance(size, int) or isinstance(size, bool) or (
            size and not info.min_size <= size <= backbones.MAX_IMAGE_SIZE):
        small = isinstance(size, int) and size < info.min_size
        why = f" ({model.backbone} needs at least {info.min_size} px)" if small else ""
        raise setting_error("model.image_size", f"got {show(size)}, expected 0 ({model.backbone}'s default, "
                            f"{info.default_size} px) or an integer in [{info.min_size}, "
                            f"{backbones.MAX_IMAGE_SIZE}]{why}", "model.backbone")
    weights = model.weights
    expected = describe(str, field_metadata(type(model), "weights"))
    if not isinstance(weights, str):
        raise setting_error("model.weights", f"got {show(weights)}, expected {expected}")
    if local_files and weights and weights.lower() not in ("imagenet", "none") and "://" not in weights \
            and not os.path.isfile(weights):
        what = "a folder" if os.path.isdir(weights) else "no such file"
        raise setting_error("model.weights", f"{weights}: {what}; expected {expected}")


def _check_data(config: Config) -> None:
    data = config.data
    if len(data.csv_delimiter) != 1:
        raise setting_error("data.csv_delimiter", f"got {show(data.csv_delimiter)}, expected a single character")
    seen = set()
    for i, name in enumerate(data.classes):
        if not name.strip() or name in seen:
            what = "an empty name" if not name.strip() else f"{name!r} a second time"
            raise setting_error(f"data.classes[{i}]", f"got {what}, expected distinct, non-empty class names")
        seen.add(name)


def _check_training(config: Config) -> None:
    training = config.training
    for name in ("warmup", "fine_tune"):
        phase = getattr(training, name)
        if phase.backbone in ("freeze_first", "train_last") and phase.layers < 1:
            verb = "freezes" if phase.backbone == "freeze_first" else "trains"
            raise setting_error(f"training.{name}.layers",
                                f"got {phase.layers}, expected an integer >= 1 with backbone: {phase.backbone} "
                                f"(the number of backbone layers it {verb})", f"training.{name}.backbone")
    aug = training.augmentation
    size = input_side(config)
    if aug.downscale_min_size > size:
        raise setting_error("training.augmentation.downscale_min_size",
                            f"got {aug.downscale_min_size}, expected 0 (off) or an integer in [1, {size}] "
                            "(at most the input size)", "model.image_size")
    if aug.downscale_max_size and aug.downscale_max_size < aug.downscale_min_size:
        raise setting_error("training.augmentation.downscale_max_size",
                            f"got {aug.downscale_max_size}, expected 0 (the input size) or an integer >= "
                            f"downscale_min_size ({aug.downscale_min_size})",
                            "training.augmentation.downscale_min_size")


def _check_export(config: Config) -> None:
    variants = config.export.tflite
    for i, variant in enumerate(variants):
        if variant in variants[:i]:
            raise setting_error(f"export.tflite[{i}]", f"got {show(variant)} a second time, expected each "
                                "variant once ([] for none)")


def _check_segmentation(config: Config) -> None:
    seg = config.segmentation
    size = input_side(config)
    if size % 32:
        given = f"got {size}" if config.model.image_size else \
            f"got 0, which is {config.model.backbone}'s default of {size} px"
        raise setting_error("model.image_size", f"{given}; segmentation needs a multiple of 32 "
                            "(the encoder's total stride), e.g. 224 or 256", "model.backbone")
    aug = config.training.augmentation
    moving = [name for name in ("rotation", "zoom", "translation") if getattr(aug, name)]
    if moving:
        raise setting_error(f"training.augmentation.{moving[0]}",
                            "not supported for segmentation (the mask would have to move with the image); "
                            "expected 0: flips, brightness, contrast and downscale are supported", "task")
    if config.model.ensemble_size != 1:
        raise setting_error("model.ensemble_size", f"got {config.model.ensemble_size}, expected 1: ensembles "
                            "are not supported for segmentation", "task")
    if config.model.center_crop_fraction != 1.0:
        raise setting_error("model.center_crop_fraction", "not supported for segmentation (served masks "
                            "cover the whole image); expected 1.0", "task")
    if config.training.label_smoothing:
        raise setting_error("training.label_smoothing", "not supported for segmentation; expected 0", "task")
    count = len(seg.class_values)
    if count < 2:
        raise setting_error("segmentation.class_values", f"got {count} class(es), expected a list of at least "
                            "2 lists of mask values (0-255), e.g. [[0], [255]]")
    owner: Dict[int, int] = {}
    for i, values in enumerate(seg.class_values):
        if not values:
            raise setting_error(f"segmentation.class_values[{i}]", "got [], expected at least one mask value "
                                "(0-255)")
        for v in values:
            if owner.setdefault(v, i) != i:
                raise setting_error(f"segmentation.class_values[{i}]", f"mask value {v} is also in "
                                    f"class_values[{owner[v]}]; expected each value in one class only")
    for i, v in enumerate(seg.void_values):
        if v in owner:
            raise setting_error(f"segmentation.void_values[{i}]", f"mask value {v} is also class "
                                f"{owner[v]}'s; expected values that are in no class",
                                "segmentation.class_values")
    if seg.output == "sigmoid" and count != 2:
        raise setting_error("segmentation.output", f"sigmoid needs exactly 2 classes in class_values, got "
                            f"{count}; expected softmax", "segmentation.class_values")
    if seg.foreground_class >= count:
        raise setting_error("segmentation.foreground_class", f"got {seg.foreground_class}, expected a class "
                            f"index in [0, {count - 1}]", "segmentation.class_values")
    if config.data.classes and len(config.data.classes) != count:
        raise setting_error("data.classes", f"got {len(config.data.classes)} names, expected {count}: one per "
                            "list of segmentation.class_values", "segmentation.class_values")
    if not config.data.classes and count != len(SEGMENTATION_CLASSES):
        raise setting_error("data.classes", f"got none, expected {count} names (one per list of "
                            "segmentation.class_values; only 2 classes default to background, foreground)",
                            "segmentation.class_values")
