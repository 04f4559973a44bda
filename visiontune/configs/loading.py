"""Reading a config: YAML files, ``--set`` overrides, and values of exactly the declared types.

``load_config`` reads a YAML file and applies ``section.key=value`` overrides
from the command line on top of it (timm's ``train.py`` habit: the file is the
baseline, flags win).  Relative paths in a YAML file are resolved against the
file's own folder, so a config in ``configs/`` can say
``../../shared/datasets/gtsrb`` and work from any working directory.

Nothing is converted behind the user's back: a boolean setting takes only
``true``/``false`` (``yes``/``no``/``on``/``off``), an integer setting only
whole numbers, a number setting no booleans; a key written twice in one
mapping is an error, not "the last one wins".  Every refusal names the key as
the user wrote it, with the file and line when it came from the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import yaml

from visiontune.configs.schema import Config
from visiontune.configs.validation import describe, refused, setting_error, show, validate, validate_for_pipeline
from visiontune.errors import ConfigError

# Settings holding filesystem paths: resolved against the YAML file's folder.
_PATH_FIELDS = {
    ("data", "source"), ("data", "test_source"), ("data", "prepared_dir"),
    ("data", "labels_csv"), ("data", "test_labels_csv"),
    ("pipeline", "output_dir"), ("pipeline", "serving_dir"), ("model", "weights"),
}
# The strings a boolean setting takes besides YAML's own booleans (e.g. from a quoted value).
_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_INTEGER = re.compile(r"[-+]?\d+")


# --------------------------------------------------------------------------- YAML

def _compose(text: str, name: str = "", prefix: str = "") -> Tuple[Any, Dict[str, int]]:
    """(document, dotted key -> line) of a YAML text; a key twice in one mapping is refused.

    ``name``: the file, which errors name with the line; ``prefix``: the dotted
    key the text is the value of (a ``--set`` value).
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: Dict[str, int] = {}
        if node is None:
            return None, lines
        _index(node, prefix, lines, name)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


def _index(node: yaml.Node, prefix: str, lines: Dict[str, int], name: str) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    first: Dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = key_node.value, key_node.start_mark.line + 1
        if key in first:
            where, since = (f"{name}:{line}: ", f" (first on line {first[key]})") if name else ("", "")
            raise ConfigError(f"{where}{prefix}{key}: duplicate key{since}; expected each setting once "
                              "per section")
        first[key] = lines[prefix + key] = line
        _index(value_node, f"{prefix}{key}.", lines, name)


def read_yaml(path: str) -> Tuple[Any, Dict[str, int]]:
    """A YAML file's document and the line of each dotted key; errors are one line naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: cannot read config: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                          "save it as UTF-8") from None
    try:
        return _compose(text, path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else path
        detail = ": ".join(" ".join(part.split()) for part in (e.context, e.problem) if part)
        column = f" (column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{where}: not valid YAML: {detail}{column}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


# --------------------------------------------------------------------------- types

def _coerce(value: Any, tp: Any, key: str, meta: Dict[str, Any]) -> Any:
    """A YAML/command-line value as the field's declared type, or a refusal naming what it takes."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if value is None:  # a section whose settings are all commented out
            value = {}
        if not isinstance(value, dict):
            names = ", ".join(f.name for f in dataclasses.fields(tp))
            raise setting_error(key, f"got {show(value)}, expected a mapping of settings ({names})")
        return _build(tp, value, key + ".")
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if value is None:
            return []
        if isinstance(value, str):  # --set data.classes=a,b
            value = [s.strip() for s in value.split(",") if s.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
    elif tp is str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):
            raise setting_error(key, f"got {show(value)}, expected {describe(tp, meta)} (YAML reads unquoted "
                                     "yes, no, on, off, true and false as booleans: quote the value)")
    else:
        return value
    raise refused(key, value, tp, meta)


