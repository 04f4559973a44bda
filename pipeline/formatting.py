"""Numbers as the report and the comparison show them, in HTML and Markdown alike."""

from __future__ import annotations

from typing import Any


def num(value: Any, digits: int = 4) -> str:
    """A float with ``digits`` decimals, anything else as is, None as ""."""
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fmt(value: Any, pattern: str) -> str:
    """``pattern.format(value)``, None as ""."""
    return "" if value is None else pattern.format(value)


def thousands(value: Any) -> str:
    """An integer with thousands separators (``1,234,567``), None as ""."""
    return "" if value is None else f"{int(value):,}"


def size(n: float) -> str:
    """Bytes as ``12 B``, ``3.0 MiB``, ..."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
