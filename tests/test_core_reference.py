"""The student against an independent reference written here, in float64.

The reference never calls lorkd's own maths (no ``extract()``, no ``merged_weight``, no layout):
for every sample it builds ``W_t = W + (alpha / r) * B_t @ A_t`` from the expert's parameters
(``B_t @ A_t`` viewed in the shape of ``W``: ``[d0, d1]`` with ``d0`` the first weight dim) and
runs ``torch.nn.functional`` on that one sample. Outputs, the input gradient and every
parameter gradient of each layout must equal the reference's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorkd
from lorkd.experts import ExpertLayer

LAYOUTS = ["auto", "lowrank", "merged"]
ALPHA, RANK = 6.0, 3


from test_experts_layers import double_precision  # noqa: F401  (autouse: every test runs in float64)


def net1d():
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(),
        nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2, bias=False), nn.Tanh(),
        nn.Conv1d(6, 4, 1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 5),
    ), (3, 11)


def net2d():
    return nn.Sequential(
        nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0)), nn.Tanh(),
        nn.Conv2d(4, 4, 3, dilation=2, padding=2, groups=2), nn.Tanh(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.Tanh(),
        nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1), nn.Tanh(),
        nn.ConvTranspose2d(4, 4, 3, stride=1, dilation=2, groups=2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 10 * 18, 3),
    ), (2, 6, 8)


def net3d():
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv3d(4, 4, (1, 1, 3), padding=(0, 0, 1), groups=2, bias=False), nn.Tanh(),
        nn.ConvTranspose3d(4, 3, 2, stride=2), nn.Tanh(),
        nn.ConvTranspose3d(3, 2, 3, padding=1, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(2 * 4 * 4 * 6, 4),
    ), (2, 4, 4, 6)


NETS = {"1d": net1d, "2d": net2d, "3d": net3d}


def make_student(make, layout, num_tasks=4, seed=0):
    torch.manual_seed(seed)
    model, shape = make()
    student = lorkd.add_experts(model, num_tasks, rank=RANK, alpha=ALPHA, layout=layout)
    return nonzero_experts(student, seed + 1), shape


def nonzero_experts(student, seed=1):
    """Random ``A`` and ``B`` for every expert (``B`` starts at zero, which would hide every bug)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in student.expert_layers():
            for t in range(layer.num_tasks):  # task t's factors: rows t of the stacked A and B
                layer.A[t].copy_(torch.randn(layer.A[t].shape, generator=gen) * 0.4)
                layer.B[t].copy_(torch.randn(layer.B[t].shape, generator=gen) * 0.4)
    return student


def reference_weight(layer: ExpertLayer, task: int) -> torch.Tensor:
    """``W + (alpha / r) B_t A_t`` from the parameters, written out here."""
    weight = layer.base.weight
    a, b = layer.A[task], layer.B[task]
    assert a.shape == (RANK, weight[0].numel()) and b.shape == (weight.shape[0], RANK)
    return weight + (ALPHA / RANK) * (b @ a).reshape(weight.shape)


