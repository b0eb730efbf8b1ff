"""Checkpoints, RNG state and run folders.

* :func:`save_checkpoint` / :func:`load_checkpoint`: ``torch.save`` through a temporary file and
  ``os.replace`` (a crash mid-write leaves the previous file intact); loading turns a missing,
  truncated or corrupt file into a :class:`~lorkd.errors.DataError` naming it.
* :class:`CheckpointManager`: ``<folder>/latest.pt`` and ``<folder>/best.pt``.
* :func:`capture_rng_state` / :func:`restore_rng_state`: Python, NumPy, torch CPU and CUDA RNGs,
  stored as plain ints, lists and tensors.
* :func:`prepare_run_dir`: create an output folder, refusing to mix two runs in one.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorkd.errors import ConfigError, DataError
from lorkd.fileio import write_atomic

__all__ = [
    "CheckpointManager",
    "RUN_MARKER",
    "RUN_OUTPUTS",
    "capture_rng_state",
    "load_checkpoint",
    "prepare_run_dir",
    "restore_rng_state",
    "save_checkpoint",
]

#: File that :func:`prepare_run_dir` writes into a folder it created (or found empty).
RUN_MARKER = ".lorkd-run"

#: Entries (relative to a run folder) that lorkd's engine and pipelines write. Without the marker,
#: ``prepare_run_dir(..., overwrite=True)`` deletes exactly these (names or glob patterns) and nothing else.
RUN_OUTPUTS = (
    "checkpoints",      # latest.pt, best.pt (engine)
    "history.jsonl",    # per-epoch log (engine)
    "history.csv",      # the same as a table (engine)
    "final.pt",         # final weights (scripts)
    "metrics.json",     # evaluation results (pipelines)
    "experts",          # exported experts (pipelines)
    "report.md",        # report (pipelines)
    "config.yaml",      # resolved config (pipelines)
    "plots",            # figures (report)
    "timing.json",      # seconds per stage (pipelines)
    "split_*.json",     # case splits of the segmentation recipe (a glob pattern)
    "train_cases_*.json",  # the training cases data.max_train kept (segmentation recipe)
    "teacher",          # stage folders (pipelines)
    "student",
    "baselines",
    RUN_MARKER,
)


# ---------------------------------------------------------------------------------------------
# files
def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` with ``torch.save`` (temporary file beside ``path``, then rename).

    If writing fails the previous ``path`` (if any) is left as it was and no temporary file remains.
    ``state`` must hold only tensors and plain containers (dicts, lists, tuples, strings, numbers,
    ``None``): :func:`load_checkpoint` reads with ``weights_only=True``.
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    return write_atomic(path, lambda tmp: torch.save(state, tmp))


# What torch.load raises on a truncated, corrupt or foreign file.
_LOAD_ERRORS = (
    RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError,
    TypeError, AttributeError, ImportError, IndexError, KeyError, UnicodeDecodeError,
)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        DataError: the file is missing, truncated or corrupt, holds pickled objects other than
            tensors and plain containers (``weights_only=True``), or does not hold a dict; the
            message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        # weights_only=True: only tensors and plain containers (dict, list, tuple, str, numbers,
        # None) are unpickled, so a foreign file cannot run code. lorkd's checkpoints hold
        # nothing else (RNG states are stored as ints, lists and tensors).
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err).lower().replace(" ", "_"):
            raise DataError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                            f"({type(err).__name__}: {err})") from err
        raise DataError(f"{path}: the checkpoint holds objects other than tensors and plain containers; "
                        "lorkd reads checkpoints with torch.load(weights_only=True) and will not unpickle "
                        f"them ({_unsupported_global(err)})") from err
    except _LOAD_ERRORS as err:
        raise DataError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                        f"({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a checkpoint dict, found {type(state).__name__}")
    return state


def _unsupported_global(err: Exception) -> str:
    """The ``Unsupported global: GLOBAL x.y`` part of torch's weights-only error, if any."""
    for line in str(err).splitlines():
        if "Unsupported global" in line:
            return line.strip().split(" was not", 1)[0].removeprefix("WeightsUnpickler error: ")
    return "weights-only load failed"


