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


def task_rows(student, task):
    """``{name: gradient rows of task ``task``}`` of every task parameter (``None`` if no gradient)."""
    return {n: (None if p.grad is None else p.grad[task]) for n, p in student.named_task_parameters()}


@pytest.mark.parametrize("layout", ["auto", "lowrank", "merged"])
def test_loss_of_one_task_gives_other_experts_exactly_zero_gradient(layout):
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(small_cnn(), 4, rank=2, norm="per_task", layout=layout)).train()
    x, ids = torch.randn(8, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])  # task 3 absent
    loss_on_task(student, x, ids, task=1).backward()
    assert any(g.abs().sum() > 0 for g in task_rows(student, 1).values())
    for task in (0, 2, 3):  # present but not in the loss, or absent: exactly zero on its rows
        for name, g in task_rows(student, task).items():
            assert torch.count_nonzero(g) == 0, (task, name)


def test_shared_batchnorm_leaks_across_tasks_as_documented():
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(small_cnn(), 3, rank=2, norm="shared")).train()
    x, ids = torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_on_task(student, x, ids, task=1).backward()
    leaked = sum(g.abs().sum() for g in task_rows(student, 0).values())
    assert leaked > 0  # batch statistics mix tasks: why norm="per_task" exists


@pytest.mark.parametrize("make_opt", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
], ids=["sgd_momentum_wd", "adamw"])
def test_absent_experts_are_bit_identical_through_optimiser_steps(make_opt):
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(small_cnn(), 3, rank=2, norm="per_task")).train()
    before = {n: p.detach().clone() for t in (0, 2) for n, p in student.named_expert_parameters(t)}
    opt = make_opt(student.parameters())
    lorkd.keep_absent_experts(opt, student)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        x, ids = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 1, 0])
        student(x, ids).pow(2).mean().backward()
        opt.step()
    for name, p in student.named_expert_parameters(2):
        assert torch.equal(p, before[name]), name
    for p in student.task_parameters():  # no momentum / moments on the absent task's rows either
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert torch.count_nonzero(value[2]) == 0, key
    assert all(not torch.equal(p, before[n]) for n, p in student.named_expert_parameters(0))  # task 0 did learn
    # without the hooks, weight decay and momentum would move the absent rows
    plain = make_opt(student.parameters())
    student(torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 1, 0])).pow(2).mean().backward()
    plain.step()
    assert any(not torch.equal(p, before[n]) for n, p in student.named_expert_parameters(2))


def test_keep_absent_experts_needs_an_expert_model():
    with pytest.raises(ValueError, match="holds no ExpertModel"):
        lorkd.keep_absent_experts(torch.optim.SGD(small_cnn().parameters(), lr=0.1), small_cnn())


def test_task_and_shared_parameters_partition_all_parameters():
    student = lorkd.add_experts(small_cnn(), 3, rank=2, norm="per_task")
    ids = [id(p) for p in student.shared_parameters()] + [id(p) for p in student.task_parameters()]
    assert sorted(ids) == sorted(id(p) for p in student.parameters())
    assert len(ids) == len(set(ids))
    for t in range(3):  # each task's views are row t of the task parameters
        views = dict(student.named_expert_parameters(t))
        assert len(views) == len(list(student.task_parameters()))
        for name, view in views.items():
            assert f".experts.{t}." in name or f".norms.{t}." in name
            assert any(view.data_ptr() == p[t].data_ptr() for p in student.task_parameters())


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
    ({"num_tasks": 2, "layout": "fused"}, r"layout must be one of \('auto', 'lowrank', 'merged'\), got 'fused'"),
    ({"num_tasks": 2, "layout": "stacked"}, "layout must be one of"),  # earlier names, refused as `lorkd bench` does
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


def test_per_task_batchnorm_handles_a_task_with_a_single_row():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    student = lorkd.add_experts(model, 2, norm="per_task").train()
    out = student(torch.randn(3, 3), torch.tensor([0, 1, 0]))  # task 1 has one row
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    out.sum().backward()


def test_merged_weights_cache_follows_every_weight_change():
    """Without gradients the per-task merged weights are cached; an optimiser step, load_state_dict
    and an in-place write into one task's factors must all be seen by the next forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    student = randomise_experts(lorkd.add_experts(model, 3, rank=2, layout="merged"), std=0.1).eval()
    x, ids = torch.randn(5, 2, 6, 6), torch.tensor([2, 0, 1, 0, 2])

    def fresh():  # the same maths with gradients enabled: never cached
        with torch.enable_grad():
            return student(x, ids).detach()

    def cached():
        with torch.no_grad():
            return student(x, ids)

    torch.testing.assert_close(cached(), fresh())
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    student(x, ids).square().sum().backward()
    opt.step()
    torch.testing.assert_close(cached(), fresh())
    state = {k: v + 0.1 for k, v in student.state_dict().items()}
    student.load_state_dict(state)
    torch.testing.assert_close(cached(), fresh())
    with torch.no_grad():
        student.model[0].B[1].mul_(3.0)  # row 1 of the stacked parameter
    torch.testing.assert_close(cached(), fresh())
    with torch.no_grad():
        torch.testing.assert_close(student(x, 1), student.extract(1)(x))
