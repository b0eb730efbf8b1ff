"""The fused layout's custom autograd function keeps no per-task weight for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorkd

from test_experts_layers import randomise_experts


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``fn()`` runs."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(16, 32, 3, padding=1), (10, 16, 6, 6)),
    (lambda: nn.ConvTranspose3d(8, 8, 2, stride=2), (10, 8, 3, 3, 3)),
    (lambda: nn.Linear(64, 64), (10, 64)),
])
def test_fused_keeps_what_the_plain_layer_keeps_plus_the_factors(make, shape):
    torch.manual_seed(0)
    layer, x = make(), torch.randn(shape, requires_grad=True)
    ids = torch.arange(10) // 2  # sorted already: no permutation (whose index autograd would keep) at entry/exit
    plain = saved_bytes(lambda: layer(x))
    used = {}
    for layout in ("fused", "merged"):
        student = randomise_experts(lorkd.add_experts(layer, 5, rank=2, layout=layout))
        factors = sum(p.numel() * p.element_size() for t in range(5) for p in student.expert_parameters(t))
        used[layout] = saved_bytes(lambda: student(x, ids)) - factors
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    assert used["fused"] <= plain
    assert used["merged"] >= plain + 4 * weight_bytes  # one merged weight per task present


def test_fused_falls_back_to_merged_where_it_is_not_exact():
    for layer in (nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"),
                  nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        student = lorkd.add_experts(layer, 2, layout="fused")
        assert student.model.resolve_layout(2, torch.randn(2, 4, 5, 5)) == "merged"
    assert lorkd.add_experts(nn.Linear(3, 3), 2, layout="fused").model.resolve_layout(2) == "fused"
