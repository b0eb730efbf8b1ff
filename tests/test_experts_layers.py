"""Every layer type and path: a student's output equals the plain layer run with merged weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorkd
from lorkd.experts import ExpertLayer



@pytest.fixture(autouse=True)
def double_precision():
    """Exactness tests compare in double precision; restore the default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def randomise_experts(student, std=0.3, seed=0):
    """Give every expert non-zero factors (B starts at zero, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in student.expert_layers():
            for t in range(layer.num_tasks):  # task t's factors: rows t of the stacked A and B
                layer.A[t].copy_(torch.randn(layer.A[t].shape, generator=gen) * std)
                layer.B[t].copy_(torch.randn(layer.B[t].shape, generator=gen) * std)
    return student


def check_against_merged(layer: nn.Module, x: torch.Tensor, task_ids: torch.Tensor, num_tasks: int, rank=3, layout="auto"):
    """student(x, ids) row i == plain layer with task ids[i]'s merged weight applied to x[i]."""
    student = randomise_experts(lorkd.add_experts(nn.Sequential(layer), num_tasks, rank=rank, alpha=6, layout=layout))
    out = student(x, task_ids)
    for t in range(num_tasks):
        rows = task_ids == t
        if not rows.any():
            continue
        expert = student.extract(t)
        assert type(expert[0]) is type(layer)
        torch.testing.assert_close(out[rows], expert(x[rows]), rtol=1e-9, atol=1e-9)
    return student, out


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (6, 7)),
    "linear_3d_input_no_bias": (lambda: nn.Linear(7, 5, bias=False), (6, 4, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (6, 3, 11)),
    "conv2d_strided_nonsquare": (lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0)), (6, 3, 9, 8)),
    "conv2d_dilated_no_bias": (lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2, bias=False), (6, 4, 10, 10)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (6, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), (6, 4, 7, 7)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (6, 3, 8, 8)),
    "conv2d_circular_same": (lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="circular"), (6, 3, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (6, 2, 5, 6, 7)),
    "conv3d_1x1x1": (lambda: nn.Conv3d(2, 3, 1), (6, 2, 4, 4, 4)),
    "conv3d_11k": (lambda: nn.Conv3d(2, 3, (1, 1, 3), padding=(0, 0, 1)), (6, 2, 4, 4, 5)),
    "convT1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (6, 3, 5)),
    "convT2d_outpad_no_bias": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1, bias=False), (6, 3, 5, 4)),
    "convT2d_grouped_dilated": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2), (6, 4, 4, 4)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=2), (6, 2, 3, 4, 3)),
}


@pytest.mark.parametrize("layout", ["auto", "lowrank", "merged"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_equals_plain_layer_with_merged_weights(name, layout):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer, x = make(), torch.randn(shape)
    task_ids = torch.tensor([2, 0, 1, 0, 2, 2])
    check_against_merged(layer, x, task_ids, num_tasks=3, layout=layout)


def test_all_layouts_agree_in_value_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 9, 9)
    ids = torch.tensor([1, 0, 3, 1, 1, 0, 3, 2])
    grads, model = {}, nn.Sequential(nn.Conv2d(3, 4, 3))
    for layout in ("lowrank", "merged"):
        student = randomise_experts(lorkd.add_experts(model, 4, rank=2, layout=layout))
        student(x, ids).pow(2).sum().backward()
        grads[layout] = [p.grad.clone() for p in student.parameters()]
    for other in ("merged",):
        for a, b in zip(grads["lowrank"], grads[other]):
            torch.testing.assert_close(a, b)


def test_output_size_argument_of_transposed_conv_is_honoured():
    layer = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    student = randomise_experts(lorkd.add_experts(layer, 2))
    x, ids = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 1, 0])
    out = student(x, ids, output_size=[10, 10])
    assert out.shape == (4, 2, 10, 10)
    expert = student.extract(1)
    torch.testing.assert_close(out[1:3], expert(x[1:3], output_size=[10, 10]))


