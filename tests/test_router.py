"""MoLA-Router: the router network, the routed student (soft, top-k, top-1 as hard ids) and TwD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorkd
from lorkd.distill import router_loss, twd_loss
from lorkd.models.router import Routed, RoutedStudent, TaskRouter


def cnn(spatial_dims=2):
    conv, norm, pool = {2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d), 3: (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d)}[spatial_dims]
    return nn.Sequential(conv(1, 6, 3, padding=1), norm(6), nn.ReLU(), conv(6, 6, 3, padding=1), pool(1), nn.Flatten(), nn.Linear(6, 4))


def routed(spatial_dims=2, top_k=None, temperature=1.0, num_tasks=3, norm="per_task"):
    torch.manual_seed(0)
    student = lorkd.add_experts(cnn(spatial_dims), num_tasks, rank=2, norm=norm)
    with torch.no_grad():
        for p in student.task_parameters():
            p.add_(0.2 * torch.randn_like(p))
    router = TaskRouter(1, num_tasks, spatial_dims=spatial_dims, channels=(4, 8), projection_dim=5)
    return RoutedStudent(student, router, temperature=temperature, top_k=top_k)


@pytest.mark.parametrize("spatial_dims, size", [(2, (10, 9)), (3, (6, 7, 5))])
def test_router_and_routed_student_shapes(spatial_dims, size):
    model = routed(spatial_dims)
    x = torch.randn(5, 1, *size)
    out = model(x)
    assert isinstance(out, Routed)
    assert out.output.shape == (5, 4) and out.logits.shape == (5, 3) and out.projection.shape == (5, 5)
    assert out.routing.shape == (5, 3) and out.routing.dtype == x.dtype
    torch.testing.assert_close(out.routing.sum(1), torch.ones(5))
    assert out.tasks.shape == (5,)


def test_router_refuses_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="spatial_dims"):
        TaskRouter(1, 3, spatial_dims=4)
    with pytest.raises(ValueError, match="channels"):
        TaskRouter(1, 3, channels=())
    with pytest.raises(ValueError, match="num_tasks"):
        TaskRouter(1, 0)
    with pytest.raises(ValueError, match=r"expects input \[B, 1, \*, \*\]"):
        TaskRouter(1, 3)(torch.randn(2, 3, 8, 8))
    student = lorkd.add_experts(cnn(), 3)
    with pytest.raises(ValueError, match="temperature"):
        RoutedStudent(student, TaskRouter(1, 3), temperature=0)
    with pytest.raises(ValueError, match=r"top_k .*\[1, 3\]"):
        RoutedStudent(student, TaskRouter(1, 3), top_k=4)
    with pytest.raises(ValueError, match=r"logits of shape \[2, 2\]"):
        RoutedStudent(student, TaskRouter(1, 2))(torch.randn(2, 1, 8, 8))


def test_task_losses_reach_every_router_parameter_through_soft_routing():
    model = routed().train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    F.cross_entropy(model(x).output, y).backward()  # the task loss only, no router loss
    for name, p in model.router.named_parameters():
        if name.startswith("projector"):
            assert p.grad is None, name  # the projection feeds TwD only
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name


def test_top_1_equals_hard_routing_by_the_routers_argmax_and_sends_no_task_gradient_to_the_router():
    model = routed(top_k=1).train()
    x = torch.randn(6, 1, 8, 8)
    out = model(x)
    assert out.routing.dtype == torch.long
    torch.testing.assert_close(out.routing, out.logits.argmax(1))
    reference = routed(top_k=1).train()  # same initial weights and running statistics
    torch.testing.assert_close(out.output, reference.student(x, out.logits.argmax(1)))
    out.output.sum().backward()
    assert all(p.grad is None for p in model.router.parameters())


def test_top_k_and_temperature_shape_the_weights():
    model = routed(top_k=2, temperature=0.5)
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 1.0]])
    w = model.routing_weights(logits)
    p = torch.softmax(logits / 0.5, 1)
    want = torch.stack([torch.tensor([0.0, p[0, 1], p[0, 2]]), torch.tensor([p[1, 0], 0.0, p[1, 2]])])
    torch.testing.assert_close(w, want / want.sum(1, keepdim=True))


def test_given_task_ids_override_the_router():
    model = routed().eval()
    x, ids = torch.randn(4, 1, 8, 8), torch.tensor([2, 0, 1, 2])
    out = model(x, ids)
    torch.testing.assert_close(out.output, model.student(x, ids))
    assert out.routing is ids and out.logits.shape == (4, 3)


def test_a_multitask_classifier_is_routed_softly_with_heads_of_the_top_task():
    from lorkd.models.backbones import backbone_spec
    from lorkd.models.classifier import MultiTaskClassifier

    torch.manual_seed(0)
    net = MultiTaskClassifier(backbone_spec("resnet10", 2, 1, widen=0.125), [2, 3], {"rank": 2, "alpha": 4}).eval()
    model = RoutedStudent(net, TaskRouter(1, 2, channels=(4,)), top_k=None).eval()
    x = torch.randn(5, 1, 16, 16)
    out = model(x)
    top = out.logits.argmax(1)
    for t, rows in out.output.rows.items():
        assert (top[rows] == t).all()
        want = net.heads[t](net.backbone(x, out.routing)[rows])
        torch.testing.assert_close(out.output.logits[t], want)
    with pytest.raises(ValueError, match="sum to 1"):
        MultiTaskClassifier(backbone_spec("resnet10", 2, 1, widen=0.125), [2, 3])(x, torch.full((5, 2), 0.3))


# ---------------------------------------------------------------------------------------- TwD
def test_twd_against_a_hand_computed_value():
    z = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # normalised: e1, e1, e2
    ids = torch.tensor([0, 0, 1])
    # anchors 0 and 1: one positive (similarity 1), one negative (0); anchor 2 has no positive
    want = -(1.0 - math.log(math.e + 1.0))
    torch.testing.assert_close(twd_loss(z, ids, temperature=1.0), torch.tensor(want))
    # temperature 0.5 and a third sample of task 0 at 90 degrees: anchor 0's positives are 1 (sim 1) and 3 (sim 0)
    z4, ids4 = torch.cat([z, torch.tensor([[0.0, -1.0]])]), torch.tensor([0, 0, 1, 0])
    t = 0.5

    def l(pos, others):
        den = sum(math.exp(s / t) for s in others)
        return -sum(s / t - math.log(den) for s in pos) / len(pos)
    # similarities: 0-1: 1, 0-2: 0, 0-3: 0, 1-2: 0, 1-3: 0, 2-3: -1
    anchors = [l([1, 0], [1, 0, 0]), l([1, 0], [1, 0, 0]), l([0, 0], [0, 0, -1])]  # 0, 1, 3 (2 has no positive)
    torch.testing.assert_close(twd_loss(z4, ids4, temperature=t), torch.tensor(sum(anchors) / 3))


def test_twd_is_lower_for_task_separated_embeddings_than_for_mixed_ones():
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(12) % 3
    centres = torch.randn(3, 8, generator=gen) * 3
    separated = centres[ids] + 0.1 * torch.randn(12, 8, generator=gen)
    mixed = torch.randn(12, 8, generator=gen)
    assert twd_loss(separated, ids) < twd_loss(mixed, ids) - 1.0


def test_twd_without_positives_is_zero_and_differentiable_and_bad_inputs_are_refused():
    z = torch.randn(3, 4, requires_grad=True)
    loss = twd_loss(z, torch.tensor([0, 1, 2]))
    assert loss.item() == 0
    loss.backward()
    assert z.grad is not None
    with pytest.raises(ValueError, match="projection"):
        twd_loss(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="task_ids"):
        twd_loss(torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="temperature"):
        twd_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), temperature=0)


def test_router_loss_combines_twd_and_cross_entropy_and_trains_the_router_to_route():
    torch.manual_seed(0)
    logits, proj, ids = torch.randn(6, 3), torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(router_loss(logits, proj, ids, twd_weight=0.1, task_loss_weight=0.5),
                               0.1 * twd_loss(proj, ids) + 0.5 * F.cross_entropy(logits, ids))
    torch.testing.assert_close(router_loss(logits, proj, ids), 0.1 * twd_loss(proj, ids))
    with pytest.raises(ValueError, match="twd_weight"):
        router_loss(logits, proj, ids, twd_weight=-1)
    # two tasks that differ in mean intensity: a few steps of router loss + task loss route them apart
    model = routed(num_tasks=2).train()
    x = torch.randn(32, 1, 8, 8)
    ids = torch.arange(32) % 2
    x[ids == 1] += 2.0
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        out = model(x)
        loss = out.output.square().mean() + router_loss(out.logits, out.projection, ids, twd_weight=0.1, task_loss_weight=1.0)
        loss.backward()
        opt.step()
    model.eval()
    assert (model(x).tasks == ids).float().mean() == 1.0
