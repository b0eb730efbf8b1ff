"""``torch.compile(student, fullgraph=True)``: a training step with mixed task ids is one graph
(no graph break), a different task mix of the same batch size does not recompile, and values and
gradients equal eager mode's."""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lorkd


def small_student():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    student = lorkd.add_experts(model, 4, rank=2, norm="per_task").train()
    with torch.no_grad():
        for p in student.task_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return student


def test_compiled_training_step_is_one_graph_for_every_task_mix():
    torch._dynamo.reset()
    eager, compiled_student = small_student(), small_student()
    backend = CompileCounterWithBackend("aot_eager")  # traces forward and backward, no C compiler needed
    compiled = torch.compile(compiled_student, backend=backend, fullgraph=True)
    x = torch.randn(6, 2, 8, 8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ids in (torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([3, 3, 0, 1, 1, 1]), torch.tensor([2, 2, 2, 2, 2, 2])):
            for student in (eager, compiled_student):
                student.zero_grad(set_to_none=True)
            got = compiled(x, ids)
            want = eager(x, ids)
            got.square().mean().backward()
            want.square().mean().backward()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for (name, a), b in zip(compiled_student.named_parameters(), eager.parameters()):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert backend.frame_count == 1  # one graph, compiled once for three different task mixes
    for a, b in zip(compiled_student.buffers(), eager.buffers()):  # per-task running statistics too
        torch.testing.assert_close(a, b)


def test_compiled_soft_routing_is_one_graph_for_any_weights_and_equals_eager():
    torch._dynamo.reset()
    eager, compiled_student = small_student(), small_student()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_student, backend=backend, fullgraph=True)
    x, gen = torch.randn(6, 2, 8, 8), torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            w = torch.rand(6, 4, generator=gen)
            w = w / w.sum(dim=1, keepdim=True)
            grads = []
            for student, fn in ((compiled_student, compiled), (eager, eager)):
                student.zero_grad(set_to_none=True)
                v = w.clone().requires_grad_()
                out = fn(x, v)
                out.square().mean().backward()
                grads.append((out, v.grad, [p.grad for p in student.parameters()]))
            (got, got_w, got_p), (want, want_w, want_p) = grads
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-6)
            for a, b in zip(got_p, want_p):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert backend.frame_count == 1
