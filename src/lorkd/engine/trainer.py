"""The training loop shared by every pipeline: optimiser, schedule, AMP, checkpoints, resume, logs.

The engine knows nothing about the model or the task: a pipeline hands :func:`fit` a model, an
*objective* and a task-mixing dataset with its :class:`~lorkd.data.batching.TaskBatchSampler`.

An objective is any callable ``objective(model, batch, global_counts) -> StepLoss`` where ``model``
is the (possibly DDP-wrapped) module to call, ``batch`` a :class:`~lorkd.data.batching.TaskBatch`
already on the device and ``global_counts`` the int64 ``[T]`` task counts of the global batch
(see :func:`lorkd.engine.distributed.per_task_mean` for how to normalise per-task losses with them).

Resuming: ``checkpoints/latest.pt`` holds everything the loop's future depends on (weights,
optimiser, scheduler, grad scaler, every rank's RNG states, sampler position, epoch and step, the
running epoch sums, history and best score), so a run killed at any point and restarted with
``resume=True`` ends with the same weights as an uninterrupted run (bit-identical on CPU).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from lorkd.data.batching import collate_task_batch
from lorkd.errors import ConfigError, TrainingError
from lorkd.experts import ExpertModel, keep_absent_experts
from lorkd.fileio import write_atomic

from .checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from .distributed import DistributedContext, global_task_counts
from .progress import progress_bar

__all__ = [
    "FitConfig", "FitResult", "OptimConfig", "StepLoss", "build_optimizer", "build_scheduler", "fit",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Attributes:
        name: ``"sgd"`` (with momentum) or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum (ignored by AdamW).
        weight_decay: applied to parameters with ``ndim >= 2`` only (not to norms and biases).
        warmup_epochs: linear warm-up length in epochs; may be fractional (counted in steps).
        schedule: ``"cosine"`` (to 0 at the end of training) or ``"constant"`` after warm-up.
        grad_clip: max global gradient norm, or ``None`` for no clipping.
    """

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    grad_clip: float | None = None

    def validate(self) -> None:
        """Raises ``ConfigError`` naming the first bad field."""
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum!r}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip must be > 0 or None, got {self.grad_clip!r}")


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over two parameter groups: ``decay`` (``ndim >= 2``) and ``no_decay`` (``ndim <= 1``).

    Parameters with ``requires_grad=False`` are skipped; a parameter listed twice (shared) is kept
    once. Group ``i`` carries ``"name"`` (``"decay"``/``"no_decay"``) and ``"param_names"``.

    Raises:
        ConfigError: a bad ``cfg`` field, or no trainable parameter.
    """
    cfg.validate()
    seen: set[int] = set()
    groups = {"decay": ([], []), "no_decay": ([], [])}
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        params, names = groups["decay" if p.ndim > 1 else "no_decay"]
        params.append(p)
        names.append(name)
    if not seen:
        raise ConfigError("build_optimizer: no trainable parameter")
    param_groups = [
        {"params": params, "param_names": names, "name": key, "weight_decay": cfg.weight_decay if key == "decay" else 0.0}
        for key, (params, names) in groups.items()
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(param_groups, lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (call ``scheduler.step()`` after every optimiser step).

    With ``W = round(warmup_epochs * steps_per_epoch)`` warm-up steps and ``S = steps_per_epoch *
    epochs`` steps in all, step ``s`` (from 0) uses ``lr * f(s)``:

    * ``s < W``: ``f = (s + 1) / W`` (linear up to the peak);
    * after: ``"constant"``: ``f = 1``; ``"cosine"``: ``f = 0.5 * (1 + cos(pi * (s - W) / (S - W)))``,
      which is 1 at ``s = W`` and reaches 0 at ``s = S`` (one past the last step).

    Raises:
        ConfigError: ``steps_per_epoch`` or ``epochs`` below 1, or a bad ``cfg`` field.
    """
    cfg.validate()
    if steps_per_epoch < 1 or epochs < 1:
        raise ConfigError(f"build_scheduler: steps_per_epoch and epochs must be >= 1, got {steps_per_epoch}, {epochs}")
    total = steps_per_epoch * epochs
    warm = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    cosine = cfg.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


