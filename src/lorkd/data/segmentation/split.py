"""Patient-wise splits of cases, and split files (``{name: [case_id, ...]}`` JSON)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorkd.errors import ConfigError, DataError
from lorkd.fileio import read_json, write_json

__all__ = ["split_cases", "save_split", "load_split", "apply_split"]


DEFAULT_SPLIT_NAMES = {2: ("train", "test"), 3: ("train", "val", "test")}


def _largest_remainder(fractions: Sequence[float], total: int) -> list[int]:
    exact = [f * total for f in fractions]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    # every split asked for (fraction > 0) gets at least one patient when there are enough
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def split_cases(
    items: Sequence[Any],
    fractions: Sequence[float] | Mapping[str, float] | None = (0.6, 0.2, 0.2),
    *,
    counts: Sequence[int | None] | Mapping[str, int | None] | None = None,
    names: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, list]:
    """Split cases (``Case``/``CaseRef``: anything with ``case_id`` and ``patient_id``) by patient.

    Patients (sorted by id, then shuffled with ``numpy.random.default_rng(seed)``) are dealt into
    splits by ``fractions`` (largest-remainder rounding; each split with a positive fraction gets at
    least one patient when there are enough) or by ``counts`` (patients per split; one ``None``
    entry takes the rest). Names default to ``train/test`` (2 splits) or ``train/val/test`` (3),
    or come from the keys of a mapping. The result maps name -> items sorted by ``case_id``; it
    depends only on the set of items and the seed, not on their order. No patient is in two splits.

    Raises ConfigError for bad fractions/counts/names.
    """
    if counts is not None:
        spec: Sequence = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
        keys = list(counts.keys()) if isinstance(counts, Mapping) else None
    elif fractions is not None:
        spec = list(fractions.values()) if isinstance(fractions, Mapping) else list(fractions)
        keys = list(fractions.keys()) if isinstance(fractions, Mapping) else None
    else:
        raise ConfigError("split_cases needs fractions or counts")
    if names is None:
        names = keys or DEFAULT_SPLIT_NAMES.get(len(spec))
        if names is None:
            raise ConfigError(f"split_cases: give names for {len(spec)} splits")
    names = list(names)
    if len(names) != len(spec) or len(set(names)) != len(names):
        raise ConfigError(f"split_cases: names {names} do not match {len(spec)} splits")
    patients = sorted({str(it.patient_id) for it in items})
    n = len(patients)
    if counts is not None:
        if sum(c is None for c in spec) > 1:
            raise ConfigError(f"split_cases: at most one count may be None, got counts={spec}")
        if any(c is not None and (not isinstance(c, (int, np.integer)) or c < 0) for c in spec):
            raise ConfigError(f"split_cases: counts must be non-negative integers, got {spec}")
        fixed = sum(c for c in spec if c is not None)
        if fixed > n or (None not in spec and fixed != n):
            raise ConfigError(f"split_cases: counts {spec} do not add up to the {n} patients")
        sizes = [n - fixed if c is None else int(c) for c in spec]
    else:
        if any(not isinstance(f, (int, float)) or f < 0 or not math.isfinite(f) for f in spec):
            raise ConfigError(f"split_cases: fractions must be non-negative numbers, got {spec}")
        if abs(sum(spec) - 1.0) > 1e-6:
            raise ConfigError(f"split_cases: fractions {spec} must add up to 1")
        sizes = _largest_remainder(spec, n)
    order = [patients[i] for i in np.random.default_rng(seed).permutation(n)]
    where: dict[str, str] = {}
    start = 0
    for name, size in zip(names, sizes):
        for p in order[start : start + size]:
            where[p] = name
        start += size
    out: dict[str, list] = {name: [] for name in names}
    for it in sorted(items, key=lambda it: str(it.case_id)):
        out[where[str(it.patient_id)]].append(it)
    return out


def save_split(split: Mapping[str, Sequence[Any]], path: str | Path) -> Path:
    """Write a split as JSON ``{name: [case_id, ...]}`` (items or plain id strings); returns the path."""
    path = Path(path)
    data = {name: [x if isinstance(x, str) else str(x.case_id) for x in items]
            for name, items in split.items()}
    return write_json(path, data)  # atomic


def load_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split written by :func:`save_split`. Raises DataError for a missing/bad file or a
    case id listed in two splits."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    data = read_json(path)  # DataError naming the file: unreadable, not JSON, not an object
    seen: dict[str, str] = {}
    for name, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{path}: field {name!r} must be a list of case id strings")
        for i in ids:
            if i in seen:
                raise DataError(f"{path}: case {i!r} is in both {seen[i]!r} and {name!r}")
            seen[i] = name
    return data


def apply_split(items: Sequence[Any], split_ids: Mapping[str, Sequence[str]]) -> dict[str, list]:
    """Map a ``{name: [case_id]}`` split back onto items. Raises DataError for an unknown case id."""
    by_id = {str(it.case_id): it for it in items}
    out = {}
    for name, ids in split_ids.items():
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"split {name!r} lists unknown case id(s) {missing[:5]}")
        out[name] = [by_id[i] for i in ids]
    return out
