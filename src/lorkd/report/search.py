"""The ``student.distill.search`` grid of a run (``search.json``) as a markdown section.

>>> print(search_table(read_json("runs/x/search.json")))
| candidate | kd_weight | temperature | feat_weight | val acc breast | val acc pneumonia | val acc mean | chosen |
...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lorkd.errors import DataError
from lorkd.fileio import read_json

from .tables import fmt_value, markdown_table

__all__ = ["search_section", "search_table"]


def search_table(search: Mapping[str, Any]) -> str:
    """One row per candidate: its settings, its validation metric per task and mean, and a
    ``yes`` in the ``chosen`` column for the winner (whose mean is also in bold). A ``feat_weight``
    of ``None`` (not searched) prints ``as configured``.

    Raises:
        DataError: ``search`` has no ``candidates`` list.
    """
    rows = search.get("candidates")
    if not isinstance(rows, list):
        raise DataError("search.json has no 'candidates' list")
    metric = search.get("metric", "metric")
    tasks = list(search.get("tasks") or (rows[0].get("val", {}) if rows else {}))
    header = ["candidate", "kd_weight", "temperature", "feat_weight", *(f"val {metric} {t}" for t in tasks),
              f"val {metric} mean", "chosen"]
    body = []
    for r in rows:
        fw = "as configured" if r.get("feat_weight") is None else f"{r['feat_weight']:g}"
        mean = fmt_value(r.get("val_mean"))
        body.append([r.get("id", ""), f"{r.get('kd_weight', float('nan')):g}", f"{r.get('temperature', float('nan')):g}",
                     fw, *(fmt_value((r.get("val") or {}).get(t)) for t in tasks),
                     f"**{mean}**" if r.get("chosen") else mean, "yes" if r.get("chosen") else ""])
    return markdown_table(header, body, "l" + "r" * (len(header) - 2) + "c")


def search_section(run_dir: str | Path) -> list[str]:
    """The report lines of ``run_dir/search.json`` (none when the run had no search)."""
    path = Path(run_dir) / "search.json"
    if not path.is_file():
        return []
    search = read_json(path)
    lines = ["## Distillation settings chosen on validation", "",
             f"`student.distill.search`: {len(search.get('candidates', []))} candidates, "
             f"{search.get('epochs')} epochs each, scored on the validation split only (the test split "
             f"was not read); {search.get('final', '')}.", "", search_table(search), ""]
    return lines
