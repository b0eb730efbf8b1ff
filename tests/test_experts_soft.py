"""Soft routing (mixture weights ``[B, T]``): per row ``W + sum_t w_t (alpha / r) B_t A_t`` in every
layer type and layout; one-hot weights equal hard ids in values and gradients; bad weights are
refused naming the problem; per-task norms follow each row's top task."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorkd
from lorkd.experts.routing import top_k_weights

from test_experts_layers import LAYERS, double_precision, randomise_experts  # noqa: F401  (autouse fixture)


def random_weights(rows: int, tasks: int, seed: int = 0, zero_task: int | None = None) -> torch.Tensor:
    w = torch.rand(rows, tasks, generator=torch.Generator().manual_seed(seed)) + 0.05
    if zero_task is not None:
        w[:, zero_task] = 0
    return w / w.sum(dim=1, keepdim=True)


def mixed_copy(layer: lorkd.ExpertLayer, w_row: torch.Tensor) -> nn.Module:
    """The wrapped layer with weight ``W + s sum_t w_t B_t A_t`` (computed task by task)."""
    plain = copy.deepcopy(layer.base)
    with torch.no_grad():
        delta = sum(w_row[t] * (layer.B[t] @ layer.A[t]) for t in range(layer.num_tasks))
        plain.weight.add_(layer.scale * delta.view_as(plain.weight))
    return plain


@pytest.mark.parametrize("layout", ["lowrank", "merged"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_row_runs_with_its_mixture_of_experts(name, layout):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer, x = make(), torch.randn(shape)
    student = randomise_experts(lorkd.add_experts(nn.Sequential(layer), 3, rank=2, alpha=6, layout=layout))
    w = random_weights(x.shape[0], 3)
    out = student(x, w)
    expert_layer = student.model[0]
    for i in range(x.shape[0]):
        torch.testing.assert_close(out[i:i + 1], mixed_copy(expert_layer, w[i])(x[i:i + 1]), rtol=1e-9, atol=1e-9)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.ConvTranspose2d(6, 4, 2, stride=2),
        nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )


@pytest.mark.parametrize("norm", ["shared", "per_task"])
@pytest.mark.parametrize("layout", ["lowrank", "merged"])
def test_one_hot_weights_equal_hard_ids_in_values_and_gradients(layout, norm):
    x, ids = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 3, 1, 0, 3])  # task 2 absent
    results = []
    for soft in (False, True):
        student = randomise_experts(lorkd.add_experts(small_cnn(), 4, rank=2, norm=norm, layout=layout)).train()
        routing = nn.functional.one_hot(ids, 4).to(torch.float64).requires_grad_() if soft else ids
        out = student(x, routing)
        out.pow(2).sum().backward()
        results.append((out, [(n, p.grad) for n, p in student.named_parameters()], list(student.buffers())))
    (hard, hard_grads, hard_buffers), (soft, soft_grads, soft_buffers) = results
    torch.testing.assert_close(soft, hard, rtol=1e-10, atol=1e-12)
    for (name, a), (_, b) in zip(hard_grads, soft_grads):
        if a is None:  # a shared parameter with no gradient under hard ids gets none under weights
            assert b is None, name
            continue
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for a, b in zip(hard_buffers, soft_buffers):
        torch.testing.assert_close(a, b)


def test_weights_get_gradients_that_match_finite_differences():
    student = randomise_experts(lorkd.add_experts(small_cnn(), 3, rank=2)).eval()
    x = torch.randn(4, 3, 6, 6)
    w = random_weights(4, 3).requires_grad_()
    torch.autograd.gradcheck(lambda v: student(x, v / v.sum(1, keepdim=True)), (w,), eps=1e-6, atol=1e-6)


def test_layouts_agree_under_soft_routing_in_value_and_gradient():
    x, w = torch.randn(5, 3, 7, 7), random_weights(5, 4)
    grads, outs = {}, {}
    for layout in ("lowrank", "merged"):
        student = randomise_experts(lorkd.add_experts(small_cnn(), 4, rank=3, layout=layout))
        v = w.clone().requires_grad_()
        outs[layout] = student(x, v)
        outs[layout].square().sum().backward()
        grads[layout] = [p.grad for p in student.parameters()] + [v.grad]
    torch.testing.assert_close(outs["lowrank"], outs["merged"])
    for a, b in zip(grads["lowrank"], grads["merged"]):
        torch.testing.assert_close(a, b)


def test_several_rows_per_sample_take_their_sample_weights():
    class Windows(nn.Module):  # 3 rows per sample, sample-major, through a Linear
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.reshape(x.shape[0] * 3, 4)).view(x.shape[0], 3, 2)

    student = randomise_experts(lorkd.add_experts(Windows(), 3))
    x, w = torch.randn(5, 12), random_weights(5, 3)
    out = student(x, w)
    for i in range(5):
        torch.testing.assert_close(out[i], mixed_copy(student.model.fc, w[i])(x[i].view(3, 4)))


@pytest.mark.parametrize("weights, message", [
    (torch.full((6, 3), 1 / 3), r"shape \[6, 4\]"),
    (torch.full((6, 4, 1), 0.25), r"shape \[6, 4\]"),
    (torch.full((5, 4), 0.25), r"shape \[6, 4\]"),
    (torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 5 + [[1.5, -0.5, 0.0, 0.0]]), "non-negative: row 5"),
    (torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 5 + [[0.5, 0.4, 0.0, 0.0]]), "sum to 1.*row 5 sums to 0.9"),
    (torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 5 + [[float("nan"), 0.5, 0.0, 0.0]]), "finite: row 5"),
    (torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]), "integer dtype.*mixture weights"),
])
def test_bad_weights_are_refused_naming_the_problem(weights, message):
    student = lorkd.add_experts(small_cnn(), 4)
    with pytest.raises(ValueError, match=message):
        student(torch.randn(6, 3, 8, 8), weights)


def test_weights_within_tolerance_are_accepted_and_half_precision_gets_a_wider_one():
    student = lorkd.add_experts(small_cnn(), 4)
    w = torch.full((6, 4), 0.25)
    w[0, 0] += 5e-5
    student(torch.randn(6, 3, 8, 8), w)
    w[0, 0] += 1e-3
    with pytest.raises(ValueError, match="sum to 1"):
        student(torch.randn(6, 3, 8, 8), w)
    from lorkd.experts.routing import check_weights
    check_weights(w.to(torch.bfloat16), 6, 4)  # 1e-3 off is within half precision's 1e-2


def test_top_k_keeps_the_largest_weights_renormalised():
    p = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.05, 0.05, 0.5]])
    torch.testing.assert_close(top_k_weights(p, 1), torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(top_k_weights(p, 2), torch.tensor([[0.0, 0.625, 0.375, 0.0], [4 / 9, 0.0, 0.0, 5 / 9]]))
    torch.testing.assert_close(top_k_weights(p, 4), p)
    for bad in (0, 5, 1.0, True):
        with pytest.raises(ValueError, match="top_k"):
            top_k_weights(p, bad)


def test_top_1_weights_route_as_hard_ids_of_the_argmax():
    student = randomise_experts(lorkd.add_experts(small_cnn(), 4, norm="per_task"))
    x, p = torch.randn(6, 3, 8, 8), random_weights(6, 4, seed=3)
    torch.testing.assert_close(student(x, top_k_weights(p, 1)), student(x, p.argmax(1)), rtol=1e-10, atol=1e-12)


def norm_student(targets):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    student = randomise_experts(lorkd.add_experts(model, 3, targets=targets, norm="per_task")).train()
    seen = {}
    student.model[1].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    return student, seen


def test_per_task_norm_normalises_each_row_as_a_row_of_its_top_task():
    x, w = torch.randn(6, 3, 8, 8), random_weights(6, 3, seed=1)
    top = w.argmax(1)
    assert len(set(top.tolist())) > 1
    c = torch.randn(6, 4, 6, 6)
    runs = []
    for routing in (top, w.clone().requires_grad_()):
        # experts on the last layer only: the norm's input does not depend on the routing
        student, seen = norm_student(["4"])
        xg = x.clone().requires_grad_()
        student(xg, routing)
        (seen["out"] * c).sum().backward()
        runs.append((seen["out"], xg.grad, [p.grad for p in student.model[1].parameters()], list(student.model[1].buffers())))
    (out_h, gx_h, gp_h, buf_h), (out_s, gx_s, gp_s, buf_s) = runs
    torch.testing.assert_close(out_s, out_h)  # statistics, running statistics and affine of the top task
    torch.testing.assert_close(gx_s, gx_h)
    for a, b in zip(gp_s + buf_s, gp_h + buf_h):
        torch.testing.assert_close(a, b)


def test_under_soft_routing_a_loss_on_one_top_task_reaches_only_that_tasks_norm_and_the_weights_through_experts():
    student, seen = norm_student(None)  # experts before and after the norm
    x, w = torch.randn(6, 3, 8, 8), random_weights(6, 3, seed=1).requires_grad_()
    top = w.argmax(1)
    rows = top == top[0]
    student(x, w)
    seen["out"][rows].square().sum().backward()
    norm = student.model[1]
    others = torch.arange(3) != top[0]
    assert norm.weight.grad[others].abs().max() == 0 and norm.bias.grad[others].abs().max() == 0
    assert norm.weight.grad[top[0]].abs().max() > 0
    # the weights of those rows get gradients through the first layer's experts; other rows' none
    assert w.grad[rows].abs().max() > 0 and w.grad[~rows].abs().max() == 0
    # every expert of the first layer with a non-zero weight on those rows gets a gradient
    assert (student.model[0].A.grad.flatten(1).abs().amax(1) > 0).all()


def test_a_task_with_zero_weight_everywhere_gets_zero_gradient_and_is_kept_by_the_optimiser():
    student = randomise_experts(lorkd.add_experts(small_cnn(), 4, rank=2, norm="per_task")).train()
    w = random_weights(6, 4, zero_task=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    lorkd.keep_absent_experts(opt, student)
    before = [p[2].clone() for p in student.task_parameters()]
    student(torch.randn(6, 3, 8, 8), w).square().sum().backward()
    assert student.tasks_seen.tolist() == [True, True, False, True]
    for name, p in student.named_task_parameters():
        if ".A" in name or ".B" in name:
            assert p.grad[2].abs().max() == 0, name
            assert p.grad[0].abs().max() > 0, name
    opt.step()
    for p, b in zip(student.task_parameters(), before):
        assert torch.equal(p[2], b)


@pytest.mark.parametrize("layout", ["lowrank", "merged"])
def test_weights_of_another_float_dtype_than_the_model_are_used_in_the_models_dtype(layout):
    student = randomise_experts(lorkd.add_experts(small_cnn(), 4, layout=layout))  # float64
    x, w = torch.randn(6, 3, 8, 8), random_weights(6, 4)
    out = student(x, w.float())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, student(x, w), rtol=1e-6, atol=1e-6)