class CheckpointManager:
    """``latest.pt`` (to resume) and ``best.pt`` (best validation score) in one folder.

    The folder is created on the first save.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def latest_path(self) -> Path:
        return self.folder / "latest.pt"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pt"

    def save_latest(self, state: dict[str, Any]) -> Path:
        """Atomically write ``state`` to :attr:`latest_path`."""
        return save_checkpoint(self.latest_path, state)

    def save_best(self, state: dict[str, Any]) -> Path:
        """Atomically write ``state`` to :attr:`best_path`."""
        return save_checkpoint(self.best_path, state)

    def has_latest(self) -> bool:
        return self.latest_path.is_file()

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """:func:`load_checkpoint` of :attr:`latest_path` (raises ``DataError``)."""
        return load_checkpoint(self.latest_path, map_location)


# ---------------------------------------------------------------------------------------------
# RNG
def capture_rng_state() -> dict[str, Any]:
    """The state of Python's ``random``, NumPy's global RNG, torch CPU and (if available) CUDA RNGs.

    Everything is stored as ints, lists, strings and uint8 tensors.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`capture_rng_state`'s result.

    Raises:
        DataError: a key is missing or malformed.
    """
    try:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.int64).astype(np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached_gaussian"])))
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise DataError(f"restore_rng_state: malformed RNG state ({type(err).__name__}: {err})") from err
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(f"restore_rng_state: the state holds {len(cuda)} CUDA RNG states but "
                          f"{torch.cuda.device_count()} devices are visible; CUDA RNGs not restored", stacklevel=2)


# ---------------------------------------------------------------------------------------------
# run folders
def prepare_run_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the output folder of a run and return it.

    * It does not exist, or is empty (or holds only the marker): it is created and marked with a
      ``.lorkd-run`` file.
    * It holds files and neither flag is set: :class:`~lorkd.errors.ConfigError`.
    * ``resume=True``: it is used as it is (the caller resumes from its ``checkpoints/latest.pt``).
    * ``overwrite=True``: with the ``.lorkd-run`` marker (a folder this function created), the whole
      folder is deleted and recreated. Without it, only the entries in :data:`RUN_OUTPUTS` are
      deleted and anything else is left in place (with a warning naming it); the marker is then
      written only if the folder ended up empty, so a later overwrite never deletes foreign files.

    Raises:
        ConfigError: both flags are set; ``path`` is a file; the folder holds another run's output
            and neither flag is set.
    """
    path = Path(path)
    if overwrite and resume:
        raise ConfigError(f"{path}: pass either --overwrite or --resume, not both")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder")
    entries = [p for p in path.iterdir() if p.name != RUN_MARKER] if path.is_dir() else []
    if entries and not (overwrite or resume):
        names = ", ".join(sorted(p.name for p in entries)[:5])
        raise ConfigError(f"{path}: the folder holds another run's output ({names}{', ...' if len(entries) > 5 else ''}); "
                          f"pass --overwrite to replace it or --resume to continue it")
    if entries and overwrite:
        if (path / RUN_MARKER).is_file():
            shutil.rmtree(path)
        else:
            for target in (t for name in RUN_OUTPUTS for t in path.glob(name)):
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            left = sorted(p.name for p in path.iterdir())
            if left:
                warnings.warn(f"{path}: --overwrite removed lorkd's outputs but left files it did not write: "
                              f"{', '.join(left[:10])}", stacklevel=2)
    path.mkdir(parents=True, exist_ok=True)
    if not any(p.name != RUN_MARKER for p in path.iterdir()) and not (path / RUN_MARKER).exists():
        (path / RUN_MARKER).write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return path
