"""tune_layouts leaves the model's state alone; fixes around BatchNorm, double wrapping and .weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorkd
from lorkd.experts import ExpertLayer

from test_experts_layers import randomise_experts


def bn_net():
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))


@pytest.mark.parametrize("norm", ["shared", "per_task"])
def test_tune_layouts_leaves_every_buffer_and_grad_bit_identical(norm):
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(bn_net(), 3, rank=2, norm=norm)).train()
    x, ids = torch.randn(6, 2, 8, 8), torch.tensor([2, 0, 1, 0, 2, 1])
    student(x, ids).sum().backward()  # some state: running stats moved once, grads present
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in student.named_parameters()}
    assert any(n.endswith("num_batches_tracked") for n in buffers)
    timings = student.tune_layouts(x, ids, repeats=1)
    assert timings
    for name, buffer in student.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    for name, p in student.named_parameters():
        assert (p.grad is None) == (grads[name] is None), name
        assert p.grad is None or torch.equal(p.grad, grads[name]), name


def test_tune_layouts_skips_single_task_batches():
    student = lorkd.add_experts(bn_net(), 3, rank=2, layout="lowrank")
    x = torch.randn(4, 2, 8, 8)
    assert student.tune_layouts(x, torch.tensor([1, 1, 1, 1])) == {}
    assert student.tune_layouts(x, 2) == {}
    assert all(layer.layout == "lowrank" for _, layer in student.expert_layers())


def test_inference_tuning_sets_only_the_inference_layouts():
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(bn_net(), 3, rank=2, layout="fused")).eval()
    x, ids = torch.randn(6, 2, 8, 8), torch.tensor([2, 0, 1, 0, 2, 1])
    with torch.no_grad():
        before = student(x, ids)
    timings = student.tune_layouts(x, ids, repeats=1, inference=True, margin=0)
    assert all("fused" not in t and {"merged", "lowrank"} <= set(t) for t in timings.values())
    for name, layer in student.expert_layers():
        assert layer.layout == "fused" and layer.infer_layout == min(timings[name], key=timings[name].get)
    with torch.no_grad():
        torch.testing.assert_close(student(x, ids), before, rtol=1e-5, atol=1e-5)


def test_tuned_layouts_are_saved_and_restored(tmp_path):
    student = lorkd.add_experts(bn_net(), 3, rank=2)
    chosen = {"0": "merged", "3": "lowrank", "6": "fused"}
    for name, layer in student.expert_layers():
        layer.layout = chosen[name]  # what tune_layouts stores
        layer.infer_layout = "stacked" if name == "3" else "auto"
    lorkd.save_student(student, tmp_path)
    loaded = lorkd.load_student(tmp_path, bn_net())
    assert {name: layer.layout for name, layer in loaded.expert_layers()} == chosen
    assert [layer.infer_layout for _, layer in loaded.expert_layers()] == ["auto", "stacked", "auto"]
    assert "layout='lowrank', infer_layout='stacked'" in repr(loaded.model[3])


def test_unknown_saved_layout_is_a_data_error(tmp_path):
    import json

    lorkd.save_student(lorkd.add_experts(bn_net(), 2), tmp_path)
    meta = json.loads((tmp_path / "student.json").read_text())
    meta["layouts"]["0"] = "fast"
    (tmp_path / "student.json").write_text(json.dumps(meta))
    with pytest.raises(lorkd.errors.DataError, match="layouts: '0': 'fast'"):
        lorkd.load_student(tmp_path, bn_net())


@pytest.mark.parametrize("train", [True, False])
def test_per_task_batchnorm_without_running_stats_runs_a_one_row_task(train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    x, ids = torch.randn(3, 3), torch.tensor([0, 1, 0])  # task 1 has one row
    model.train(train)(x)  # the plain model runs on this batch
    student = randomise_experts(lorkd.add_experts(model, 2, norm="per_task")).train(train)
    out = student(x, ids)
    out.sum().backward()
    bn = student.model[1].norms[1]  # the one row normalises to this BN's bias, then the last layer
    torch.testing.assert_close(out[1], student.extract(1)[2](bn.bias.detach()))
    assert student.model[2].experts[1].A.grad is not None and torch.isfinite(out).all()
    torch.testing.assert_close(out[[0, 2]], student.extract(0).train(train)(x[[0, 2]]))


def test_add_experts_on_a_model_with_experts_is_refused():
    student = lorkd.add_experts(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), 2, norm="per_task")
    with pytest.raises(ValueError, match="already has experts"):
        lorkd.add_experts(student, 2)
    with pytest.raises(ValueError, match=r"already has experts \(at 'inner'\)"):
        lorkd.add_experts(nn.ModuleDict({"inner": student.model[0]}), 2)


class ReadsWeight(nn.Module):
    """A forward that reads a layer's weight and bias directly (as weight-tying or norms of weights do)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(x) + self.fc.weight.sum() + self.fc.bias.mean()


def test_expert_layer_exposes_the_shared_weight_and_bias():
    torch.manual_seed(0)
    model = ReadsWeight()
    student = randomise_experts(lorkd.add_experts(model, 2))
    layer = student.model.fc
    assert isinstance(layer, ExpertLayer)
    assert layer.weight is layer.base.weight and layer.bias is layer.base.bias
    x, ids = torch.randn(4, 3), torch.tensor([1, 0, 0, 1])
    out = student(x, ids)
    plain = student.extract(1)
    torch.testing.assert_close(out[[0, 3]], plain(x[[0, 3]]) - plain.fc.weight.sum() + model.fc.weight.sum())
    assert "weight" not in dict(layer.named_parameters(recurse=False))  # not a second copy in state_dict


def test_tuning_keeps_backward_memory_within_the_budget():
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(nn.Sequential(nn.Linear(64, 64)), 8, rank=2))
    x, ids = torch.randn(8, 64), torch.arange(8)  # 8 tasks, one row each: merged keeps 8 weights of 64 x 64
    timings = student.tune_layouts(x, ids, repeats=1)
    assert "merged" in timings["0"]  # measured ...
    assert student.model[0].layout in ("lowrank", "fused")  # ... but never chosen: 8 weights >> 1.2 x the input


@pytest.mark.parametrize("lowrank_ms, chosen", [(9.5, "stacked"), (8.0, "lowrank")])
def test_the_auto_choice_stays_unless_another_is_clearly_faster(monkeypatch, lowrank_ms, chosen):
    from lorkd.experts import tune

    times = {"stacked": 10.0, "lowrank": lowrank_ms, "merged": 20.0, "fused": 30.0}
    monkeypatch.setattr(tune, "_time_candidates", lambda layer, attr, candidates, *a: (
        {c: times[c] for c in candidates}, {c: 0 for c in candidates}))
    student = lorkd.add_experts(nn.Sequential(nn.Conv2d(8, 64, 3)), 8, rank=2)
    x, ids = torch.randn(8, 8, 6, 6), torch.arange(8)  # 8 weights > the output: auto picks stacked
    assert student.model[0].resolve_layout(8, x) == "stacked"
    student.tune_layouts(x, ids, margin=0.1)
    assert student.model[0].layout == chosen
