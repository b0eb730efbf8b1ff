"""Recomputing BatchNorm running statistics over chosen batches (shared and per-task norms)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorkd.data.batching import TaskBatch
from lorkd.engine.distributed import DistributedContext
from lorkd.engine.handlers import ValidationHandler
from lorkd.engine.norms import NormStatistics, recompute_norm_statistics
from lorkd.experts import add_experts


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def batches(seed: int = 0, n: int = 3, rows: int = 6, tasks: int = 2) -> list[TaskBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.arange(rows) % tasks
        x = torch.randn(rows, 2, 5, 5, generator=g) * (1 + 2 * ids.view(-1, 1, 1, 1)) + ids.view(-1, 1, 1, 1)
        out.append(TaskBatch(images=x, labels=torch.zeros(rows, dtype=torch.long), task_ids=ids))
    return out


class Plain(nn.Module):
    """A plain network called as a multi-task one (task ids ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = net()

    def forward(self, x, task_ids):
        return self.body(x)


def test_shared_norm_gets_the_average_of_the_batch_statistics():
    model = Plain()
    model.body[1].running_mean.fill_(50.0)  # garbage left by training
    data = batches()
    conv = model.body[0]
    with torch.no_grad():
        feats = [conv(b.images) for b in data]
    model.eval()
    assert recompute_norm_statistics(model, data, "cpu") == 3
    bn = model.body[1]
    expect_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    expect_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, expect_mean)
    torch.testing.assert_close(bn.running_var, expect_var)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.3 and not model.training


def test_per_task_norms_average_each_task_over_its_rows_and_touch_nothing_else():
    student = add_experts(net(), 2, rank=2, norm="per_task")
    data = batches()
    before = {k: v.clone() for k, v in student.state_dict().items() if "running" not in k and "num_batches" not in k}
    student.train()
    recompute_norm_statistics(student, data, "cpu")
    assert student.training and not student.tasks_seen.any()  # mode kept; no task marked as trained
    for k, v in student.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k  # weights untouched
    # each task's statistics equal those of a plain BatchNorm run on that task's rows alone
    for t in (0, 1):
        ref = Plain()
        ref.body.load_state_dict({k: v for k, v in student.extract(t).state_dict().items()})
        rows = [TaskBatch(images=b.images[b.task_ids == t], labels=b.labels[b.task_ids == t],
                          task_ids=b.task_ids[b.task_ids == t]) for b in data]
        recompute_norm_statistics(ref, rows, "cpu")
        got = student.extract(t)[1]
        torch.testing.assert_close(got.running_mean, ref.body[1].running_mean)
        torch.testing.assert_close(got.running_var, ref.body[1].running_var)
        assert int(got.num_batches_tracked) == 3


def test_eval_outputs_no_longer_depend_on_the_old_running_statistics():
    a, b = Plain(), Plain()
    b.load_state_dict(a.state_dict())
    b.body[1].running_var.fill_(1e3)
    x = batches(seed=1)[0]
    for m in (a, b):
        recompute_norm_statistics(m, batches(), "cpu")
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x.images, x.task_ids), b(x.images, x.task_ids))


def test_a_model_without_tracked_norms_runs_nothing():
    model = nn.Sequential(nn.Linear(2, 2))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert recompute_norm_statistics(model, batches(), "cpu") == 0 and not calls


def test_recompute_norm_stats_key_is_validated():
    from lorkd.config import from_dict
    from lorkd.errors import ConfigError
    from lorkd.pipelines.schema import Stage

    assert from_dict(Stage, {"recompute_norm_stats": 80}, "student.train").recompute_norm_stats == 80
    with pytest.raises(ConfigError, match=r"student.train.recompute_norm_stats: must be >= 0"):
        from_dict(Stage, {"recompute_norm_stats": -1}, "student.train")


def test_the_handler_recomputes_the_validated_model_right_before_validation():
    trained, averaged = Plain(), Plain()  # loop.selected_model is the average (FitConfig.ema)
    for m in (trained, averaged):
        m.body[1].running_mean.fill_(50.0)
    expected = copy.deepcopy(averaged)
    recompute_norm_statistics(expected, batches(), "cpu")
    seen = []
    validation = ValidationHandler(lambda m: seen.append((m, m.body[1].running_mean.clone())) or {"acc": 1.0})
    loop = SimpleNamespace(model=trained, selected_model=averaged, ctx=DistributedContext(),
                           cfg=SimpleNamespace(select_metric=None), state=SimpleNamespace(row={}, metrics=None))
    loop.handlers = [validation, NormStatistics(batches())]  # listed after validation: the event orders them
    loop.fire = lambda event: [getattr(h, event)(loop) for h in loop.handlers]
    validation.epoch_completed(loop)
    assert seen[0][0] is averaged and torch.equal(seen[0][1], expected.body[1].running_mean)
    assert loop.state.row == {"val/acc": 1.0} and bool((trained.body[1].running_mean == 50.0).all())
