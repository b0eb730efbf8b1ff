"""Formatting primitives of the reports: metric values, counts and GitHub markdown tables.

Kept apart from :mod:`lorkd.report.markdown` so that the report's sections (e.g.
:mod:`lorkd.report.search`) can use them without importing the report that includes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .plots import to_float

__all__ = ["fmt_count", "fmt_interval", "fmt_value", "markdown_table"]


def fmt_value(value: Any, digits: int = 3) -> str:
    """A metric value for a table: ``n/a`` for missing/None/NaN/non-numeric, ``inf`` / ``-inf``,
    one decimal from 100 up, else ``digits`` decimals."""
    v = to_float(value)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.{digits}f}"


def _signed(v: float) -> str:
    text = fmt_value(v)
    return text if text == "n/a" or text.startswith("-") else "+" + text


def fmt_interval(iv: Mapping[str, Any] | None, signed: bool = False) -> str:
    """``"0.871 [0.830, 0.910]"`` (value and 95% interval); ``n/a`` without one."""
    if not iv:
        return "n/a"
    f = _signed if signed else fmt_value
    return f"{f(to_float(iv.get('value')))} [{f(to_float(iv.get('low')))}, {f(to_float(iv.get('high')))}]"


def fmt_count(value: Any) -> str:
    """A large count with a unit suffix: ``11176512 -> "11.18M"``; ``n/a`` when missing."""
    v = to_float(value)
    if not math.isfinite(v):
        return "n/a"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}" if v == int(v) else f"{v:.3g}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``|`` and newlines inside cells are escaped. ``align`` holds one
    of ``l``/``r``/``c`` per column (default: first column left, the rest right)."""
    align = align or ("l" + "r" * (len(header) - 1))
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join(marks.get(a, "---") for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
