"""``setting``: a dataclass field that says which values it takes."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Sequence


def setting(default: Any, *, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None, choices: Sequence[str] = (),
            required: bool = False, regex: bool = False, expect: str = "") -> Any:
    """A dataclass field whose metadata says which values it takes.

    Bounds apply to a number, or to every number of a list.  ``required``: not
    empty.  ``regex``: a Python regular expression.  ``expect``: the wording of
    the allowed values when the bounds alone would say it wrongly.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices),
            "required": required, "regex": regex, "expect": expect}
    meta = {k: v for k, v in meta.items() if v is not None and v is not False and v != () and v != ""}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


FRACTION = dict(ge=0.0, le=1.0)  # a share or probability in [0, 1]
