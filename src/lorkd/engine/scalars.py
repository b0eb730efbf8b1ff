"""Optional TensorBoard scalars (config ``logging.tensorboard: true``).

:class:`ScalarLog` writes every numeric field of an epoch's history row (``loss``, ``lr``,
``loss/<task>``, ``val/<metric>``, ...) with ``add_scalar(tag, value, global_step)`` to any
writer with that method (``torch.utils.tensorboard.SummaryWriter`` in a run). The tensorboard
package is optional: asking for it without the package is a :class:`~lorkd.errors.ConfigError`
raised before training starts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SKIP = ("epoch", "step", "stage")


def tensorboard_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``.

    Raises:
        ConfigError: the tensorboard package is not installed (names ``logging.tensorboard``).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError("logging.tensorboard: true needs the tensorboard package, which is not installed "
                          f"(pip install tensorboard), or set logging.tensorboard: false ({err})") from err
    return SummaryWriter


class ScalarLog:
    """Epoch rows -> scalars. ``writer`` needs ``add_scalar(tag, value, step)``; ``flush()`` and
    ``close()`` are called when it has them."""

    def __init__(self, writer: Any, prefix: str = "") -> None:
        self.writer, self.prefix = writer, prefix

    def epoch(self, row: dict[str, Any]) -> None:
        """Write the numeric, finite fields of ``row`` at step ``row["step"]``."""
        step = int(row.get("step", row.get("epoch", 0)))
        for key, value in row.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.writer.add_scalar(f"{self.prefix}{key}", float(value), step)
        if hasattr(self.writer, "flush"):
            self.writer.flush()

    def close(self) -> None:
        if hasattr(self.writer, "close"):
            self.writer.close()


def open_tensorboard(folder: str | Path) -> ScalarLog:
    """A :class:`ScalarLog` writing event files to ``folder`` (raises ``ConfigError`` without tensorboard)."""
    return ScalarLog(tensorboard_writer_class()(log_dir=str(folder)))
