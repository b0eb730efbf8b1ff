"""Where the real data sets live: ``../shared/data`` beside the checkout, or ``$LORKD_DATA``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError


def shared_data_dir() -> Path:
    """Return the folder holding the real data (``$LORKD_DATA`` if set, else ``<repo>/../shared/data``).

    The path is returned whether or not it exists; callers check what they need.
    """
    env = os.environ.get("LORKD_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    return repo.parent / "shared" / "data"


def locate(path: str | Path, key: str) -> Path:
    """``path`` as given, or (relative and absent) under :func:`shared_data_dir`.

    Raises:
        DataError: neither exists; the message names the config ``key`` and every place searched.
    """
    given = Path(path).expanduser()
    places = [given.absolute()] + ([] if given.is_absolute() else [shared_data_dir() / given])
    for place in places:
        if place.exists():
            return place
    raise DataError(f"{key}: {str(path)!r} not found; looked in: {', '.join(map(str, places))}")
