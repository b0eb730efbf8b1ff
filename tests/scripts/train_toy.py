"""A tiny multi-task training run for the engine tests (single process or under torchrun).

Three synthetic tasks of 1x8x8 images, a small conv net without BatchNorm given experts for FOUR
tasks (task 3 never occurs in the data, so its expert and head must never move), one linear head per
task, a residual projector trained as ``extra_modules``, per-task cross-entropy normalised with ``per_task_mean``, SGD. Writes ``<out>/final.pt`` with
the final weights and what happened to the absent task's parameters.

    python tests/scripts/train_toy.py --out runs/toy --epochs 2 --batch-size 8
    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/scripts/train_toy.py --out runs/ddp --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lorkd
from lorkd.data.multitask import TaskBatchSampler
from lorkd.engine import (
    DistributedContext, FitConfig, OptimConfig, StepLoss, fit, per_task_mean, prepare_run_dir, save_checkpoint,
)

TASK_SIZES = [40, 24, 32]
NUM_CLASSES = [2, 3, 4, 2]  # task 3: no data
ABSENT = 3


class ToyData(torch.utils.data.Dataset):
    """Task ``t`` owns indices ``[offset_t, offset_t + n_t)``; item ``(image [1, 8, 8], label, task)``."""

    def __init__(self, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.task_sizes = list(TASK_SIZES)
        images, labels, tasks = [], [], []
        for t, n in enumerate(TASK_SIZES):
            y = torch.randint(NUM_CLASSES[t], (n,), generator=g)
            x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
            x[:, 0, t, :] += y[:, None].float()  # a learnable, task-specific signal
            images.append(x)
            labels.append(y)
            tasks.append(torch.full((n,), t))
        self.images, self.labels, self.tasks = torch.cat(images), torch.cat(labels), torch.cat(tasks)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), int(self.tasks[i])


class ToyNet(nn.Module):
    """Conv backbone with experts + per-task heads; ``forward`` returns per-sample CE ``[B]``."""

    def __init__(self) -> None:
        super().__init__()
        backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.student = lorkd.add_experts(backbone, num_tasks=len(NUM_CLASSES), rank=2, alpha=4)
        self.heads = nn.ModuleList(nn.Linear(8, c) for c in NUM_CLASSES)
        with torch.no_grad():  # non-zero B so that every expert gets gradients
            for t in range(len(NUM_CLASSES)):
                for name, p in self.student.named_expert_parameters(t):
                    if name.endswith(".B"):
                        p.normal_(0, 0.1)

    def forward(self, x, task_ids, labels, proj=None):
        feats = self.student(x, task_ids)
        if proj is not None:  # a module trained by the engine as `extra_modules` (outside DDP)
            feats = feats + proj(feats)
        losses = torch.zeros(len(labels), device=x.device)
        for t in torch.unique(task_ids).tolist():
            rows = task_ids == t
            losses = losses.index_put((rows.nonzero().flatten(),),
                                      F.cross_entropy(self.heads[t](feats[rows]), labels[rows], reduction="none"))
        return losses

    def task_parameters(self, t: int):
        return list(self.student.expert_parameters(t)) + list(self.heads[t].parameters())


def absent_has_no_gradient(model: "ToyNet") -> bool:
    """The absent task's head has ``grad is None``; its expert rows got exact zeros (the factors of
    all tasks share one parameter per layer)."""
    heads = all(p.grad is None for p in model.heads[ABSENT].parameters())
    return heads and all(p.grad is None or torch.count_nonzero(p.grad[ABSENT]) == 0 for p in model.student.task_parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-at-step", type=int, default=0,
                    help="SIGKILL this process after step N is taken, before step N+1 (and its checkpoint)")
    ap.add_argument("--nan-at-step", type=int, default=0, help="make task 1's loss NaN at step N")
    args = ap.parse_args()

    ctx = DistributedContext.from_env(device="cpu")
    torch.manual_seed(args.seed)  # identical initial weights on every rank and in every run
    out = Path(args.out)
    if ctx.is_main:
        prepare_run_dir(out, resume=args.resume)
    ctx.barrier()
    data = ToyData()
    model = ToyNet()
    initial = [p.detach().clone() for p in model.task_parameters(ABSENT)]
    sampler = TaskBatchSampler(data, batch_size=args.batch_size, seed=args.seed,
                               num_replicas=ctx.world_size, rank=ctx.rank, drop_last=True)
    proj = nn.Linear(8, 8)  # extra module: the engine syncs its gradients across ranks itself
    calls = {"n": 0}

    def objective(net, batch, counts):
        calls["n"] += 1
        if args.kill_at_step and calls["n"] == args.kill_at_step + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        values = net(batch.images, batch.task_ids, batch.labels, proj)
        if args.nan_at_step and calls["n"] == args.nan_at_step:
            values = torch.where(batch.task_ids == 1, values * float("nan"), values)
        per = per_task_mean(values, batch.task_ids, counts, ctx.world_size)
        total = sum(per.values())
        return StepLoss(total=total, per_task={t: float(v.detach()) for t, v in per.items()},
                        parts={"ce": float(total.detach())})

    cfg = FitConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                    optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, warmup_epochs=0.5),
                    checkpoint_every=args.checkpoint_every, progress=False, stage="toy")
    fit(model, objective, data, sampler, cfg, out, ctx, extra_modules=proj, resume=args.resume,
        task_names=[f"task{t}" for t in range(len(NUM_CLASSES))])
    absent = model.task_parameters(ABSENT)
    report = {
        "state": {**{k: v.detach().clone() for k, v in model.state_dict().items()},
                  **{f"proj.{k}": v.detach().clone() for k, v in proj.state_dict().items()}},
        "absent_no_gradient": absent_has_no_gradient(model),
        "absent_unchanged": all(torch.equal(p, q) for p, q in zip(absent, initial)),
        "world_size": ctx.world_size,
    }
    if ctx.is_main:
        save_checkpoint(out / "final.pt", report)
    ctx.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main()
