"""Small run-time helpers of every command: the device, stage timing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def timed(timing: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timing[stage]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - start
