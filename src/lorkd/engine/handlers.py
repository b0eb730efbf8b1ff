"""What the training loop does besides the optimiser step: handlers called at the loop's events.

:class:`~lorkd.engine.loop.TrainingLoop` fires these events, each as ``handler.<event>(loop)``:

* ``started``: once, before the first epoch (also when a resumed run has nothing left to do);
* ``epoch_started``: at the start of every epoch (also of a resumed, half-done one);
* ``iteration_started``: before every optimiser step (``loop.state.batch``: the batch on the device);
* ``iteration_completed``: after it (``loop.state.loss``: its :class:`~lorkd.engine.loop.StepLoss`,
  ``loop.state.global_step`` counts it);
* ``epoch_completed``: at the end of every epoch (``loop.state.row``: the epoch's history row,
  which handlers may extend);
* ``completed``: after the last epoch (not after an error);

and ``close(loop)`` at the very end, error or not. :class:`ValidationHandler` fires one more event,
``validation_started``, at each epoch end right before it evaluates ``loop.selected_model`` (e.g.
:class:`~lorkd.engine.norms.NormStatistics` recomputes that model's BatchNorm statistics there).
 A handler is any object with some of these
methods (:class:`Handler` has them all, doing nothing); the loop calls the handlers in list order
on every rank, so a handler that writes files checks ``loop.ctx.is_main``. A handler that sets
``loop.state.stop = True`` ends training after the current epoch.

:func:`lorkd.engine.fit` builds this list: :class:`ValidationHandler` (when it has ``evaluate``),
:class:`EarlyStopping` (``FitConfig.early_stop``), :class:`HistoryHandler`, :class:`ProgressHandler`,
the caller's ``handlers`` (e.g. :class:`ScalarsHandler` for TensorBoard), and :class:`CheckpointHandler` last, so that ``latest.pt`` holds what every handler did in the epoch.

A handler with a ``state_key`` attribute and ``state_dict()`` / ``load_state_dict(state)`` methods
has its state saved in ``checkpoints/latest.pt`` (under ``handlers[state_key]``) and restored on
resume, before ``started``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from lorkd.errors import ConfigError
from lorkd.fileio import write_atomic

from .distributed import DistributedContext
from .progress import progress_bar

if TYPE_CHECKING:  # annotations only: loop imports this module
    from .loop import TrainingLoop

__all__ = [
    "EVENTS", "CheckpointHandler", "EarlyStopping", "Handler", "HistoryHandler", "ProgressHandler",
    "ScalarsHandler", "ValidationHandler",
]

#: The loop's events, in the order they first fire.
EVENTS = ("started", "epoch_started", "iteration_started", "iteration_completed", "epoch_completed", "completed")


class Handler:
    """Base class with a no-op method per event (subclass and override the ones you need)."""

    def started(self, loop: TrainingLoop) -> None: ...

    def epoch_started(self, loop: TrainingLoop) -> None: ...

    def iteration_started(self, loop: TrainingLoop) -> None: ...

    def iteration_completed(self, loop: TrainingLoop) -> None: ...

    def epoch_completed(self, loop: TrainingLoop) -> None: ...

    def completed(self, loop: TrainingLoop) -> None: ...

    def close(self, loop: TrainingLoop) -> None: ...

    def validation_started(self, loop: TrainingLoop) -> None: ...


class ValidationHandler(Handler):
    """At each epoch end: fires ``validation_started``, then ``evaluate(loop.selected_model)`` (the
    plain model, or the weight average with ``FitConfig.ema``) on rank 0 (eval mode, ``no_grad``; other ranks
    wait), broadcast, added to the row as ``val/<metric>``; with ``cfg.select_metric`` an
    improvement updates ``loop.state.best``, sets ``loop.state.improved`` and writes ``best.pt``."""

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float]]) -> None:
        self.evaluate = evaluate

    def epoch_completed(self, loop: TrainingLoop) -> None:
        s, cfg = loop.state, loop.cfg
        loop.fire("validation_started")
        metrics = run_evaluate(self.evaluate, loop.selected_model, loop.ctx)
        s.metrics = metrics
        s.row.update({f"val/{k}": v for k, v in metrics.items()})
        if cfg.select_metric is None:
            return
        if cfg.select_metric not in metrics:
            raise ConfigError(f"select_metric {cfg.select_metric!r} is not among the metrics "
                              f"evaluate() returned: {sorted(metrics)}")
        value = metrics[cfg.select_metric]
        if improves(value, s.best, cfg.select_mode):
            s.best = {"metric": cfg.select_metric, "value": value, "epoch": s.epoch, "metrics": metrics}
            s.improved = True
            if loop.ctx.is_main:
                loop.manager.save_best(loop.best_state())


class EarlyStopping(Handler):
    """Stop when the selection metric has not improved by more than ``min_delta`` for ``patience``
    epochs in a row.

    Counts the epochs since the last improvement: with ``min_delta`` 0 an epoch improves when it
    sets a new best (``loop.state.improved``, set by :class:`ValidationHandler`); otherwise when it
    beats the value of the last improving epoch by more than ``min_delta`` (a non-finite value
    never improves). The count goes into the epoch's history row (``early_stop_wait``; and
    ``early_stop: true`` in the epoch that stops). When it reaches ``patience`` the handler sets
    ``loop.state.stop``, so the epoch is logged and checkpointed and training ends. Its state is
    checkpointed (``state_key``), so a resumed run stops at the same epoch, and resuming a run
    that stopped trains no further (unless ``patience`` was raised).
    """

    state_key = "early_stop"

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ConfigError(f"early_stop must be >= 1 or None, got {patience!r}")
        if not min_delta >= 0:
            raise ConfigError(f"early_stop min_delta must be >= 0, got {min_delta!r}")
        self.patience, self.min_delta, self.wait = int(patience), float(min_delta), 0
        self.reference: float | None = None  # the value of the last improving epoch (min_delta > 0)
        self.note = ""  # the stop line, printed when training ends (after the epoch's metrics)

    def started(self, loop: TrainingLoop) -> None:
        if self.wait >= self.patience:  # resumed after the stop
            loop.state.stop = True

    def _improved(self, loop: TrainingLoop) -> bool:
        if self.min_delta == 0:
            return loop.state.improved
        value = float((loop.state.metrics or {}).get(loop.cfg.select_metric, math.nan))
        if not math.isfinite(value):
            return False
        sign = 1.0 if loop.cfg.select_mode == "max" else -1.0
        if self.reference is not None and sign * (value - self.reference) <= self.min_delta:
            return False
        self.reference = value
        return True

    def epoch_completed(self, loop: TrainingLoop) -> None:
        self.wait = 0 if self._improved(loop) else self.wait + 1
        loop.state.row["early_stop_wait"] = self.wait
        if self.wait < self.patience:
            return
        loop.state.stop = True
        loop.state.row["early_stop"] = True
        best = loop.state.best
        since = f"best {best['value']:.4g} at epoch {best['epoch']}" if best else "no finite value yet"
        self.note = (f"[{loop.cfg.stage}] early stop after epoch {loop.state.epoch}: {loop.cfg.select_metric} has not "
                     f"improved for {self.wait} epoch(s) ({since})")

    def completed(self, loop: TrainingLoop) -> None:
        """Print the stop line once training ends: after the stopping epoch's own line (the
        progress handler writes that one in ``epoch_completed``, after this handler)."""
        if self.note and loop.ctx.is_main:
            print(self.note, file=sys.stderr, flush=True)
        self.note = ""

    def state_dict(self) -> dict[str, Any]:
        return {"wait": self.wait} if self.min_delta == 0 else {"wait": self.wait, "reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = int(state.get("wait", 0))
        self.reference = state.get("reference")


class HistoryHandler(Handler):
    """Appends each epoch's row to ``loop.state.history``; rank 0 appends it to ``history.jsonl``
    and rewrites ``history.csv`` (on resume first rewrites both from the checkpoint's history:
    the files may hold an epoch logged after the checkpoint was written)."""

    def started(self, loop: TrainingLoop) -> None:
        if loop.resumed and loop.ctx.is_main:
            write_history(loop.out_dir, loop.state.history)

    def epoch_completed(self, loop: TrainingLoop) -> None:
        loop.state.history.append(loop.state.row)
        if loop.ctx.is_main:
            append_history(loop.out_dir, loop.state.history)


class ProgressHandler(Handler):
    """The progress bar or lines of :func:`~lorkd.engine.progress.progress_bar` (shown on rank 0
    when ``cfg.progress``), and one line per epoch with its row (always, on rank 0)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def started(self, loop: TrainingLoop) -> None:
        s, cfg = loop.state, loop.cfg
        done = s.epoch * s.steps_per_epoch + getattr(loop.sampler, "batches_done", 0)
        self.bar = progress_bar(s.steps_per_epoch * cfg.epochs, done, cfg.stage, cfg.progress and loop.ctx.is_main)

    def iteration_completed(self, loop: TrainingLoop) -> None:
        self.bar.set_postfix(epoch=loop.state.epoch, loss=f"{loop.state.loss_value:.4g}", refresh=False)
        self.bar.update(1)

    def epoch_completed(self, loop: TrainingLoop) -> None:
        if loop.ctx.is_main:
            self.bar.write(format_row(loop.state.row), file=sys.stderr)

    def close(self, loop: TrainingLoop) -> None:
        if self.bar is not None:
            self.bar.close()


