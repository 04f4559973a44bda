"""``--backbones`` of ``visiontune compare``: ``NAME[:KEY=VALUE]...`` items, comma-separated."""

from __future__ import annotations

import dataclasses
import re
from typing import List, Sequence, Tuple

from visiontune.errors import UserError


class CompareError(UserError, ValueError):
    """A backbone list or setting the user can fix (printed as one line)."""


@dataclasses.dataclass
class BackboneSpec:
    """``NAME[:KEY=VALUE]...`` from the command line."""

    name: str
    settings: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (section.key, value)
    label: str = ""
    text: str = ""

    def given(self, dotted: str) -> bool:
        return any(k == dotted for k, _ in self.settings)


def split_top_level(text: str, sep: str = ",") -> List[str]:
    """Splits on ``sep`` outside brackets, so ``head.dense_units=[64,32]`` stays whole."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_spec(text: str) -> BackboneSpec:
    """``mobilenet_v2:alpha=0.35:weights=PATH`` -> BackboneSpec.

    A key without a dot is a ``model.`` setting (``alpha``, ``weights``,
    ``image_size``, ``contrast``, ...); a dotted key is any setting
    (``training.batch_size=16``); ``label=NAME`` names the row.
    """
    name, *items = split_top_level(text, ":")
    spec = BackboneSpec(name=name.strip().lower(), text=text)
    for item in items:
        if "=" not in item:
            raise CompareError(f"backbone {text!r}: {item!r} is not KEY=VALUE")
        key, value = (s.strip() for s in item.split("=", 1))
        if key == "label":
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
                raise CompareError(f"backbone {text!r}: label {value!r}: use letters, digits, _ . -")
            spec.label = value
            continue
        if key == "backbone" or key == "model.backbone":
            raise CompareError(f"backbone {text!r}: the backbone is the name before the first ':'")
        spec.settings.append((key if "." in key else f"model.{key}", value))
    return spec


def parse_backbones(values: Sequence[str]) -> List[BackboneSpec]:
    """Specs from one or more ``--backbones`` values, each a comma-separated list."""
    specs = [parse_spec(item) for value in values for item in split_top_level(value, ",")]
    if not specs:
        raise CompareError("no backbones given (--backbones mobilenet_v2,resnet50v2,...)")
    return specs

