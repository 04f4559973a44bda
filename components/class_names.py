"""Class names: which names are usable, their natural order, and the class list of a dataset.

A class name is a line of ``classes.txt`` and a label every later step maps to
an index, so it must be one printable line, and two names that look the same
(Unicode NFC/NFD, surrounding spaces) must not become two classes.  Classes
are ordered naturally ("2" before "10"), unless ``data.classes`` gives the order.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from visiontune.components.image_listing import _Item
    from visiontune.configs import DataConfig


def natural_key(name: str) -> Tuple:
    """Sort key putting "2" before "10" and "class2" before "class10".

    Digit runs compare as numbers and the rest case-insensitively; the raw
    string breaks ties so that "2" and "02" still have a fixed order.
    """
    parts = re.split(r"([0-9]+)", name)
    return tuple((int(p) if i % 2 else p.casefold()) for i, p in enumerate(parts)), name


@functools.lru_cache(maxsize=1024)  # per CSV row: labels repeat
def label_problem(label: str) -> Optional[str]:
    """What makes ``label`` unusable as a class name (a line of ``classes.txt``), or None."""
    if not label.strip():
        return "is empty"
    for char in label:
        category = unicodedata.category(char)
        if category == "Cs":  # a byte of a file name that is not UTF-8 (surrogateescape)
            return "is not valid UTF-8"
        if category in ("Cc", "Zl", "Zp"):
            return f"holds a control character (U+{ord(char):04X}): class names must be single lines"
    return None


def check_distinct_labels(labels: Iterable[str], what: str = "labels") -> None:
    """Refuses two names that differ only by Unicode normalisation (NFC/NFD) or surrounding spaces.

    A folder copied from macOS (NFD) next to one typed elsewhere (NFC) looks
    like one class and would silently become two.
    """
    from visiontune.components.image_listing import PrepareError  # which imports this module

    first: Dict[str, str] = {}
    for label in labels:
        key = unicodedata.normalize("NFC", label.strip())
        other = first.setdefault(key, label)
        if other != label:
            raise PrepareError(f"{what} {ascii(other)} and {ascii(label)} differ only by Unicode "
                               "normalisation (NFC/NFD) or surrounding spaces: rename one")


def choose_classes(data: "DataConfig", items: Sequence[_Item]) -> List[str]:
    """The given class list, else every label found (no two alike), sorted naturally."""
    if data.classes:
        return list(data.classes)
    labels = sorted({item.label for item in items}, key=natural_key)
    check_distinct_labels(labels, "class names")
    return labels


def drop_unknown_labels(items: List[_Item], classes: Sequence[str], explicit: bool
                         ) -> Tuple[List[_Item], List[Tuple[str, str]]]:
    if not explicit:
        return items, []
    known = set(classes)
    alike = {unicodedata.normalize("NFC", c.strip()): c for c in classes}
    rejects = []
    for item in (i for i in items if i.label not in known):
        near = alike.get(unicodedata.normalize("NFC", item.label.strip()))
        hint = f" (it differs from {ascii(near)} only by Unicode normalisation or spaces)" if near else ""
        rejects.append((item.path, f"label {item.label!r} is not in data.classes{hint}"))
    return [i for i in items if i.label in known], rejects