def _build(cls: type, values: Dict[Any, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [str(k) for k in values if k not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1) or [
            f"{name}.{unknown[0]}" for name in fields if isinstance(hints[name], type)
            and dataclasses.is_dataclass(hints[name]) and unknown[0] in hints[name].__dataclass_fields__]
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        where = f"in {prefix[:-1]}" if prefix else "at the top level"
        raise setting_error(prefix + unknown[0], f"unknown setting(s) {', '.join(unknown)}{hint}; "
                                                 f"known {where}: {', '.join(sorted(fields))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k, fields[k].metadata) for k, v in values.items()})


def from_dict(cls: type, values: Dict[str, Any], where: str = "") -> Any:
    """Builds dataclass ``cls`` from a mapping, refusing unknown keys and values of the wrong type.

    ``where`` (e.g. ``demo``) starts every error message.  Values are not
    range-checked here: ``validate`` does that.
    """
    try:
        if not isinstance(values, dict):
            raise ConfigError(f"got {show(values)}, expected a mapping of settings")
        return _build(cls, values, "")
    except ConfigError as e:
        if not where:
            raise
        raise _prefixed(e, where) from None


def to_dict(config: Any) -> Dict[str, Any]:
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------- overrides and paths

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
        dotted, sep, text = item.partition("=")
        keys = [k.strip() for k in dotted.split(".")]
        if not sep or not all(keys):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.batch_size=16")
        node = raw
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:i + 1])} is a value, not a section")
        node[keys[-1]] = _parse_value(text, ".".join(keys))
    return raw


def _parse_value(text: str, key: str = "") -> Any:
    """A command-line value as YAML (numbers, lists, booleans), else the plain string.

    Globs such as ``*/GT-*.csv`` are not valid YAML; they stay strings.
    """
    if text == "":
        return ""
    try:
        return _compose(text, prefix=f"{key}." if key else "")[0]
    except yaml.YAMLError:
        return text


def _dotted_keys(raw: Any, prefix: str = "") -> Set[str]:
    """The dotted keys of the values in ``raw``: its leaves, not the sections holding them
    (``--output`` sets ``data.prepared_dir``, not the rest of ``data``)."""
    keys: Set[str] = set()
    if isinstance(raw, dict):
        for k, v in raw.items():
            if isinstance(v, dict) and v:
                keys |= _dotted_keys(v, f"{prefix}{k}.")
            else:
                keys.add(f"{prefix}{k}")
    return keys


def deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v


def _segmentation_defaults(raw: Dict[str, Any]) -> None:
    """Segmentation fine-tunes only the encoder's last block unless told otherwise (the tutorial's recipe)."""
    if raw.get("task") != "segmentation":
        return
    if raw.get("training") is None:
        raw["training"] = {}
    training = raw["training"]
    if isinstance(training, dict) and training.get("fine_tune") is None:
        training["fine_tune"] = {}
    fine_tune = training.get("fine_tune") if isinstance(training, dict) else None
    if isinstance(fine_tune, dict) and "backbone" not in fine_tune:
        fine_tune["backbone"] = "last_block"


# --------------------------------------------------------------------------- loading

def _prefixed(error: ConfigError, prefix: str) -> ConfigError:
    new = ConfigError(f"{prefix}: {error}")
    new.key = getattr(error, "key", None)  # type: ignore[attr-defined]
    new.related = getattr(error, "related", ())  # type: ignore[attr-defined]
    return new


def _located(error: ConfigError, path: Optional[str], lines: Dict[str, int], overridden: Set[str]) -> ConfigError:
    """The error with the file and line of its key, unless the command line set that key."""
    key = getattr(error, "key", None)
    if not key or not path:
        return error
    for k in (key, *getattr(error, "related", ())):
        base = re.sub(r"\[\d+\]", "", k)
        if base in overridden or any(base.startswith(o + ".") for o in overridden):
            return error
        if base in lines:
            return _prefixed(error, f"{path}:{lines[base]}")
    return _prefixed(error, path)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), *,
                local_files: bool = True, pipeline: bool = False) -> Config:
    """Loads a YAML config (or the defaults), applies command-line overrides and validates the result.

    Overrides are resolved against the current directory, like any other
    command-line path; the file's own paths against the file's folder.
    ``local_files=False`` (the Vertex compile) skips checks of files on this
    machine, such as a local ``model.weights``.  ``pipeline``: the config is
    to run the pipeline (``validate_for_pipeline``), not only to prepare data.
    """
    raw: Dict[str, Any] = {}
    lines: Dict[str, int] = {}
    if path:
        document, lines = read_yaml(path)
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: got {show(document)}, expected a mapping of sections "
                              "(task, data, model, training, ...) at the top level")
        raw = document
        _resolve_paths(raw, os.path.dirname(os.path.abspath(path)))
    override_raw = apply_overrides({}, overrides)
    overridden = _dotted_keys(override_raw)
    _resolve_paths(override_raw, os.getcwd())
    deep_merge(raw, override_raw)
    _segmentation_defaults(raw)
    try:
        config = from_dict(Config, raw)
        validate(config, local_files=local_files)
        if pipeline:
            validate_for_pipeline(config)
    except ConfigError as e:
        raise _located(e, path, lines, overridden) from None
    return config
