"""ExpertModel: gradient separation, parameter partition, extraction of real MONAI nets, errors."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet, resnet18
from torch import nn

import lorkd
from lorkd.experts import ExpertLayer, TaskBatchNorm

from test_experts_layers import randomise_experts


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def loss_on_task(student, x, ids, task):
    out = student(x, ids)
    return out[ids == task].pow(2).sum()


@pytest.mark.parametrize("layout", ["auto", "stacked", "lowrank", "merged", "fused"])
def test_loss_of_one_task_gives_other_experts_exactly_zero_gradient(layout):
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(small_cnn(), 4, rank=2, norm="per_task", layout=layout)).train()
    x, ids = torch.randn(8, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])  # task 3 absent
    loss_on_task(student, x, ids, task=1).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.expert_parameters(1))
    for task in (0, 2):
        for name, p in student.named_expert_parameters(task):
            assert p.grad is not None, name  # the task was in the batch, so it was used ...
            assert torch.count_nonzero(p.grad) == 0, name  # ... but its gradient is exactly zero
    for name, p in student.named_expert_parameters(3):
        assert p.grad is None, name  # absent task: no gradient at all, not even zeros


def test_shared_batchnorm_leaks_across_tasks_as_documented():
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(small_cnn(), 3, rank=2, norm="shared")).train()
    x, ids = torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_on_task(student, x, ids, task=1).backward()
    leaked = sum(p.grad.abs().sum() for p in student.expert_parameters(0) if p.grad is not None)
    assert leaked > 0  # batch statistics mix tasks: why norm="per_task" exists


def test_absent_experts_are_untouched_by_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(small_cnn(), 3, rank=2, norm="per_task")).train()
    before = {n: p.detach().clone() for t in (0, 2) for n, p in student.named_expert_parameters(t)}
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        x, ids = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 1, 0])
        student(x, ids).pow(2).mean().backward()
        opt.step()
    for name, p in student.named_expert_parameters(2):
        assert torch.equal(p, before[name]), name
        assert p not in opt.state or not opt.state[p], name  # no momentum buffer either
    assert all(not torch.equal(p, before[n]) for n, p in student.named_expert_parameters(0))  # task 0 did learn


def test_expert_and_shared_parameters_partition_all_parameters():
    student = lorkd.add_experts(small_cnn(), 3, rank=2, norm="per_task")
    ids = [id(p) for p in student.shared_parameters()]
    for t in range(3):
        ids += [id(p) for p in student.expert_parameters(t)]
    assert sorted(ids) == sorted(id(p) for p in student.parameters())
    assert len(ids) == len(set(ids))
    names = {n for t in range(3) for n, _ in student.named_expert_parameters(t)}
    assert names <= {n for n, _ in student.named_parameters()}


@pytest.mark.parametrize("norm", ["shared", "per_task"])
def test_extract_monai_resnet18_2d_matches_student_in_eval(norm):
    torch.manual_seed(0)
    model = resnet18(spatial_dims=2, n_input_channels=1, num_classes=5)
    student = randomise_experts(lorkd.add_experts(model, 3, norm=norm), std=0.05)
    student.train()
    for _ in range(2):  # give the (per-task) BatchNorms different running statistics
        student(torch.randn(6, 1, 32, 32), torch.tensor([0, 1, 2, 2, 1, 0]))
    student.eval()
    x = torch.randn(4, 1, 32, 32)
    for t in range(3):
        expert = student.extract(t).eval()
        assert type(expert) is type(model)
        assert not any(isinstance(m, (ExpertLayer, TaskBatchNorm)) for m in expert.modules())
        assert sum(p.numel() for p in expert.parameters()) == sum(p.numel() for p in model.parameters())
        fresh = resnet18(spatial_dims=2, n_input_channels=1, num_classes=5)
        fresh.load_state_dict(expert.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x), student(x, t), rtol=1e-5, atol=1e-5)


def test_extract_monai_unet_3d_with_transposed_convs():
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    student = randomise_experts(lorkd.add_experts(model, 2, rank={"*": 2}, norm="per_task"), std=0.05)
    assert any(isinstance(layer.base, nn.ConvTranspose3d) for _, layer in student.expert_layers())
    student.eval()
    x = torch.randn(3, 1, 16, 16, 16)
    mixed = student(x, torch.tensor([1, 0, 1]))
    for t in range(2):
        expert = student.extract(t).eval()
        assert type(expert) is UNet
        with torch.no_grad():
            torch.testing.assert_close(expert(x), student(x, t), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(mixed[0], student.extract(1).eval()(x[:1])[0], rtol=1e-5, atol=1e-5)


def test_rank_mapping_gives_decoder_a_higher_rank_and_summary_reports_it():
    model = nn.Sequential()
    model.add_module("encoder", nn.Conv2d(1, 4, 3))
    model.add_module("decoder", nn.ConvTranspose2d(4, 2, 3))
    model.add_module("attn", nn.MultiheadAttention(4, 2))
    student = lorkd.add_experts(model, 2, rank={"decoder*": 8, "encoder*": 4})
    ranks = {name: layer.rank for name, layer in student.expert_layers()}
    assert ranks == {"encoder": 4, "decoder": 8}
    text = str(student.summary())
    assert "decoder" in text and "attn.out_proj" in text and "MultiheadAttention" in text
    assert student.summary().params_per_task == sum(p.numel() for p in student.expert_parameters(1))


def test_targets_by_name_and_type():
    model = small_cnn()
    by_type = lorkd.add_experts(model, 2, targets=[nn.Linear])
    assert [n for n, _ in by_type.expert_layers()] == ["8"]
    by_name = lorkd.add_experts(model, 2, targets=["0", "3"])
    assert [n for n, _ in by_name.expert_layers()] == ["0", "3"]


@pytest.mark.parametrize("ids, match", [
    (torch.tensor([0, 3]), "task id 3 is out of range"),
    (torch.tensor([-1, 0]), "task id -1 is out of range"),
    (torch.tensor([0.0, 1.0]), "integer dtype"),
    (torch.tensor([True, False]), "integer dtype"),
    (torch.tensor([0, 1, 1]), r"shape \[2\]"),
    (torch.tensor([[0, 1]]), r"shape \[2\]"),
    (5, "task id 5 is out of range"),
    ([0, 1], "must be an int or an integer tensor"),
])
def test_bad_task_ids_raise_value_error_naming_them(ids, match):
    student = lorkd.add_experts(nn.Linear(3, 2), 3)
    with pytest.raises(ValueError, match=match):
        student(torch.randn(2, 3), ids)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_tasks": 0}, "num_tasks must be an integer >= 1"),
    ({"num_tasks": 2, "rank": 0}, "rank for 'rank' must be an integer >= 1"),
    ({"num_tasks": 2, "rank": {"*": -1}}, r"rank for '\*'"),
    ({"num_tasks": 2, "alpha": 0}, "alpha must be > 0"),
    ({"num_tasks": 2, "norm": "group"}, "norm must be one of"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lorkd.add_experts(nn.Linear(3, 2), **kwargs)


def test_model_without_eligible_layer_is_refused():
    with pytest.raises(ValueError, match="no eligible layer"):
        lorkd.add_experts(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 2)
    with pytest.raises(ValueError, match="no eligible layer"):
        lorkd.add_experts(nn.Sequential(nn.Linear(2, 2)), 2, targets=["nothing*"])


def test_extract_rejects_bad_task():
    student = lorkd.add_experts(nn.Linear(3, 2), 2)
    with pytest.raises(ValueError, match="task id 2 is out of range"):
        student.extract(2)


def test_tune_layouts_picks_a_measured_candidate_and_keeps_results_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    student = randomise_experts(lorkd.add_experts(model, 3, rank=2))
    x, ids = torch.randn(6, 2, 8, 8), torch.tensor([2, 0, 1, 0, 2, 1])
    before = student(x, ids).detach()
    timings = student.tune_layouts(x, ids, repeats=1, max_memory=None, margin=0)  # the fastest, whatever its memory
    assert set(timings) == {"0", "2", "4"}
    assert set(timings["0"]) >= {"stacked", "lowrank"} and "stacked" not in timings["4"]
    for name, layer in student.expert_layers():
        assert layer.layout == min(timings[name], key=timings[name].get)
    torch.testing.assert_close(student(x, ids), before, rtol=1e-5, atol=1e-4)  # float32, other layouts
    assert all(p.grad is None for p in student.parameters())  # tuning leaves no gradients behind


def test_per_task_batchnorm_handles_a_task_with_a_single_row():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    student = lorkd.add_experts(model, 2, norm="per_task").train()
    out = student(torch.randn(3, 3), torch.tensor([0, 1, 0]))  # task 1 has one row
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    out.sum().backward()