class ScalarsHandler(Handler):
    """``scalars.epoch(row)`` on rank 0 at each epoch end, ``scalars.close()`` (when it has one) at
    the loop's end, error or not (e.g. a :class:`~lorkd.engine.scalars.ScalarLog` writing
    TensorBoard scalars: :func:`~lorkd.engine.scalars.open_tensorboard`)."""

    def __init__(self, scalars: Any) -> None:
        self.scalars = scalars

    def epoch_completed(self, loop: TrainingLoop) -> None:
        if loop.ctx.is_main:
            self.scalars.epoch(loop.state.row)

    def close(self, loop: TrainingLoop) -> None:
        if hasattr(self.scalars, "close"):
            self.scalars.close()


class CheckpointHandler(Handler):
    """``checkpoints/latest.pt`` (atomic, rank 0 writes, every rank takes part: the RNG states are
    gathered) every ``cfg.checkpoint_every`` steps, except on an epoch's last step, and at every
    epoch end."""

    def iteration_completed(self, loop: TrainingLoop) -> None:
        every = loop.cfg.checkpoint_every
        last_of_epoch = loop.sampler.batches_done >= loop.state.steps_per_epoch
        if every and loop.state.global_step % every == 0 and not last_of_epoch:
            loop.save_latest(finished=False)

    def epoch_completed(self, loop: TrainingLoop) -> None:
        loop.save_latest(finished=True)


