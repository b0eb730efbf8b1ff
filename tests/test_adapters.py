"""Adapters as files (lorkd.save_adapter / load_adapter): one task's factors and per-task norm values
saved apart from the base, loaded into any row of a student with the same base."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorkd
from lorkd.errors import DataError
from lorkd.experts.adapters import ADAPTER_META, ADAPTER_WEIGHTS, task_tensors

from test_experts_layers import randomise_experts


def net(dims: int) -> nn.Module:
    """A small network with a ConvNd, a per-task-able BatchNorm and a Linear (2D or 3D)."""
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
    return nn.Sequential(conv(1, 4, 3, padding=1), bn(4), nn.ReLU(), conv(4, 6, 3, stride=2), pool, nn.Flatten(),
                         nn.Linear(6, 3))


def student_of(dims: int = 2, rank: int = 2, norm: str = "per_task", seed: int = 0) -> lorkd.ExpertModel:
    """A 3-task student whose factors and per-task norm values differ per task; eval mode."""
    torch.manual_seed(seed)
    student = randomise_experts(lorkd.add_experts(net(dims), 3, rank=rank, alpha=4, norm=norm), std=0.3, seed=seed)
    with torch.no_grad():
        for name, tensor in task_tensors(student).items():
            if name.endswith(("weight", "bias", "running_mean")):
                tensor.add_(torch.randn(tensor.shape) * 0.2)
            elif name.endswith("running_var"):
                tensor.mul_(1 + torch.rand(tensor.shape))
    return student.eval()


def inputs(dims: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, *([8] * dims), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dims", [2, 3])
def test_round_trip_restores_the_row_and_leaves_the_others_bit_identical(dims, tmp_path):
    student = student_of(dims)
    x = inputs(dims)
    with torch.no_grad():
        before = {t: student(x, t) for t in range(3)}  # fills the merged-weight caches
    lorkd.save_adapter(student, 1, tmp_path / "a", name="liver")
    meta = json.loads((tmp_path / "a" / ADAPTER_META).read_text())
    assert meta["task"] == "liver" and meta["task_id"] == 1 and meta["num_tasks"] == 3
    assert set(meta["layers"]) == {"0", "3", "6"} and meta["layers"]["6"]["type"] == "Linear"
    assert meta["norms"] == {"1": {"weight": [4], "bias": [4], "running_mean": [4], "running_var": [4],
                                   "num_batches_tracked": []}}
    others = {n: torch.cat([t[:1], t[2:]]).clone() for n, t in task_tensors(student).items()}
    shared = {n: p.clone() for n, p in student.named_shared_parameters()}
    with torch.no_grad():
        for tensor in task_tensors(student).values():
            tensor[1].zero_()
        zeroed = student(x, 1)
    assert not torch.allclose(zeroed, before[1])  # the cache saw the zeroed row
    assert lorkd.load_adapter(student, tmp_path / "a") == 1
    with torch.no_grad():
        after = {t: student(x, t) for t in range(3)}
    assert torch.equal(after[1], before[1])
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    for n, t in task_tensors(student).items():
        assert torch.equal(torch.cat([t[:1], t[2:]]), others[n]), n
    assert all(torch.equal(p, shared[n]) for n, p in student.named_shared_parameters())


def test_adapter_of_task_0_loaded_into_row_1_makes_task_1_compute_task_0(tmp_path):
    student = student_of(2)
    x = inputs(2)
    with torch.no_grad():
        t0, t1 = student(x, 0), student(x, 1)
        mixed_before = student(x, torch.tensor([0, 1, 1, 2]))
    assert not torch.allclose(t0, t1)
    lorkd.save_adapter(student, 0, tmp_path / "t0")
    assert lorkd.load_adapter(student, tmp_path / "t0", task=1) == 1
    with torch.no_grad():
        assert torch.equal(student(x, 1), t0)
        mixed = student(x, torch.tensor([0, 1, 1, 2]))  # the mixed-batch path sees the swap too
    torch.testing.assert_close(mixed[1:3], t0[1:3])
    torch.testing.assert_close(mixed[[0, 3]], mixed_before[[0, 3]])
    assert torch.equal(student.extract(1)(x), t0)


def test_adapters_of_a_multitask_student_swap_on_its_backbone(tmp_path):
    from lorkd.models.backbones import backbone_spec
    from lorkd.models.classifier import MultiTaskClassifier

    torch.manual_seed(0)
    model = MultiTaskClassifier(backbone_spec("resnet18", 2, 1, 0.25, 1, {}), [2, 2],
                                {"rank": 2, "alpha": 4, "norm": "per_task", "targets": None})
    randomise_experts(model.backbone, std=0.1)
    model.eval()
    x, ids = inputs(2, 2), torch.tensor([0, 1])
    with torch.no_grad():
        ref = model.backbone(x, 0)
    paths = lorkd.save_adapters(model, tmp_path, names=["breast", "pneumonia"])
    assert sorted(lorkd.list_adapters(tmp_path)) == ["breast", "pneumonia"]
    assert lorkd.list_adapters(tmp_path)["pneumonia"]["task_id"] == 1
    lorkd.load_adapter(model, paths["breast"], task=1)
    with torch.no_grad():
        assert torch.equal(model.backbone(x, 1), ref)
        model(x, ids)  # still a working student


def test_wrong_base_is_refused_naming_both_fingerprints(tmp_path):
    student = student_of(2)
    lorkd.save_adapter(student, 0, tmp_path / "a")
    other = student_of(2, seed=1)  # same architecture, other shared weights
    with pytest.raises(DataError, match="another base model.*fingerprint"):
        lorkd.load_adapter(other, tmp_path / "a")
    # the same architecture after one more optimiser step on a shared weight: refused too
    with torch.no_grad():
        student.model[0].base.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(DataError, match="another base"):
        lorkd.load_adapter(student, tmp_path / "a")
    assert lorkd.load_adapter(student, tmp_path / "a", check_base=False) == 0


def test_wrong_rank_and_wrong_layers_are_refused_naming_the_layer(tmp_path):
    lorkd.save_adapter(student_of(2, rank=2), 0, tmp_path / "r2")
    with pytest.raises(DataError, match=r"layer '0': rank 2 in the adapter, 3 in the student"):
        lorkd.load_adapter(student_of(2, rank=3), tmp_path / "r2", check_base=False)
    only_conv = randomise_experts(lorkd.add_experts(net(2), 3, rank=2, alpha=4, norm="per_task",
                                                    targets=[nn.Conv2d])).eval()
    with pytest.raises(DataError, match=r"layers only in the adapter \['6'\]"):
        lorkd.load_adapter(only_conv, tmp_path / "r2", check_base=False)
    with pytest.raises(DataError, match="per-task norms differ"):
        lorkd.load_adapter(student_of(2, rank=2, norm="shared"), tmp_path / "r2", check_base=False)
    with pytest.raises(DataError, match=r"layer '0': type Conv2d in the adapter, Conv3d"):
        lorkd.load_adapter(student_of(3, rank=2), tmp_path / "r2", check_base=False)


def test_bad_files_and_bad_rows_are_refused(tmp_path):
    student = student_of(2)
    folder = lorkd.save_adapter(student, 2, tmp_path / "a")
    with pytest.raises(ValueError, match="task id 3 is out of range"):
        lorkd.load_adapter(student, folder, task=3)
    with pytest.raises(ValueError, match="out of range"):
        lorkd.save_adapter(student, 5, tmp_path / "b")
    lorkd.save_adapter(student, 1, tmp_path / "c")
    (folder / ADAPTER_WEIGHTS).write_bytes((tmp_path / "c" / ADAPTER_WEIGHTS).read_bytes())  # a torn pair
    with pytest.raises(DataError, match="different saves"):
        lorkd.load_adapter(student, folder)
    (folder / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="not a readable safetensors"):
        lorkd.load_adapter(student, folder)
    (folder / ADAPTER_META).write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(DataError, match="not a lorkd adapter"):
        lorkd.load_adapter(student, folder)
    with pytest.raises(DataError, match="file not found"):
        lorkd.load_adapter(student, tmp_path / "missing")
    with pytest.raises(ValueError, match="no ExpertModel"):
        lorkd.save_adapter(net(2), 0, tmp_path / "d")


def test_files_are_written_atomically(tmp_path, monkeypatch):
    """A save that fails while writing the tensors leaves the previous adapter intact and no temp file."""
    student = student_of(2)
    folder = lorkd.save_adapter(student, 0, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(tensors, path):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("lorkd.experts.adapters.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lorkd.save_adapter(student, 1, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert lorkd.load_adapter(student, folder) == 0
