"""The training loop shared by every pipeline: optimiser, schedule, AMP, checkpoints, resume, logs.

The engine knows nothing about the model or the task: a pipeline hands :func:`fit` a model, an
*objective* and a task-mixing dataset with its :class:`~lorkd.data.batching.TaskBatchSampler`.

An objective is any callable ``objective(model, batch, global_counts) -> StepLoss`` where ``model``
is the (possibly DDP-wrapped) module to call, ``batch`` a :class:`~lorkd.data.batching.TaskBatch`
already on the device and ``global_counts`` the int64 ``[T]`` task counts of the global batch
(see :func:`lorkd.engine.distributed.per_task_mean` for how to normalise per-task losses with them).

Resuming: ``checkpoints/latest.pt`` holds everything the loop's future depends on (weights,
optimiser, scheduler, grad scaler, every rank's RNG states, sampler position, epoch and step, the
running epoch sums, history, best score and the handlers' states, e.g. early stopping's), so a run
killed at any point and restarted with ``resume=True`` ends with the same weights as an
uninterrupted run (bit-identical on CPU).

Structure: :func:`fit` checks the settings, builds the optimiser and schedule, restores a resumed
run and runs a :class:`~lorkd.engine.loop.TrainingLoop`, whose events drive the handlers of
:mod:`lorkd.engine.handlers` (validation and best model, history, progress, early stopping,
checkpoints) and any the caller adds with ``handlers=`` (TensorBoard scalars, recomputed norm statistics).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from lorkd.errors import ConfigError
from lorkd.experts import ExpertModel, keep_absent_experts

from .averaging import WeightAverage
from .checkpoint import CheckpointManager, restore_rng_state
from .distributed import DistributedContext
from .handlers import (
    CheckpointHandler, EarlyStopping, Handler, HistoryHandler, ProgressHandler, ValidationHandler,
)
from .loop import LoopState, StepLoss, TrainingLoop, _EpochSums, config_dict

__all__ = [
    "FitConfig", "FitResult", "Handler", "OptimConfig", "StepLoss", "build_optimizer", "build_scheduler", "fit",
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
        early_stop: patience in epochs: stop when ``select_metric`` has not improved for this many
            epochs in a row (:class:`~lorkd.engine.handlers.EarlyStopping`; needs ``select_metric``
            and an ``evaluate``); ``None``: train all ``epochs``. The learning-rate schedule still
            spans ``epochs``.
        early_stop_min_delta: the least change of ``select_metric`` that counts as an improvement
            for ``early_stop`` (0: any new best).
        ema: decay of an exponential moving average of the weights (e.g. 0.999), which is then
            what is validated and kept as ``best.pt`` (:class:`~lorkd.engine.averaging.WeightAverage`);
            ``None``: no average.
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
    early_stop: int | None = None
    early_stop_min_delta: float = 0.0
    ema: float | None = None

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
        if self.early_stop is not None and not (isinstance(self.early_stop, int) and self.early_stop >= 1):
            raise ConfigError(f"early_stop must be an int >= 1 or None, got {self.early_stop!r}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"ema must be a decay in (0, 1) or None, got {self.ema!r}")
        if self.early_stop is not None and self.select_metric is None:
            raise ConfigError("early_stop needs select_metric (the metric whose improvement it watches)")
        self.optim.validate()


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per epoch (as in ``history.jsonl``).
        best: ``{"metric", "value", "epoch", "metrics"}`` of the best epoch, or ``None``.
        best_epoch: its epoch index, or ``None``.
        seconds: wall time of this call.
        stopped_early: early stopping ended training before ``cfg.epochs`` epochs.
    """

    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_epoch: int | None
    seconds: float
    stopped_early: bool = False


