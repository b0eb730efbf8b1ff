"""Small file helpers shared by every layer: atomic writes and checked JSON / JSON-lines reads.

The one place lorkd reads its JSON files (``read_json``: one object; ``read_jsonl``: one object a
line, e.g. ``history.jsonl``), so that every reader reports a bad file the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import DataError


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Create ``path`` by calling ``write(tmp)`` on a temporary file beside it, then renaming.

    A reader never sees a half-written file, and a crash leaves the previous file intact. The file
    gets the mode an ordinary ``open(path, "w")`` would give (0666 less the umask, usually 0644),
    not the 0600 of :func:`tempfile.mkstemp`; folders are created 0777 less the umask (0755).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # after write: some writers replace the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask (from ``/proc/self/status`` on Linux, else by setting and restoring it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=_jsonable)))


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object.

    Raises:
        DataError: the file is missing, is not valid JSON, or does not hold an object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (e.g. ``history.jsonl``). Blank lines are skipped, and so is
    an unparsable *last* line when the file does not end in a newline (a write cut short by a crash).

    Raises:
        DataError: the file is missing, or a line (other than such a last one) is not valid JSON or
            not a JSON object; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text()
    lines = text.split("\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last and not text.endswith("\n"):
                break
            raise DataError(f"{path}:{i + 1}: not valid JSON ({err})") from err
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
