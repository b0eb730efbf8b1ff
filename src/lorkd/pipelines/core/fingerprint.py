"""Stage fingerprints: which config a stage folder's network was trained with.

Every stage (``teacher``, ``student``, each ``baselines/...`` model) writes ``fingerprint.json``
into its folder when its training starts: the dotted config keys it depends on and their values
(``{"stage": "student", "config": {"student.train.epochs": 10, ...}, "sha256": ...}``). A later
command that would reuse or resume the folder compares it with its own config and refuses when
they differ, listing each differing key as ``key: old -> new``, unless the user accepts with
``--reuse`` (then the reuse and the differences are recorded in the report).

A stage depends on the data section, the seed, and its own network and training sections:

* ``teacher``: ``data``, ``seed``, ``teacher``;
* ``student`` and ``baselines/student_nokd``: the above plus ``student``;
* ``baselines/mola_grad``: the same without ``student.router``;
* ``baselines/stl|mtl``: ``data``, ``seed``, ``student.net``, ``student.train``;
* ``baselines/stl_kd|mtl_kd``: the above plus ``teacher`` and ``student.distill``;
* ``search/cNN`` (a candidate of ``student.distill.search``): as ``baselines/mola_grad``.

Keys that do not change a trained network (``device``, ``num_workers``, ``evaluate``,
``export``, ``logging``, ``baselines.run``, ``trust_code``) are not part of any fingerprint. The
fingerprint covers the config only, not the bytes of the data files it names, with one exception:
``data.select`` is left out, and a run whose ``data.max_train`` subset was chosen on a teacher's
features (``data.select.method`` other than ``random``) adds ``data.selection`` instead, the sha256
of the chosen indices, the method and the teacher's weights (``extra``, from ``RunState``): a
changed selection changes every stage's fingerprint, a random one leaves them as they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ...config import to_dict
from ...fileio import read_json, write_json

FINGERPRINT = "fingerprint.json"

_COMMON = ("data", "seed")
_PREFIXES = {
    "teacher": _COMMON + ("teacher",),
    "student": _COMMON + ("teacher", "student"),
    "student_nokd": _COMMON + ("teacher", "student"),
    "mola_grad": _COMMON + ("teacher", "student.net", "student.experts", "student.distill", "student.train"),
    "search": _COMMON + ("teacher", "student.net", "student.experts", "student.distill", "student.train"),
    "stl": _COMMON + ("student.net", "student.train"),
    "mtl": _COMMON + ("student.net", "student.train"),
    "stl_kd": _COMMON + ("teacher", "student.net", "student.train", "student.distill"),
    "mtl_kd": _COMMON + ("teacher", "student.net", "student.train", "student.distill"),
}


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2]}`` -> ``{"a.b": 1, "c": [2]}`` (lists are leaves; an empty
    mapping is kept as a leaf so that adding a key to it shows as a change)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def stage_kind(stage: str) -> str:
    """``"baselines/stl/breast"`` -> ``"stl"``; ``"teacher"`` -> ``"teacher"``."""
    parts = stage.split("/")
    return parts[1] if parts[0] == "baselines" and len(parts) > 1 else parts[0]


def stage_config(cfg: Any, stage: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dotted config keys (and values, as plain JSON data) that ``stage`` depends on, with
    ``extra`` (dotted keys of what the run derived from its config, e.g. ``data.selection``)."""
    flat = flatten(json.loads(json.dumps(to_dict(cfg), default=str)))
    flat = {k: v for k, v in flat.items() if not k.startswith("data.select.")} | dict(extra or {})
    prefixes = _PREFIXES[stage_kind(stage)]
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}


def digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def write_fingerprint(folder: Path, stage: str, cfg: Any, extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/fingerprint.json`` for ``stage`` trained with ``cfg`` (and ``extra``)."""
    config = stage_config(cfg, stage, extra)
    return write_json(Path(folder) / FINGERPRINT, {"stage": stage, "config": config, "sha256": digest(config)})


def read_fingerprint(folder: Path) -> dict[str, Any] | None:
    """The recorded fingerprint of ``folder``, or ``None`` when there is none
    (raises :class:`~lorkd.errors.DataError` for a corrupt file)."""
    path = Path(folder) / FINGERPRINT
    return read_json(path) if path.is_file() else None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["student.train.epochs: 10 -> 20", ...]`` for every key whose value differs (sorted);
    a key present on one side only shows ``(absent)`` on the other, unless it is null there (a key
    added to lorkd later, at its default null, matches a fingerprint written before it existed)."""
    missing = "(absent)"
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b and (a, b) not in ((missing, None), (None, missing)):
            out.append(f"{key}: {_show(a)} -> {_show(b)}")
    return out


def compare(folder: Path, stage: str, cfg: Any, extra: dict[str, Any] | None = None) -> list[str] | None:
    """Differences between ``folder``'s recorded fingerprint and ``cfg`` (and ``extra``; ``[]``:
    the same), or ``None`` when the folder has no fingerprint (made before fingerprints existed)."""
    recorded = read_fingerprint(folder)
    if recorded is None:
        return None
    return differences(recorded.get("config", {}), stage_config(cfg, stage, extra))


def _show(value: Any) -> str:
    return value if isinstance(value, str) and value == "(absent)" else json.dumps(value)
