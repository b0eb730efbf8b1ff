"""Training progress: a tqdm bar on a terminal, periodic plain lines otherwise.

A tqdm bar redrawn with carriage returns becomes one huge line in a log file, so when the stream
is not a TTY (a log file, a pipe, a batch job) :class:`LineProgress` prints one line at every
``every`` fraction of the total steps (10 % by default) and one at the end.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, TextIO

from tqdm.auto import tqdm


class LineProgress:
    """The subset of the tqdm interface the trainer uses (``update``, ``set_postfix``, ``write``,
    ``close``), printing ``[desc] step 60/600 (10%), epoch=0 loss=0.53, 12.3 steps/s, eta 0:00:44``.

    Args:
        total: steps of the whole stage; initial: steps already done (a resumed run).
        desc: the stage name; every: fraction of ``total`` between two lines (0 < every <= 1).
        stream: where lines go (default stderr); clock: seconds (injectable for tests).
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", every: float = 0.1,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.n, self.desc = int(total), int(initial), desc
        self.stride = max(1, math.ceil(self.total * every))
        self.stream, self.clock = stream or sys.stderr, clock
        self.start, self.start_n, self.last = clock(), self.n, self.n
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n // self.stride > self.last // self.stride or self.n >= self.total > self.last:
            self._emit()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or self.stream, flush=True)

    def close(self) -> None:
        if self.n != self.last:
            self._emit()

    def _emit(self) -> None:
        self.last = self.n
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        post = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        self.write(f"[{self.desc}] step {self.n}/{self.total} ({pct:.0f}%){', ' + post if post else ''}, "
                   f"{rate:.3g} steps/s, eta {eta_text}")


def progress_bar(total: int, initial: int, desc: str, enabled: bool, stream: TextIO | None = None) -> Any:
    """tqdm on a terminal; :class:`LineProgress` when ``stream`` (default stderr) is not a TTY;
    a disabled tqdm (which still ``write``\\ s) when ``enabled`` is false."""
    stream = stream or sys.stderr
    if enabled and not _isatty(stream):
        return LineProgress(total, initial, desc, stream=stream)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=stream, dynamic_ncols=True,
                disable=not enabled)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