@dataclass
class FitConfig:
    """How :func:`fit` trains.

    Attributes:
        epochs: number of epochs.
        batch_size: samples per step **on each rank** (documentation; the sampler sets it).
        optim: optimiser and schedule.
        seed: seeds Python, NumPy and torch at start (``seed + rank``); data order comes from the sampler.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (with a ``GradScaler``); CUDA only, on CPU it is
            forced to ``"none"`` with a warning.
        checkpoint_every: also write ``latest.pt`` every this many steps (0: at epoch ends only).
        select_metric: key of ``evaluate()``'s result that selects ``best.pt``; ``None``: no best.
        select_mode: ``"max"`` or ``"min"``.
        num_workers: ``DataLoader`` workers.
        progress: show progress on rank 0 (stderr): a tqdm bar on a terminal, else a line every
            10 % of the steps (:func:`~lorkd.engine.progress.progress_bar`).
        stage: name of this stage in logs (``"pretrain"``, ``"decompose"``, ...).
    """

    epochs: int
    batch_size: int
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    amp: str = "none"
    checkpoint_every: int = 0
    select_metric: str | None = None
    select_mode: str = "max"
    num_workers: int = 0
    progress: bool = True
    stage: str = "train"

    def validate(self) -> None:
        """Raises ``ConfigError`` naming the first bad field."""
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        if self.select_mode not in ("max", "min"):
            raise ConfigError(f"select_mode must be 'max' or 'min', got {self.select_mode!r}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers!r}")
        self.optim.validate()


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per epoch (as in ``history.jsonl``).
        best: ``{"metric", "value", "epoch", "metrics"}`` of the best epoch, or ``None``.
        best_epoch: its epoch index, or ``None``.
        seconds: wall time of this call.
    """

    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_epoch: int | None
    seconds: float


# Fields whose change would make a resumed run differ from the run it continues.
_RESUME_FIELDS = ("epochs", "batch_size", "seed", "amp", "optim")


def fit(
    model: nn.Module,
    objective: Callable[[nn.Module, Any, Tensor], StepLoss],
    dataset: Any,
    sampler: Any,
    cfg: FitConfig,
    out_dir: str | Path,
    ctx: DistributedContext,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    extra_modules: nn.Module | None = None,
    resume: bool = False,
    task_names: list[str] | None = None,
    scalars: Any | None = None,
) -> FitResult:
    """Train ``model`` (and ``extra_modules``) with ``objective`` for ``cfg.epochs`` epochs.

    Args:
        model: the plain module (not DDP-wrapped); moved to ``ctx.device`` and wrapped with
            ``ctx.wrap`` here. It is trained in place.
        objective: ``objective(wrapped_model, batch_on_device, global_counts [T]) -> StepLoss``.
        dataset: map-style dataset of ``(image, label, task_id)`` items; ``set_epoch(e)`` is called
            each epoch if it has one.
        sampler: a :class:`~lorkd.data.batching.TaskBatchSampler` (``set_epoch``, ``advance``,
            ``state_dict``/``load_state_dict``, ``__len__``), built for ``ctx``'s rank and world size;
            with several ranks it must give every rank the same number of batches (``drop_last=True``).
        cfg: see :class:`FitConfig`.
        out_dir: run folder (see :func:`~lorkd.engine.checkpoint.prepare_run_dir`); rank 0 writes
            ``checkpoints/latest.pt``, ``checkpoints/best.pt``, ``history.jsonl`` and ``history.csv``.
        ctx: the distributed context.
        evaluate: ``evaluate(plain_model) -> {metric: float}``, run at each epoch end on rank 0 only,
            in eval mode under ``no_grad`` (other ranks wait); its result, broadcast to all ranks,
            goes into the history as ``val/<metric>``.
        extra_modules: trained along with the model (e.g. distillation projectors): their parameters
            join the optimiser and their state the checkpoints. The objective calls them directly
            (not through DDP), so with several ranks the engine averages their gradients itself after
            backward (a parameter unused on every rank keeps ``grad None``, as under DDP).
        resume: continue from ``out_dir/checkpoints/latest.pt`` (a warning and a fresh start if it
            does not exist).
        task_names: names for logs; ``len(task_names)`` is the number of tasks ``T``. Without it
            ``T`` is the model's ``num_tasks`` attribute or ``len(sampler.task_sizes)``.
        scalars: called as ``scalars.epoch(row)`` with each epoch's history row on rank 0 (e.g. a
            :class:`~lorkd.engine.scalars.ScalarLog` writing TensorBoard scalars), or ``None``.

    Returns:
        :class:`FitResult`.

    Raises:
        ConfigError: a bad ``cfg`` field; ranks with different numbers of batches; a resume
            checkpoint from a different configuration or model; ``select_metric`` missing from
            ``evaluate()``'s result.
        DataError: an unreadable checkpoint; a task id outside ``[0, T)``.
        TrainingError: the loss is not finite on some rank (names epoch, step and task(s)); raised
            on every rank, before any optimiser step or checkpoint, so ``latest.pt`` keeps the last
            good state.
    """
    start_time = time.perf_counter()
    cfg.validate()
    out_dir = Path(out_dir)
    device = ctx.device
    amp = cfg.amp
    if amp != "none" and device.type != "cuda":
        warnings.warn(f"amp={amp!r} needs CUDA; training on {device} in float32 (amp='none')", stacklevel=2)
        amp = "none"
    num_tasks = _num_tasks(model, sampler, task_names)
    names = list(task_names) if task_names else [str(t) for t in range(num_tasks)]

    steps_per_epoch = len(sampler)
    lengths = ctx.all_gather_object(steps_per_epoch)
    if len(set(lengths)) > 1:
        raise ConfigError(f"the sampler gives the ranks different numbers of batches per epoch ({lengths}); "
                          f"build it with drop_last=True for distributed training")
    if steps_per_epoch < 1:
        raise ConfigError(f"the sampler yields no batch per epoch (batch_size={cfg.batch_size}, {len(dataset)} samples)")

    _seed_everything(cfg.seed + ctx.rank)
    model.to(device)
    if extra_modules is not None:
        extra_modules.to(device)

    manager = CheckpointManager(out_dir / "checkpoints")
    state: dict[str, Any] | None = None
    if resume:
        if manager.has_latest():
            state = manager.load_latest(map_location="cpu")
            _check_resume(state, cfg, ctx, manager.latest_path)
            _load_module(model, state["model"], "model", manager.latest_path)
            if extra_modules is not None:
                _load_module(extra_modules, state.get("extra_modules") or {}, "extra_modules", manager.latest_path)
        elif ctx.is_main:
            warnings.warn(f"resume: {manager.latest_path} does not exist; starting from scratch", stacklevel=2)

    named = list(model.named_parameters())
    if extra_modules is not None:
        named += [(f"extra.{n}", p) for n, p in extra_modules.named_parameters()]
    optimizer = build_optimizer(named, cfg.optim)
    if any(isinstance(m, ExpertModel) for m in model.modules()):  # absent tasks' expert rows stay untouched
        keep_absent_experts(optimizer, model, ctx.all_reduce_max if ctx.is_distributed else None)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.epochs)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    extra_params = [p for p in extra_modules.parameters() if p.requires_grad] if extra_modules is not None else []
    clip_params = [p for _, p in named if p.requires_grad]

    # position and bookkeeping
    epoch, global_step, epoch_finished = 0, 0, False
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    sums = _EpochSums()
    lr = optimizer.param_groups[0]["lr"]
    mid_epoch = False  # resuming inside an epoch: keep the sampler's restored position
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, global_step, epoch_finished = int(state["epoch"]), int(state["global_step"]), bool(state["epoch_finished"])
        history, best = list(state["history"]), state.get("best")
        sums = _EpochSums.from_state(state["epoch_sums"])
        rng = state["rng"]
        restore_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
        if epoch_finished:
            epoch, epoch_finished, sums = epoch + 1, False, _EpochSums()
        else:
            sampler.load_state_dict(state["sampler"])
            mid_epoch = True
        if ctx.is_main:  # history.jsonl may hold an epoch logged after the checkpoint was written
            _write_history(out_dir, history)
    wrapped = ctx.wrap(model)
    model.train()
    if extra_modules is not None:
        extra_modules.train()

    def checkpoint_state(finished: bool) -> dict[str, Any]:
        rng = ctx.all_gather_object(capture_rng_state())  # collective: every rank calls this
        return {
            "model": model.state_dict(),
            "extra_modules": extra_modules.state_dict() if extra_modules is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
            "sampler": sampler.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
            "epoch_finished": finished,
            "epoch_sums": sums.state(),
            "history": history,
            "best": best,
            "fit_config": _config_dict(cfg),
            "world_size": ctx.world_size,
            "task_names": names,
        }

    def save_latest(finished: bool) -> None:
        ckpt = checkpoint_state(finished)
        if ctx.is_main:
            manager.save_latest(ckpt)

    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "none" else nullcontext())
    bar = progress_bar(steps_per_epoch * cfg.epochs, epoch * steps_per_epoch + getattr(sampler, "batches_done", 0),
                       cfg.stage, cfg.progress and ctx.is_main)
    try:
        while epoch < cfg.epochs:
            if not mid_epoch:
                sampler.set_epoch(epoch)
            mid_epoch = False
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            epoch_start = time.perf_counter()
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate_task_batch, num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                # own generator: creating the iterator must not draw from the global torch RNG,
                # or a resumed run would diverge from an uninterrupted one.
                generator=torch.Generator().manual_seed(cfg.seed * 1000003 + epoch),
            )
            for batch in loader:
                batch = batch.to(device, non_blocking=True)
                step_in_epoch = sampler.batches_done + 1
                counts = global_task_counts(batch.task_ids, num_tasks, ctx)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = objective(wrapped, batch, counts)
                if not isinstance(loss, StepLoss):
                    raise TypeError(f"the objective must return a StepLoss, got {type(loss).__name__}")
                bad = not bool(torch.isfinite(loss.total.detach()).all())
                if ctx.all_reduce_any(bad):
                    _raise_non_finite(loss, epoch, step_in_epoch, global_step + 1, steps_per_epoch, names, ctx, cfg)
                if scaler is not None:
                    scaler.scale(loss.total).backward()
                else:
                    loss.total.backward()
                if ctx.is_distributed and extra_params:
                    _average_gradients(extra_params, ctx)
                if cfg.optim.grad_clip is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(clip_params, cfg.optim.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                sampler.advance()
                global_step += 1
                total = float(loss.total.detach())
                sums.add(total, loss.parts, loss.per_task, counts)
                bar.set_postfix(epoch=epoch, loss=f"{total:.4g}", refresh=False)
                bar.update(1)
                last_of_epoch = sampler.batches_done >= steps_per_epoch
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and not last_of_epoch:
                    save_latest(finished=False)

            # ---- epoch end
            row: dict[str, Any] = {"epoch": epoch, "stage": cfg.stage, "step": global_step}
            row.update(sums.reduce(ctx, names, device))
            row["lr"] = lr  # used by the epoch's last step
            row["seconds"] = round(sums.seconds + time.perf_counter() - epoch_start, 3)
            metrics = _run_evaluate(evaluate, model, extra_modules, ctx) if evaluate is not None else None
            if metrics is not None:
                row.update({f"val/{k}": v for k, v in metrics.items()})
                if cfg.select_metric is not None:
                    if cfg.select_metric not in metrics:
                        raise ConfigError(f"select_metric {cfg.select_metric!r} is not among the metrics "
                                          f"evaluate() returned: {sorted(metrics)}")
                    value = metrics[cfg.select_metric]
                    if _improves(value, best, cfg.select_mode):
                        best = {"metric": cfg.select_metric, "value": value, "epoch": epoch, "metrics": metrics}
                        if ctx.is_main:
                            manager.save_best({
                                "model": model.state_dict(),
                                "extra_modules": extra_modules.state_dict() if extra_modules is not None else None,
                                "epoch": epoch, "global_step": global_step, "best": best,
                                "fit_config": _config_dict(cfg), "task_names": names,
                            })
            history.append(row)
            if ctx.is_main:
                _append_history(out_dir, history)
                bar.write(_format_row(row), file=sys.stderr)
                if scalars is not None:
                    scalars.epoch(row)
            save_latest(finished=True)
            sums = _EpochSums()
            epoch += 1
        ctx.barrier()
    finally:
        bar.close()
    return FitResult(history=history, best=best, best_epoch=None if best is None else int(best["epoch"]),
                     seconds=time.perf_counter() - start_time)


# ---------------------------------------------------------------------------------------------
# helpers
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


def _num_tasks(model: nn.Module, sampler: Any, task_names: list[str] | None) -> int:
    if task_names:
        return len(task_names)
    n = getattr(DistributedContext.unwrap(model), "num_tasks", None)
    if isinstance(n, int) and n > 0:
        return n
    sizes = getattr(sampler, "task_sizes", None)
    if sizes:
        return len(sizes)
    raise ConfigError("fit: cannot tell the number of tasks; pass task_names")


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _config_dict(cfg: FitConfig) -> dict[str, Any]:
    return asdict(cfg)


def _check_resume(state: dict[str, Any], cfg: FitConfig, ctx: DistributedContext, path: Path) -> None:
    for key in ("model", "optimizer", "scheduler", "rng", "sampler", "epoch", "global_step", "epoch_finished",
                "epoch_sums", "history", "fit_config"):
        if key not in state:
            raise ConfigError(f"{path}: not a training checkpoint of lorkd.engine.fit (missing {key!r})")
    saved, now = state["fit_config"], _config_dict(cfg)
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in _RESUME_FIELDS if saved.get(k) != now[k]]
    if state.get("world_size", ctx.world_size) != ctx.world_size:
        diff.append(f"world_size: {state['world_size']} in the checkpoint, {ctx.world_size} now")
    if diff:
        raise ConfigError(f"{path}: cannot resume, the run's settings changed: " + "; ".join(diff))


def _load_module(module: nn.Module, sd: dict[str, Any], what: str, path: Path) -> None:
    try:
        module.load_state_dict(sd)
    except RuntimeError as err:
        raise ConfigError(f"{path}: the checkpoint's {what} does not match the {what} being trained: {err}") from err


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
                      names: list[str], ctx: DistributedContext, cfg: FitConfig) -> None:
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


def _run_evaluate(evaluate: Callable[[nn.Module], dict[str, float]], model: nn.Module,
                  extra_modules: nn.Module | None, ctx: DistributedContext) -> dict[str, float]:
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


def _improves(value: float, best: dict[str, Any] | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best["value"] if mode == "max" else value < best["value"]


def _history_columns(history: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in history:
        cols.extend(k for k in row if k not in cols)
    return cols


def _write_history(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite history.jsonl and history.csv from ``history``."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    write_atomic(out_dir / "history.jsonl", lambda tmp: Path(tmp).write_text(text))
    _write_csv(out_dir, history)


def _append_history(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """Append the last row to history.jsonl and rewrite history.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "history.jsonl", "a") as fh:
        fh.write(json.dumps(history[-1]) + "\n")
    _write_csv(out_dir, history)


def _write_csv(out_dir: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_history_columns(history), restval="")
    writer.writeheader()
    writer.writerows(history)
    write_atomic(out_dir / "history.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))


def _format_row(row: dict[str, Any]) -> str:
    skip = {"stage", "step"}
    bits = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            if k not in skip and not k.startswith("loss/")]
    return f"[{row.get('stage')}] " + " ".join(bits)
