"""Experts on transformer layers: MONAI ViT (tokens) and SwinUNETR (window attention, k rows per
sample), and routing of layers that see ``k * B`` rows.

``einops`` (which MONAI's attention blocks call) is not installed here; when it is missing the
few patterns these two networks use are supplied by :func:`_einops_patterns`, written out below.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorkd

from test_experts_layers import randomise_experts


def _rearrange(x, pattern, **sizes):
    """The einops ``rearrange`` patterns MONAI's ViT and SwinUNETR use, as permute/reshape."""
    channels_last = {"b c d h w -> b d h w c", "n c d h w -> n d h w c", "b c h w -> b h w c", "n c h w -> n h w c"}
    channels_first = {"b d h w c -> b c d h w", "n d h w c -> n c d h w", "b h w c -> b c h w", "n h w c -> n c h w"}
    if pattern in channels_last:
        return x.movedim(1, -1)
    if pattern in channels_first:
        return x.movedim(-1, 1)
    if pattern == "b h (qkv l d) -> qkv b l h d":
        b, h, _ = x.shape
        return x.view(b, h, sizes["qkv"], sizes["l"], -1).permute(2, 0, 3, 1, 4)
    if pattern == "b h (l d) -> b l h d":
        b, h, _ = x.shape
        return x.view(b, h, sizes["l"], -1).transpose(1, 2)
    if pattern == "b l h d -> b h (l d)":
        b, l, h, d = x.shape
        return x.transpose(1, 2).reshape(b, h, l * d)
    raise NotImplementedError(pattern)


class _Rearrange(nn.Module):
    def __init__(self, pattern, **sizes):
        super().__init__()
        self.pattern, self.sizes = pattern, sizes

    def forward(self, x):
        return _rearrange(x, self.pattern, **self.sizes)


@pytest.fixture
def _einops_patterns(monkeypatch):
    try:
        import einops  # noqa: F401
    except ImportError:
        from monai.networks.blocks import selfattention
        from monai.networks.nets import swin_unetr

        monkeypatch.setattr(selfattention, "Rearrange", _Rearrange)
        monkeypatch.setattr(swin_unetr, "rearrange", _rearrange)


def assert_mixed_batch_equals_extracted_experts(student, x, ids, pick=lambda out: out):
    student.eval()
    with torch.no_grad():
        mixed = pick(student(x, ids))
        for t in ids.unique().tolist():
            rows = ids == t
            expert = student.extract(t).eval()
            torch.testing.assert_close(mixed[rows], pick(expert(x[rows])), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(pick(student(x[rows], t)), pick(expert(x[rows])), rtol=1e-4, atol=1e-5)


def test_monai_vit_with_experts_on_attention_and_mlp(_einops_patterns):
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    model = ViT(in_channels=1, img_size=(16, 16, 16), patch_size=(8, 8, 8), hidden_size=24, mlp_dim=32,
                num_layers=2, num_heads=2, classification=True, num_classes=3)
    student = randomise_experts(lorkd.add_experts(model, 3, rank=2, targets=["*attn*", "*mlp*"]), std=0.1)
    names = [n for n, _ in student.expert_layers()]
    assert {"blocks.0.attn.qkv", "blocks.0.attn.out_proj", "blocks.0.mlp.linear1", "blocks.1.mlp.linear2"} <= set(names)
    x, ids = torch.randn(5, 1, 16, 16, 16), torch.tensor([2, 0, 1, 0, 2])
    assert_mixed_batch_equals_extracted_experts(student, x, ids, pick=lambda out: out[0])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_swin_unetr_window_attention_routes_k_rows_per_sample(_einops_patterns, spatial_dims):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                      window_size=4 if spatial_dims == 3 else 7, spatial_dims=spatial_dims)
    student = randomise_experts(lorkd.add_experts(model, 3, rank=2, targets=["*attn*", "*mlp*"]), std=0.05)
    assert any(n.endswith("attn.qkv") for n, _ in student.expert_layers())
    shape = (64, 64) if spatial_dims == 2 else (32, 32, 64)  # the bottleneck keeps > 1 voxel for its norm
    x, ids = torch.randn(3, 1, *shape), torch.tensor([2, 0, 2])
    assert_mixed_batch_equals_extracted_experts(student, x, ids)
    student(x, ids).square().mean().backward()  # gradients flow through the k-rows routing too (eval mode)
    assert all(torch.count_nonzero(p.grad[1]) == 0 for p in student.task_parameters())  # task 1 absent


class Tokens(nn.Module):
    """Flattens ``[B, N, C]`` tokens to ``[B * N, C]`` rows before a linear layer, as some models do."""

    def __init__(self):
        super().__init__()
        self.fc, self.conv = nn.Linear(4, 6), nn.Conv1d(6, 3, 1)

    def forward(self, x):
        b, n, c = x.shape
        h = self.fc(x.reshape(b * n, c))  # [B * N, 6]: N rows per sample, sample-major
        return self.conv(h.unsqueeze(-1)).view(b, n, 3)  # the conv too sees B * N rows


@pytest.mark.parametrize("layout", ["auto", "lowrank", "merged"])
def test_layers_with_k_rows_per_sample_equal_the_per_task_expert(layout):
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(Tokens(), 3, rank=2, layout=layout))
    x, ids = torch.randn(5, 4, 4, requires_grad=True), torch.tensor([1, 0, 2, 1, 0])
    out = student(x, ids)
    out.square().sum().backward()
    for t in range(3):
        rows = ids == t
        torch.testing.assert_close(out[rows], student.extract(t)(x[rows]))


def test_rows_that_are_not_a_multiple_of_the_batch_are_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.reshape(-1, 4)[:-1])

    student = lorkd.add_experts(Bad(), 2)
    with pytest.raises(RuntimeError, match=r"9 rows in a batch routed for 2.*k \* 2 rows"):
        student(torch.randn(2, 5, 4), torch.tensor([1, 0]))


def test_multihead_attention_packed_projection_is_listed_with_its_reason():
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(4, 8))
    model.add_module("attn", nn.MultiheadAttention(8, 2, batch_first=True))
    student = lorkd.add_experts(model, 2)  # targets=None: every layer
    skipped = {s.name: s.reason for s in student.skipped}
    assert "in_proj_weight" in skipped["attn"] and "out_proj" in skipped["attn"]
    assert "attn.out_proj" in skipped
    text = str(student.summary())
    assert "skipped attn (MultiheadAttention): its packed q/k/v input projection" in text
    assert [n for n, _ in student.expert_layers()] == ["embed"]
