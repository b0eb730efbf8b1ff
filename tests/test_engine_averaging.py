"""The moving average of the weights (FitConfig.ema, lorkd.engine.averaging) and the label
smoothing of a stage (Stage.label_smoothing)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorkd.config import from_dict
from lorkd.engine import DistributedContext, fit, load_checkpoint
from lorkd.engine.averaging import WeightAverage
from lorkd.engine.handlers import Handler
from lorkd.errors import ConfigError
from lorkd.pipelines.core.recipe import DecompositionRecipe as Recipe
from lorkd.pipelines.schema import Stage
from test_engine_trainer import NAMES, _cfg, _objective, _setup


def test_average_follows_the_formula_with_warm_up():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(net, decay=0.9)
    expected = [t.detach().clone() for t in [*net.parameters(), *net.buffers()]]
    for n in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
            net[1].num_batches_tracked.add_(1)
        avg.update()
        d = min(0.9, (1 + n) / (10 + n))
        for i, w in enumerate([*net.parameters(), *net.buffers()]):
            expected[i] = d * expected[i] + (1 - d) * w if w.is_floating_point() else w.clone()
    for got, want in zip([*avg.module.parameters(), *avg.module.buffers()], expected):
        assert torch.allclose(got, want, atol=1e-6)
    assert int(avg.module[1].num_batches_tracked) == 4
    assert not any(p.requires_grad for p in avg.module.parameters())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ConfigError, match="ema"):
        WeightAverage(nn.Linear(2, 2), decay)
    with pytest.raises(ConfigError, match="ema"):
        _cfg(ema=decay).validate()


def test_the_average_is_validated_and_kept_as_best_and_training_goes_on(tmp_path):
    data, model, sampler = _setup()
    seen = []

    def evaluate(m):
        seen.append(copy.deepcopy(m.state_dict()))
        return {"acc": float(len(seen))}

    fit(model, _objective(), data, sampler, _cfg(select_metric="acc", ema=0.9), tmp_path, DistributedContext(),
        evaluate=evaluate, task_names=NAMES)
    latest = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    averaged = latest["handlers"]["ema"]["module"]
    assert latest["handlers"]["ema"]["updates"] == latest["global_step"]
    for k, v in model.state_dict().items():  # latest.pt: the training weights; best.pt: the average
        assert torch.equal(latest["model"][k], v)
        assert torch.equal(best["model"][k], averaged[k]) and torch.equal(seen[-1][k], averaged[k])
    assert any(not torch.equal(averaged[k], v) for k, v in model.state_dict().items() if v.is_floating_point())


class FailAtEpoch(Handler):
    def __init__(self, epoch):
        self.epoch = epoch

    def epoch_started(self, loop):
        if loop.state.epoch == self.epoch:
            raise RuntimeError("killed")


def test_a_resumed_run_with_an_average_matches_an_uninterrupted_one(tmp_path):
    def run(folder, handlers=(), resume=False):
        data, model, sampler = _setup()
        fit(model, _objective(), data, sampler, _cfg(epochs=3, select_metric="acc", ema=0.8), folder,
            DistributedContext(), evaluate=lambda m: {"acc": float(sum(p.sum() for p in m.parameters()))},
            task_names=NAMES, handlers=list(handlers), resume=resume)
        return model

    straight = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "b", [FailAtEpoch(2)])
    resumed = run(tmp_path / "b", resume=True)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    best_a, best_b = (load_checkpoint(tmp_path / f / "checkpoints" / "best.pt") for f in "ab")
    assert best_a["epoch"] == best_b["epoch"]
    for k, v in best_a["model"].items():
        assert torch.equal(v, best_b["model"][k]), k


def test_label_smoothing_is_cross_entropy_with_it_and_refused_elsewhere():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    classification = SimpleNamespace(task_loss=F.cross_entropy, kind="classification")
    assert Recipe.stage_task_loss(classification, Stage()) is F.cross_entropy
    loss = Recipe.stage_task_loss(classification, Stage(label_smoothing=0.2))
    assert torch.equal(loss(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.2))
    segmentation = SimpleNamespace(task_loss=lambda a, b: a.sum(), kind="segmentation")
    with pytest.raises(ConfigError, match="label_smoothing"):
        Recipe.stage_task_loss(segmentation, Stage(label_smoothing=0.1))


@pytest.mark.parametrize("key, value", [("label_smoothing", 1.0), ("label_smoothing", -0.1), ("ema", 1.5)])
def test_stage_settings_are_checked_at_load_time(key, value):
    with pytest.raises(ConfigError, match=rf"train\.{key}"):
        from_dict(Stage, {key: value}, "train")