@settings(max_examples=40, deadline=None)
@given(
    spatial=st.sampled_from([1, 2, 3]),
    transposed=st.booleans(),
    in_groups=st.sampled_from([(2, 1), (4, 2), (2, 2)]),
    out_mult=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    rank=st.integers(1, 5),
    task_ids=st.lists(st.integers(0, 3), min_size=1, max_size=7),
    size=st.integers(5, 7),  # >= the dilated kernel (3 - 1) * 2 + 1
)
def test_any_conv_shape_and_task_mix(spatial, transposed, in_groups, out_mult, kernel, stride, dilation, bias, rank, task_ids, size):
    in_ch, groups = in_groups
    out_ch = groups * out_mult
    kind = [None, (nn.Conv1d, nn.ConvTranspose1d), (nn.Conv2d, nn.ConvTranspose2d), (nn.Conv3d, nn.ConvTranspose3d)][spatial]
    layer = kind[transposed](in_ch, out_ch, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias)
    x = torch.randn(len(task_ids), in_ch, *([size] * spatial))
    check_against_merged(layer, x, torch.tensor(task_ids), num_tasks=4, rank=rank)


def test_rows_come_back_in_input_order_for_tuple_and_dict_outputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            return {"logits": y, "pair": (y * 2, [y + 1])}

    student = randomise_experts(lorkd.add_experts(TwoHeads(), 2))
    x, ids = torch.randn(5, 3), torch.tensor([1, 0, 1, 0, 0])
    out = student(x, ids)
    ref = torch.stack([student.extract(int(t)).fc(x[i]) for i, t in enumerate(ids)])
    torch.testing.assert_close(out["logits"], ref)
    torch.testing.assert_close(out["pair"][0], ref * 2)
    torch.testing.assert_close(out["pair"][1][0], ref + 1)


def test_fresh_student_computes_what_the_model_computes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    student = lorkd.add_experts(model, 3)
    x = torch.randn(5, 2, 6, 6)
    torch.testing.assert_close(student(x, torch.tensor([0, 2, 1, 1, 0])), model(x))


def test_add_experts_does_not_modify_the_given_model():
    model = nn.Sequential(nn.Linear(3, 3))
    lorkd.add_experts(model, 2)
    assert type(model[0]) is nn.Linear


def test_layer_called_without_routing_says_how_to_call_it():
    student = lorkd.add_experts(nn.Sequential(nn.Linear(3, 3)), 2)
    with pytest.raises(RuntimeError, match="without task ids"):
        student.model(torch.randn(2, 3))


def test_a_bare_layer_can_be_the_whole_model():
    student = randomise_experts(lorkd.add_experts(nn.Linear(2, 3), 2))
    assert isinstance(student.model, ExpertLayer)
    expert = student.extract(1)
    assert type(expert) is nn.Linear
    x = torch.randn(4, 2)
    torch.testing.assert_close(student(x, 1), expert(x))


@pytest.mark.parametrize("layout", ["merged", "lowrank"])
def test_small_float32_3d_batches_take_onednn_with_the_same_values_and_gradients(layout):
    """Per-task segments of 1 row in 3D go to oneDNN directly (PyTorch's own choice is a slow
    native kernel); values and gradients equal float64's within float32 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Conv3d(4, 3, 1, bias=False))
    student = randomise_experts(lorkd.add_experts(model, 2, rank=2, layout=layout)).float()
    x, ids = torch.randn(2, 2, 6, 6, 6, dtype=torch.float32, requires_grad=True), torch.tensor([1, 0])
    with torch.profiler.profile() as prof:
        out = student(x, ids)
    assert not any("slow_conv3d" in e.key for e in prof.key_averages())
    out.square().sum().backward()
    got = [x.grad] + [p.grad for p in student.parameters()]
    ref_student = student.double()
    ref_x = x.detach().double().requires_grad_(True)
    for p in ref_student.parameters():
        p.grad = None
    ref = ref_student(ref_x, ids)  # float64: PyTorch's own kernels
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(got, [ref_x.grad] + [p.grad for p in ref_student.parameters()]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
