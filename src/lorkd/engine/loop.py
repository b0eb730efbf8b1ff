"""The training loop itself: epochs of optimiser steps, firing events for the handlers.

:class:`TrainingLoop` owns what an optimiser step needs (model, objective, optimiser, schedule,
grad scaler, sampler) and a :class:`LoopState` (position, running sums, history, best score, the
current batch, row and stop flag). Everything else (validation, checkpoints, logs, progress,
early stopping) is a handler, see :mod:`lorkd.engine.handlers`. :func:`lorkd.engine.fit` builds
the loop, restores it on resume and runs it.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lorkd.data.batching import collate_task_batch
from lorkd.errors import TrainingError

from .checkpoint import CheckpointManager, capture_rng_state
from .distributed import DistributedContext, global_task_counts

__all__ = ["LoopState", "StepLoss", "TrainingLoop"]


@dataclass
class StepLoss:
    """What an objective returns for one batch.

    Attributes:
        total: scalar tensor with grad; the engine calls ``total.backward()``.
        per_task: ``{task_id: float}`` for the tasks in this rank's batch, as returned by
            :func:`~lorkd.engine.distributed.per_task_mean` (its sum over ranks divided by the world
            size is the task's global mean). Logged per epoch and used to name the task when the
            loss is not finite.
        parts: named components, e.g. ``{"ce": .., "kd": .., "feat": ..}`` (floats, logged per epoch).
    """

    total: Tensor
    per_task: dict[int, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)


class _EpochSums:
    """Running sums of one epoch on one rank (kept in checkpoints so a resumed epoch logs the same)."""

    def __init__(self) -> None:
        self.steps = 0
        self.total = 0.0
        self.parts: dict[str, float] = {}
        self.task_sum: dict[int, float] = {}
        self.task_steps: dict[int, int] = {}
        self.seconds = 0.0
        self._t0 = time.perf_counter()

    def add(self, total: float, parts: dict[str, float], per_task: dict[int, float], counts: Tensor) -> None:
        self.steps += 1
        self.total += total
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + float(v)
        for t, v in per_task.items():
            self.task_sum[int(t)] = self.task_sum.get(int(t), 0.0) + float(v)
        for t in torch.nonzero(counts > 0).flatten().tolist():
            self.task_steps[t] = self.task_steps.get(t, 0) + 1

    def state(self) -> dict[str, Any]:
        return {"steps": self.steps, "total": self.total, "parts": dict(self.parts),
                "task_sum": dict(self.task_sum), "task_steps": dict(self.task_steps),
                "seconds": self.seconds + time.perf_counter() - self._t0}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "_EpochSums":
        out = cls()
        out.steps, out.total, out.parts = int(s["steps"]), float(s["total"]), dict(s["parts"])
        out.task_sum = {int(k): float(v) for k, v in s["task_sum"].items()}
        out.task_steps = {int(k): int(v) for k, v in s["task_steps"].items()}
        out.seconds = float(s.get("seconds", 0.0))
        return out

    def reduce(self, ctx: DistributedContext, names: list[str], device: torch.device) -> dict[str, float]:
        """Epoch means over steps and ranks: ``loss``, each part, and ``loss/<task>``."""
        keys = sorted(set().union(*ctx.all_gather_object(sorted(self.parts))))
        T = len(names)
        vec = torch.tensor([self.total, float(self.steps)] + [self.parts.get(k, 0.0) for k in keys]
                           + [self.task_sum.get(t, 0.0) for t in range(T)], dtype=torch.float64, device=device)
        vec = ctx.all_reduce_sum(vec).cpu().tolist()
        world = ctx.world_size
        steps = max(vec[1], 1.0)
        out = {"loss": vec[0] / steps}
        out.update({k: v / steps for k, v in zip(keys, vec[2:2 + len(keys)])})
        for t in range(T):
            n = self.task_steps.get(t, 0)  # identical on every rank (from the global counts)
            if n:
                out[f"loss/{names[t]}"] = vec[2 + len(keys) + t] / (world * n)
        return out


@dataclass
class LoopState:
    """Where the loop is, and what handlers read and write.

    Attributes:
        steps_per_epoch: batches per epoch on each rank.
        epoch, global_step: the current epoch (0-based) and optimiser steps taken so far.
        history: the rows of the finished epochs; best: ``{"metric", "value", "epoch", "metrics"}``.
        sums: running sums of the current epoch; lr: learning rate of the last step.
        mid_epoch: a resumed run continues inside an epoch (the sampler's position is restored).
        batch, loss, loss_value: the current batch (on the device), its ``StepLoss`` and total.
        row: the history row of the epoch ending (during ``epoch_completed``); metrics: its
            ``evaluate()`` result; improved: the selection metric improved in this epoch.
        stop: set by a handler to end training after the current epoch.
    """

    steps_per_epoch: int
    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    sums: _EpochSums = field(default_factory=_EpochSums)
    lr: float = math.nan
    mid_epoch: bool = False
    epoch_start: float = 0.0
    batch: Any = None
    loss: StepLoss | None = None
    loss_value: float = math.nan
    row: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] | None = None
    improved: bool = False
    stop: bool = False


@dataclass
class TrainingLoop:
    """Epochs of optimiser steps over ``sampler``'s batches, firing events for ``handlers``.

    Built by :func:`lorkd.engine.fit`, which documents the arguments; ``wrapped`` is the module the
    objective calls (DDP-wrapped with several ranks), ``model`` the plain one. ``clip_params``:
    the parameters whose gradient norm ``cfg.optim.grad_clip`` bounds; ``extra_params``: the
    trainable parameters of ``extra_modules``, averaged over ranks by the loop itself.
    """

    model: nn.Module
    objective: Callable[[nn.Module, Any, Tensor], StepLoss]
    dataset: Any
    sampler: Any
    cfg: Any
    out_dir: Path
    ctx: DistributedContext
    names: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Any
    amp: str
    manager: CheckpointManager
    state: LoopState
    extra_modules: nn.Module | None = None
    clip_params: list[nn.Parameter] = field(default_factory=list)
    handlers: list[Any] = field(default_factory=list)
    wrapped: nn.Module | None = None
    resumed: bool = False
    averaged: nn.Module | None = None  # the moving average of the weights (FitConfig.ema), set by its handler

    @property
    def selected_model(self) -> nn.Module:
        """The weights that are validated and kept as ``best.pt``: the average when there is one."""
        return self.averaged if self.averaged is not None else self.model

    def __post_init__(self) -> None:
        self.extra_params = ([p for p in self.extra_modules.parameters() if p.requires_grad]
                             if self.extra_modules is not None else [])
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        self.autocast = torch.autocast(device_type="cuda", dtype=dtype) if self.amp != "none" else nullcontext()

    # ---- events -----------------------------------------------------------------------------
    def fire(self, event: str) -> None:
        """Call ``handler.<event>(self)`` on every handler that has that method, in list order."""
        for handler in self.handlers:
            method = getattr(handler, event, None)
            if method is not None:
                method(self)

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> LoopState:
        """Train until ``cfg.epochs`` epochs are done or a handler sets ``state.stop``."""
        try:
            self.fire("started")
            while self.state.epoch < self.cfg.epochs and not self.state.stop:
                self.run_epoch()
            self.ctx.barrier()
            self.fire("completed")
        finally:
            self.fire("close")
        return self.state

    def run_epoch(self) -> None:
        s, cfg = self.state, self.cfg
        if not s.mid_epoch:
            self.sampler.set_epoch(s.epoch)
        s.mid_epoch = False
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(s.epoch)
        s.epoch_start = time.perf_counter()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate_task_batch, num_workers=cfg.num_workers,
            pin_memory=self.ctx.device.type == "cuda",
            # own generator: creating the iterator must not draw from the global torch RNG,
            # or a resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.seed * 1000003 + s.epoch),
        )
        self.fire("epoch_started")
        for batch in loader:
            s.batch = batch.to(self.ctx.device, non_blocking=True)
            self.fire("iteration_started")
            self.step(s.batch)
            self.fire("iteration_completed")
        self.end_epoch()

    def step(self, batch: Any) -> None:
        """One optimiser step on ``batch`` (raises ``TrainingError`` on every rank, before the
        step, when the loss is not finite on some rank)."""
        s, cfg = self.state, self.cfg
        step_in_epoch = self.sampler.batches_done + 1
        counts = global_task_counts(batch.task_ids, len(self.names), self.ctx)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.objective(self.wrapped, batch, counts)
        if not isinstance(loss, StepLoss):
            raise TypeError(f"the objective must return a StepLoss, got {type(loss).__name__}")
        bad = not bool(torch.isfinite(loss.total.detach()).all())
        if self.ctx.all_reduce_any(bad):
            _raise_non_finite(loss, s.epoch, step_in_epoch, s.global_step + 1, s.steps_per_epoch, self.names,
                              self.ctx, cfg)
        self._backward_and_update(loss)
        s.lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.sampler.advance()
        s.global_step += 1
        s.loss, s.loss_value = loss, float(loss.total.detach())
        s.sums.add(s.loss_value, loss.parts, loss.per_task, counts)

    def _backward_and_update(self, loss: StepLoss) -> None:
        scaler = self.scaler
        if scaler is not None:
            scaler.scale(loss.total).backward()
        else:
            loss.total.backward()
        if self.ctx.is_distributed and self.extra_params:
            _average_gradients(self.extra_params, self.ctx)
        if self.cfg.optim.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.clip_params, self.cfg.optim.grad_clip)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()

    def end_epoch(self) -> None:
        """Build the epoch's row (losses, lr, seconds), fire ``epoch_completed``, move on."""
        s = self.state
        row: dict[str, Any] = {"epoch": s.epoch, "stage": self.cfg.stage, "step": s.global_step}
        row.update(s.sums.reduce(self.ctx, self.names, self.ctx.device))
        row["lr"] = s.lr  # used by the epoch's last step
        row["seconds"] = round(s.sums.seconds + time.perf_counter() - s.epoch_start, 3)
        s.row, s.metrics, s.improved = row, None, False
        self.fire("epoch_completed")
        s.sums = _EpochSums()
        s.epoch += 1

    # ---- checkpoints ------------------------------------------------------------------------
    def checkpoint_state(self, finished: bool) -> dict[str, Any]:
        """Everything the rest of the run depends on (collective: every rank must call it)."""
        s = self.state
        rng = self.ctx.all_gather_object(capture_rng_state())
        return {
            "model": self.model.state_dict(),
            "extra_modules": self.extra_modules.state_dict() if self.extra_modules is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
            "sampler": self.sampler.state_dict(),
            "epoch": s.epoch,
            "global_step": s.global_step,
            "epoch_finished": finished,
            "epoch_sums": s.sums.state(),
            "history": s.history,
            "best": s.best,
            "fit_config": config_dict(self.cfg),
            "world_size": self.ctx.world_size,
            "task_names": self.names,
            "handlers": {h.state_key: h.state_dict() for h in self.handlers if getattr(h, "state_key", None)},
        }

    def save_latest(self, finished: bool) -> None:
        """``checkpoints/latest.pt`` (every rank calls this; rank 0 writes)."""
        ckpt = self.checkpoint_state(finished)
        if self.ctx.is_main:
            self.manager.save_latest(ckpt)

    def best_state(self) -> dict[str, Any]:
        """What ``checkpoints/best.pt`` holds."""
        s = self.state
        return {
            "model": self.selected_model.state_dict(),
            "extra_modules": self.extra_modules.state_dict() if self.extra_modules is not None else None,
            "epoch": s.epoch, "global_step": s.global_step, "best": s.best,
            "fit_config": config_dict(self.cfg), "task_names": self.names,
        }

    def load_handler_states(self, saved: dict[str, Any]) -> None:
        """Give each handler with a ``state_key`` its state from a checkpoint's ``handlers``."""
        for h in self.handlers:
            key = getattr(h, "state_key", None)
            if key and key in saved:
                h.load_state_dict(saved[key])


# ---------------------------------------------------------------------------------------------
# helpers
def config_dict(cfg: Any) -> dict[str, Any]:
    """``cfg`` (a ``FitConfig``) as a plain dict, as stored in checkpoints."""
    return asdict(cfg)


def _average_gradients(params: list[nn.Parameter], ctx: DistributedContext) -> None:
    """DDP-like averaging for parameters the objective calls outside DDP.

    One all-reduce of the "used" flags and one of the flattened gradients (zeros where unused); a
    parameter unused on every rank keeps ``grad None``.
    """
    used = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=ctx.device)
    ctx.all_reduce_sum(used)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    ctx.all_reduce_sum(flat).div_(ctx.world_size)
    offset = 0
    for p, u in zip(params, used.tolist()):
        n = p.numel()
        if u > 0:
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n


def _raise_non_finite(loss: StepLoss, epoch: int, step_in_epoch: int, step: int, steps_per_epoch: int,
                      names: list[str], ctx: DistributedContext, cfg: Any) -> None:
    T = len(names)
    flags = torch.zeros(T, dtype=torch.float64, device=ctx.device)
    for t, v in loss.per_task.items():
        if 0 <= int(t) < T and not math.isfinite(float(v)):
            flags[int(t)] = 1.0
    flags = ctx.all_reduce_sum(flags).cpu()
    mine = sorted(k for k, v in loss.parts.items() if not math.isfinite(float(v)))
    bad_parts = sorted(set().union(*ctx.all_gather_object(mine)))
    tasks = [f"{names[t]} (task {t})" for t in range(T) if flags[t] > 0]
    where = (f"epoch {epoch} (0-based, of {cfg.epochs}), step {step} of the run "
             f"(batch {step_in_epoch} of {steps_per_epoch} in the epoch), stage {cfg.stage!r}")
    what = ("non-finite loss of task(s) " + ", ".join(tasks)) if tasks else "non-finite total loss (no single task's loss is)"
    if bad_parts:
        what += f"; non-finite parts: {', '.join(bad_parts)}"
    raise TrainingError(f"{what} at {where}; training stopped without writing a checkpoint "
                        f"(checkpoints/latest.pt holds the last good state)")
