"""Process-group setup and the few collectives the training loop needs.

Launch with ``torchrun --nproc_per_node N script.py``; :meth:`DistributedContext.from_env` reads
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and initialises the process group (NCCL on CUDA, Gloo on
CPU). Without ``WORLD_SIZE > 1`` everything here is a cheap single-process no-op, so the same
code runs in both settings.

Experts whose task is absent from a rank's batch
------------------------------------------------
A batch on one rank may lack some tasks. The experts of all tasks live in one parameter per layer
(rows by task), so every expert parameter takes part in every forward pass and DDP never waits
for one; a task absent from a rank's batch contributes exact zeros to its rows, so the averaged
gradient of task ``t``'s rows is that of the ranks where it was present (which is exactly what
the loss normalisation below expects). Task heads may still go unused on a rank, so
:meth:`DistributedContext.wrap` builds ``DistributedDataParallel(model,
find_unused_parameters=True)``. A task absent from the **whole** global batch must not move: the
training loop hooks the optimiser with :func:`lorkd.experts.keep_absent_experts`, whose
per-rank "tasks seen" flags are combined with :meth:`DistributedContext.all_reduce_max`, so
momentum and weight decay leave its rows bit-identical. ``tests/test_engine_distributed.py``
checks this under ``torchrun`` with two Gloo processes (the expert of a task absent from the
data keeps its exact initial weights).

Per-task loss normalisation across ranks
----------------------------------------
Each task's loss is the mean over that task's samples in the **global** batch (all ranks), not
over the rank's local share, so the gradient does not depend on how the global batch happens to be
split. With ``N_t`` the global count of task ``t`` (:func:`global_task_counts`, one all-reduce) and
``W`` the world size, :func:`per_task_mean` returns on each rank
``sum(values[task == t]) / N_t * W``. DDP averages gradients over ranks (divides by ``W``), so the
gradient of task ``t``'s term equals that of ``sum over the global batch / N_t``: the
single-process mean over the same global batch. Consequence: a run on ``W`` ranks with
``batch_size=b`` per rank reproduces a single-process run with ``batch_size=W * b`` (same sampler
seed) up to floating-point summation order; ``tests/test_engine_distributed.py`` asserts the final
weights of the toy run agree within an absolute ``1e-5`` (observed: about ``1e-7``) on CPU/Gloo.
This holds for models without BatchNorm or with per-task norms computed per rank; shared BatchNorm
sees only local statistics on each rank (use SyncBatchNorm if that matters).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lorkd.errors import ConfigError, DataError

__all__ = ["DistributedContext", "global_task_counts", "per_task_mean"]


def with_cuda_index(device: torch.device, world_size: int, local_rank: int) -> torch.device:
    """``cuda`` without an index -> ``cuda:LOCAL_RANK`` under torchrun, else the current CUDA device.

    ``torch.cuda.set_device`` and NCCL need an indexed device; a config's ``device: cuda`` (or
    ``auto`` on a GPU machine) names none. Other devices are returned unchanged.
    """
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())


@dataclass
class DistributedContext:
    """Where this process sits in a (possibly single-process) run.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes.
        local_rank: rank on this machine (selects the CUDA device).
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, device: str | torch.device | None = None) -> "DistributedContext":
        """Build the context from torchrun's environment variables.

        With ``WORLD_SIZE > 1`` the default process group is initialised (``env://``; NCCL when the
        device is CUDA, Gloo otherwise) unless it already is. The device is ``device`` when given,
        else ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.

        Raises:
            ConfigError: ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` are not integers or out of range.
        """
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as err:
            raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers: {err}") from err
        if world < 1 or not 0 <= rank < world or local_rank < 0:
            raise ConfigError(f"bad distributed environment: WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local_rank}")
        if device is not None:
            dev = torch.device(device)
        elif torch.cuda.is_available():
            dev = torch.device("cuda")
        else:
            dev = torch.device("cpu")
        dev = with_cuda_index(dev, world, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, **kwargs)
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=dev)

    # ------------------------------------------------------------------ properties
    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and logs)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one process and the process group is up."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks in place and return it (unchanged in a single process).

        ``t`` must live on :attr:`device` when the backend is NCCL.
        """
        if self.is_distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: Tensor) -> Tensor:
        """The element-wise maximum of ``t`` over ranks, in place (unchanged in a single process)."""
        if self.is_distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_reduce_any(self, flag: bool) -> bool:
        """True when ``flag`` is true on at least one rank (every rank gets the same answer)."""
        if not self.is_distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.is_distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Return rank 0's ``obj`` on every rank (picklable objects; the argument is ignored elsewhere)."""
        if not self.is_distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------ models
    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model, find_unused_parameters=True)`` when distributed, else ``model``.

        The model must already be on :attr:`device`. ``find_unused_parameters=True`` is what lets a
        rank whose batch lacks a task leave that task's expert unused (see the module docstring).
        """
        if not self.is_distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The plain module inside a DDP (or ``DataParallel``) wrapper; ``model`` itself otherwise."""
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        return model

    def shutdown(self) -> None:
        """Destroy the process group if this context (or anyone) initialised one."""
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as err:  # pragma: no cover - teardown must not mask the real error
                warnings.warn(f"destroy_process_group failed: {err}", stacklevel=2)


def global_task_counts(task_ids: Tensor, num_tasks: int, ctx: DistributedContext) -> Tensor:
    """Samples of each task in the global batch (all ranks), int64 ``[T]`` on ``task_ids``' device.

    Args:
        task_ids: int64 ``[B]``, this rank's task ids.
        num_tasks: ``T``.

    Raises:
        DataError: a task id outside ``[0, T)``.
    """
    task_ids = task_ids.reshape(-1).long()
    if task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= num_tasks:
            bad = lo if lo < 0 else hi
            raise DataError(f"task id {bad} in the batch is outside [0, {num_tasks})")
    counts = torch.bincount(task_ids, minlength=num_tasks).to(torch.int64)
    return ctx.all_reduce_sum(counts)


def per_task_mean(values: Tensor, task_ids: Tensor, global_counts: Tensor, world_size: int) -> dict[int, Tensor]:
    """Each locally present task's share of its global-batch mean, scaled for DDP averaging.

    Args:
        values: ``[B]`` per-sample losses on this rank.
        task_ids: int64 ``[B]``.
        global_counts: int64 ``[T]`` from :func:`global_task_counts`.
        world_size: number of ranks ``W``.

    Returns:
        ``{t: values[task_ids == t].sum() / global_counts[t] * W}`` for every task ``t`` present in
        ``task_ids`` (scalars with grad). In a single process this is the plain per-task mean; over
        ``W`` ranks, after DDP divides gradients by ``W``, each term's gradient equals the mean over
        the task's samples in the global batch.

    Raises:
        ValueError: ``values`` and ``task_ids`` differ in shape, or a present task has a global count
            of 0 (the counts do not come from these task ids).
    """
    if values.shape != task_ids.shape:
        raise ValueError(f"per_task_mean: values {tuple(values.shape)} and task_ids {tuple(task_ids.shape)} differ in shape")
    out: dict[int, Tensor] = {}
    counts = global_counts.tolist()
    for t in torch.unique(task_ids).tolist():
        n = counts[t]
        if n <= 0:
            raise ValueError(f"per_task_mean: task {t} is in the batch but its global count is {n}")
        out[int(t)] = values[task_ids == t].sum() / n * world_size
    return out