# Fields whose change would make a resumed run differ from the run it continues.
_RESUME_FIELDS = ("epochs", "batch_size", "seed", "amp", "optim", "ema")


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
    handlers: list[Any] | None = None,
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
        handlers: more handlers (see :mod:`lorkd.engine.handlers`, e.g. subclasses of
            :class:`~lorkd.engine.handlers.Handler`: :class:`~lorkd.engine.handlers.ScalarsHandler`
            for TensorBoard, :class:`~lorkd.engine.norms.NormStatistics`), called after the built-in ones at each event
            and before ``latest.pt`` is written at an epoch's end.

    Returns:
        :class:`FitResult`.

    Raises:
        ConfigError: a bad ``cfg`` field; ranks with different numbers of batches; a resume
            checkpoint from a different configuration or model; ``select_metric`` missing from
            ``evaluate()``'s result; ``cfg.early_stop`` without ``evaluate``.
        DataError: an unreadable checkpoint; a task id outside ``[0, T)``.
        TrainingError: the loss is not finite on some rank (names epoch, step and task(s)); raised
            on every rank, before any optimiser step or checkpoint, so ``latest.pt`` keeps the last
            good state.
    """

    start_time = time.perf_counter()
    cfg.validate()
    if cfg.early_stop is not None and evaluate is None:
        raise ConfigError("early_stop needs an evaluate() function (the selection metric comes from it)")
    amp = cfg.amp
    if amp != "none" and ctx.device.type != "cuda":
        warnings.warn(f"amp={amp!r} needs CUDA; training on {ctx.device} in float32 (amp='none')", stacklevel=2)
        amp = "none"
    names = list(task_names) if task_names else [str(t) for t in range(_num_tasks(model, sampler, task_names))]
    steps_per_epoch = _steps_per_epoch(sampler, dataset, cfg, ctx)

    _seed_everything(cfg.seed + ctx.rank)
    model.to(ctx.device)
    if extra_modules is not None:
        extra_modules.to(ctx.device)
    manager = CheckpointManager(Path(out_dir) / "checkpoints")
    saved = _load_resume_state(manager, model, extra_modules, cfg, ctx) if resume else None

    loop = _build_loop(model, objective, dataset, sampler, cfg, Path(out_dir), ctx, names, amp, manager,
                       extra_modules, steps_per_epoch)
    loop.handlers = _default_handlers(cfg, evaluate, handlers, model)
    if saved is not None:
        _restore(loop, saved)
    loop.wrapped = ctx.wrap(model)
    model.train()
    if extra_modules is not None:
        extra_modules.train()
    s = loop.run()
    return FitResult(history=s.history, best=s.best, best_epoch=None if s.best is None else int(s.best["epoch"]),
                     seconds=time.perf_counter() - start_time, stopped_early=s.stop and s.epoch < cfg.epochs)


def _default_handlers(cfg: FitConfig, evaluate: Callable[[nn.Module], dict[str, float]] | None,
                      extra: list[Any] | None, model: nn.Module) -> list[Any]:
    """Weight average, validation, early stopping, history, progress, the caller's, checkpoints (last)."""
    out: list[Any] = [WeightAverage(model, cfg.ema)] if cfg.ema is not None else []
    out += [ValidationHandler(evaluate)] if evaluate is not None else []
    if cfg.early_stop is not None:  # before the history: its count goes into the epoch's row
        out.append(EarlyStopping(cfg.early_stop, cfg.early_stop_min_delta))
    out += [HistoryHandler(), ProgressHandler()]
    return out + list(extra or []) + [CheckpointHandler()]


def _steps_per_epoch(sampler: Any, dataset: Any, cfg: FitConfig, ctx: DistributedContext) -> int:
    steps_per_epoch = len(sampler)
    lengths = ctx.all_gather_object(steps_per_epoch)
    if len(set(lengths)) > 1:
        raise ConfigError(f"the sampler gives the ranks different numbers of batches per epoch ({lengths}); "
                          f"build it with drop_last=True for distributed training")
    if steps_per_epoch < 1:
        raise ConfigError(f"the sampler yields no batch per epoch (batch_size={cfg.batch_size}, {len(dataset)} samples)")
    return steps_per_epoch