# ---------------------------------------------------------------------------------------------
# helpers
def run_evaluate(evaluate: Callable[[nn.Module], dict[str, float]], model: nn.Module,
                 ctx: DistributedContext) -> dict[str, float]:
    """``evaluate(model)`` on rank 0 in eval mode under ``no_grad`` (train mode restored), as a
    ``{str: float}`` dict broadcast to every rank."""
    metrics: dict[str, float] | None = None
    if ctx.is_main:
        model.eval()
        try:
            with torch.no_grad():
                raw = evaluate(model)
        finally:
            model.train()
        metrics = {str(k): float(v) for k, v in dict(raw).items()}
    ctx.barrier()
    return ctx.broadcast_object(metrics)


def improves(value: float, best: dict[str, Any] | None, mode: str) -> bool:
    """Whether ``value`` beats ``best["value"]`` (``mode`` ``"max"``/``"min"``); NaN/inf never do."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best["value"] if mode == "max" else value < best["value"]


def write_history(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite history.jsonl and history.csv from ``history``."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    write_atomic(out_dir / "history.jsonl", lambda tmp: Path(tmp).write_text(text))
    _write_csv(out_dir, history)


def append_history(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """Append the last row to history.jsonl and rewrite history.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "history.jsonl", "a") as fh:
        fh.write(json.dumps(history[-1]) + "\n")
    _write_csv(out_dir, history)


def _history_columns(history: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in history:
        cols.extend(k for k in row if k not in cols)
    return cols


def _write_csv(out_dir: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_history_columns(history), restval="")
    writer.writeheader()
    writer.writerows(history)
    write_atomic(out_dir / "history.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))


def format_row(row: dict[str, Any]) -> str:
    """The one-line summary of an epoch's row (per-task losses, stage and step left out)."""
    skip = {"stage", "step"}
    bits = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            if k not in skip and not k.startswith("loss/")]
    return f"[{row.get('stage')}] " + " ".join(bits)