def reference_layer(layer: ExpertLayer, task: int, x: torch.Tensor) -> torch.Tensor:
    """One sample ``x`` ``[1, ...]`` through ``layer`` as a plain layer with task ``task``'s weight."""
    base, weight = layer.base, reference_weight(layer, task)
    if isinstance(base, nn.Linear):
        return x @ weight.t() + (0 if base.bias is None else base.bias)
    assert base.padding_mode == "zeros"
    dims = weight.dim() - 2
    if base.transposed:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return fn(x, weight, base.bias, base.stride, base.padding, base.output_padding, base.groups, base.dilation)
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return fn(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


def reference_forward(student, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Row by row through the student's Sequential, each expert layer replaced by its plain
    functional form with that row's task weight."""
    rows = []
    for i, task in enumerate(task_ids.tolist()):
        h = x[i:i + 1]
        for module in student.model:
            h = reference_layer(module, task, h) if isinstance(module, ExpertLayer) else module(h)
        rows.append(h)
    return torch.cat(rows)


def grads(out: torch.Tensor, x: torch.Tensor, params, cotangent: torch.Tensor):
    return torch.autograd.grad(out, [x, *params], cotangent, allow_unused=True)


def assert_matches_reference(student, x, task_ids, reference=reference_forward):
    params = [p for _, p in student.named_parameters()]
    names = ["input"] + [n for n, _ in student.named_parameters()]
    x = x.clone().requires_grad_(True)
    out = student(x, task_ids)
    ref = reference(student, x, task_ids)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    for name, got, want in zip(names, grads(out, x, params, cotangent), grads(ref, x, params, cotangent)):
        assert (got is None) == (want is None), name  # absent tasks: no gradient in both
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("net", sorted(NETS))
def test_every_layout_equals_the_row_by_row_reference(net, layout):
    student, shape = make_student(NETS[net], layout)
    x = torch.randn(7, *shape)
    task_ids = torch.tensor([2, 0, 3, 2, 0, 2, 3])  # unsorted, mixed, task 1 absent
    assert_matches_reference(student, x, task_ids)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_task_batch_and_int_task_id_equal_the_reference(layout):
    student, shape = make_student(net2d, layout)
    x = torch.randn(3, *shape)
    assert_matches_reference(student, x, torch.tensor([1, 1, 1]))
    torch.testing.assert_close(student(x, 1), reference_forward(student, x, torch.tensor([1, 1, 1])), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("net", ["2d", "3d"])
def test_inference_without_gradients_equals_the_reference(net, layout):
    student, shape = make_student(NETS[net], layout)
    x, ids = torch.randn(5, *shape), torch.tensor([3, 1, 0, 1, 3])
    with torch.no_grad():
        torch.testing.assert_close(student(x, ids), reference_forward(student, x, ids), rtol=1e-10, atol=1e-10)


def test_linear_layers_on_token_inputs_equal_the_reference():
    """Linear layers on ``[B, tokens, features]`` inputs (one sample, many rows inside it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 4, bias=False))
    for layout in LAYOUTS:
        student = lorkd.add_experts(model, 3, rank=RANK, alpha=ALPHA, layout=layout)
        with torch.no_grad():
            for _, layer in student.expert_layers():
                for t in range(layer.num_tasks):
                    layer.B[t].normal_(0, 0.4)
        assert_matches_reference(student, torch.randn(6, 4, 5), torch.tensor([1, 2, 0, 1, 1, 2]))


class GainNet(nn.Module):
    """A conv, a per-sample gain ``[B, 4]`` given as an extra input, then a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4 * 3 * 3, 3)

    def forward(self, x, gain, *, offset):
        return self.fc(torch.tanh(self.conv(x) * gain[:, :, None, None]).flatten(1)) + offset


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_sample_extra_inputs_equal_the_reference(layout):
    torch.manual_seed(0)
    student = lorkd.add_experts(GainNet(), 3, rank=RANK, alpha=ALPHA, layout=layout)
    nonzero_experts(student)
    x, gain, offset = torch.randn(6, 2, 5, 5), torch.randn(6, 4), torch.randn(6, 3)
    ids = torch.tensor([2, 0, 1, 2, 0, 0])
    out = student(x, ids, gain, offset=offset)
    conv, fc = student.model.conv, student.model.fc
    ref = torch.cat([
        reference_layer(fc, t, torch.tanh(reference_layer(conv, t, x[i:i + 1]) * gain[i, :, None, None]).flatten(1)) + offset[i]
        for i, t in enumerate(ids.tolist())
    ])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


class TokenRows(nn.Module):
    """Layers that see ``k`` rows per sample: ``[B, N, C]`` tokens flattened to ``[B * N, C]``."""

    def __init__(self):
        super().__init__()
        self.fc, self.conv = nn.Linear(5, 6), nn.Conv1d(6, 4, 1)

    def forward(self, x):
        b, n, c = x.shape
        h = torch.tanh(self.fc(x.reshape(b * n, c)))
        return self.conv(h.unsqueeze(-1)).reshape(b, n * 4)


def token_rows_reference(student, x, task_ids):
    fc, conv = student.model.fc, student.model.conv
    return torch.cat([
        reference_layer(conv, t, torch.tanh(reference_layer(fc, t, x[i])).unsqueeze(-1)).reshape(1, -1)
        for i, t in enumerate(task_ids.tolist())
    ])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layers_with_k_rows_per_sample_equal_the_reference(layout):
    torch.manual_seed(0)
    student = lorkd.add_experts(TokenRows(), 3, rank=RANK, alpha=ALPHA, layout=layout)
    nonzero_experts(student)
    x, ids = torch.randn(5, 3, 5), torch.tensor([1, 0, 2, 1, 0])
    assert_matches_reference(student, x, ids, reference=token_rows_reference)