def _load_resume_state(manager: CheckpointManager, model: nn.Module, extra_modules: nn.Module | None,
                       cfg: FitConfig, ctx: DistributedContext) -> dict[str, Any] | None:
    """``latest.pt``, checked against ``cfg``, its weights loaded into the modules; ``None`` (and a
    warning) when there is none."""
    if not manager.has_latest():
        if ctx.is_main:
            warnings.warn(f"resume: {manager.latest_path} does not exist; starting from scratch", stacklevel=3)
        return None
    state = manager.load_latest(map_location="cpu")
    _check_resume(state, cfg, ctx, manager.latest_path)
    _load_module(model, state["model"], "model", manager.latest_path)
    if extra_modules is not None:
        _load_module(extra_modules, state.get("extra_modules") or {}, "extra_modules", manager.latest_path)
    return state


def _build_loop(model: nn.Module, objective: Callable[[nn.Module, Any, Tensor], StepLoss], dataset: Any,
                sampler: Any, cfg: FitConfig, out_dir: Path, ctx: DistributedContext, names: list[str], amp: str,
                manager: CheckpointManager, extra_modules: nn.Module | None, steps_per_epoch: int) -> TrainingLoop:
    """Optimiser (experts of absent tasks kept still), schedule and grad scaler, in a fresh loop."""
    named = list(model.named_parameters())
    if extra_modules is not None:
        named += [(f"extra.{n}", p) for n, p in extra_modules.named_parameters()]
    optimizer = build_optimizer(named, cfg.optim)
    if any(isinstance(m, ExpertModel) for m in model.modules()):  # absent tasks' expert rows stay untouched
        keep_absent_experts(optimizer, model, ctx.all_reduce_max if ctx.is_distributed else None)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.epochs)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    state = LoopState(steps_per_epoch=steps_per_epoch, lr=optimizer.param_groups[0]["lr"])
    return TrainingLoop(model=model, objective=objective, dataset=dataset, sampler=sampler, cfg=cfg, out_dir=out_dir,
                        ctx=ctx, names=names, optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp=amp,
                        manager=manager, state=state, extra_modules=extra_modules,
                        clip_params=[p for _, p in named if p.requires_grad])


def _restore(loop: TrainingLoop, saved: dict[str, Any]) -> None:
    """Continue from ``latest.pt``: optimiser, schedule, scaler, RNG, position, sums, history,
    best and handler states (after an epoch's end: at the next epoch's start)."""
    s, ctx = loop.state, loop.ctx
    loop.optimizer.load_state_dict(saved["optimizer"])
    loop.scheduler.load_state_dict(saved["scheduler"])
    if loop.scaler is not None and saved.get("scaler"):
        loop.scaler.load_state_dict(saved["scaler"])
    s.epoch, s.global_step = int(saved["epoch"]), int(saved["global_step"])
    s.history, s.best = list(saved["history"]), saved.get("best")
    s.sums = _EpochSums.from_state(saved["epoch_sums"])
    rng = saved["rng"]
    restore_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
    if bool(saved["epoch_finished"]):
        s.epoch, s.sums = s.epoch + 1, _EpochSums()
    else:
        loop.sampler.load_state_dict(saved["sampler"])
        s.mid_epoch = True  # keep the sampler's restored position
    loop.load_handler_states(saved.get("handlers") or {})
    loop.resumed = True


# ---------------------------------------------------------------------------------------------
# helpers
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
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_resume(state: dict[str, Any], cfg: FitConfig, ctx: DistributedContext, path: Path) -> None:
    for key in ("model", "optimizer", "scheduler", "rng", "sampler", "epoch", "global_step", "epoch_finished",
                "epoch_sums", "history", "fit_config"):
        if key not in state:
            raise ConfigError(f"{path}: not a training checkpoint of lorkd.engine.fit (missing {key!r})")
    saved, now = state["fit_config"], config_dict(cfg)
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
