"""Per-task BatchNorm against an independent reference: one plain BatchNorm per task, run on
that task's rows only (float64). Outputs, input and affine gradients, running statistics and
``num_batches_tracked`` must agree, in 1D, 2D and 3D, with and without affine parameters, with
cumulative momentum, without running statistics, and for a task with a single value."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorkd.experts import TaskBatchNorm
from lorkd.experts.routing import route, routing_scope

from test_experts_layers import double_precision  # noqa: F401  (autouse: float64)

NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def reference(ref: nn.Module, xr: torch.Tensor) -> torch.Tensor:
    """``ref(xr)``; a single value per channel, which BatchNorm refuses in training, is normalised
    with the running statistics, or without them maps to the bias (variance 0)."""
    if xr.numel() != xr.shape[1] or not (ref.training or ref.running_mean is None):
        return ref(xr)
    if ref.running_mean is not None:
        return nn.functional.batch_norm(xr, ref.running_mean, ref.running_var, ref.weight, ref.bias, False, 0.0, ref.eps)
    return (xr - xr) * (ref.weight.view(1, -1) if ref.affine else 1) + (ref.bias.view(1, -1) if ref.affine else 0)


def run_both(norm: nn.Module, x: torch.Tensor, ids: torch.Tensor, num_tasks: int, steps: int = 2):
    """Train ``steps`` forwards of TaskBatchNorm and of per-task copies of ``norm``; compare."""
    task_norm = TaskBatchNorm(norm, num_tasks)
    refs = [copy.deepcopy(norm) for _ in range(num_tasks)]
    with torch.no_grad():  # distinct affine parameters per task
        for t, ref in enumerate(refs):
            if ref.affine:
                ref.weight.normal_(1, 0.3, generator=torch.Generator().manual_seed(t))
                ref.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(10 + t))
                task_norm.weight[t].copy_(ref.weight)
                task_norm.bias[t].copy_(ref.bias)
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for step in range(steps):
        xs = (x * (1 + step)).requires_grad_(True)
        with routing_scope(route(ids, x.shape[0], num_tasks)):
            out = task_norm(xs)
        out.backward(cotangent)
        want = torch.empty_like(out)
        want_grad = torch.zeros_like(x)
        for t, ref in enumerate(refs):
            rows = ids == t
            if not rows.any():
                continue
            xr = (x[rows] * (1 + step)).detach().requires_grad_(True)
            y = reference(ref, xr)
            y.backward(cotangent[rows])
            want[rows] = y.detach()
            want_grad[rows] = xr.grad
        torch.testing.assert_close(out.detach(), want, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(xs.grad, want_grad, rtol=1e-9, atol=1e-9)
    for t, ref in enumerate(refs):
        if ref.affine:
            for name in ("weight", "bias"):
                got, expected = getattr(task_norm, name).grad[t], getattr(ref, name).grad
                torch.testing.assert_close(got, torch.zeros_like(got) if expected is None else expected, rtol=1e-9, atol=1e-9)
        if ref.running_mean is not None:
            torch.testing.assert_close(task_norm.running_mean[t], ref.running_mean, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(task_norm.running_var[t], ref.running_var, rtol=1e-9, atol=1e-9)
            assert int(task_norm.num_batches_tracked[t]) == int(ref.num_batches_tracked), t
    task_norm.eval()
    for ref in refs:
        ref.eval()
    with torch.no_grad(), routing_scope(route(ids, x.shape[0], num_tasks)):
        out = task_norm(x)
    for t, ref in enumerate(refs):
        rows = ids == t
        if rows.any():
            torch.testing.assert_close(out[rows], reference(ref, x[rows]), rtol=1e-9, atol=1e-9)
    for t in range(num_tasks):  # extract gives the task's own BatchNorm
        extracted = task_norm.extract(t)
        assert type(extracted) is type(norm)
        for key, value in refs[t].state_dict().items():
            torch.testing.assert_close(extracted.state_dict()[key], value)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_per_task_norm_equals_one_batchnorm_per_task(dims, affine):
    torch.manual_seed(0)
    x = torch.randn(7, 3, *([4] * dims)) * 2 + 1
    run_both(NORMS[dims](3, affine=affine, momentum=0.3), x, torch.tensor([2, 0, 3, 2, 0, 2, 3]), num_tasks=4)


def test_cumulative_momentum_and_no_running_statistics():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5)
    ids = torch.tensor([1, 1, 0, 2, 0, 1])
    run_both(nn.BatchNorm2d(4, momentum=None), x, ids, num_tasks=3, steps=3)
    run_both(nn.BatchNorm2d(4, track_running_stats=False), x, ids, num_tasks=3)


@pytest.mark.parametrize("track", [True, False])
def test_a_task_with_a_single_value_per_channel(track):
    torch.manual_seed(0)
    x = torch.randn(4, 3)  # BatchNorm1d on [N, C]: task 1 has one row, one value per channel
    run_both(nn.BatchNorm1d(3, track_running_stats=track), x, torch.tensor([0, 1, 0, 2]), num_tasks=3)


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(0, 3), min_size=2, max_size=8), dims=st.sampled_from([1, 2, 3]),
       size=st.integers(2, 4))
def test_any_task_mix(ids, dims, size):
    x = torch.randn(len(ids), 2, *([size] * dims), generator=torch.Generator().manual_seed(len(ids)))
    run_both(NORMS[dims](2), x, torch.tensor(ids), num_tasks=4)


def test_old_per_task_state_dicts_load_into_stacked_parameters():
    """Students saved before the factors were stacked (``norms.{t}.weight``, ``experts.{t}.A``) load."""
    norm = TaskBatchNorm(nn.BatchNorm2d(3), 2)
    old = {f"norms.{t}.{k}": v[t].clone() + t for k, v in norm.state_dict().items() for t in range(2)}
    norm.load_state_dict(old)
    assert torch.equal(norm.weight[1], torch.ones(3) + 1) and int(norm.num_batches_tracked[1]) == 1
