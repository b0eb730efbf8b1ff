"""The training loop (lorkd.engine.trainer): optimiser groups, schedule, non-finite losses, best
checkpoints, resume checks, handlers and early stopping, and (slow) exact resume after SIGKILL."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lorkd.data.multitask import TaskBatchSampler
from lorkd.engine import (
    DistributedContext, FitConfig, OptimConfig, StepLoss, build_optimizer, build_scheduler, fit, load_checkpoint,
    per_task_mean,
)
from lorkd.engine.handlers import EVENTS, Handler
from lorkd.errors import ConfigError, TrainingError

SCRIPT = Path(__file__).parent / "scripts" / "train_toy.py"
ROOT = Path(__file__).resolve().parents[1]


def _toy():
    spec = importlib.util.spec_from_file_location("train_toy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


toy = _toy()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops on a shared 2-core machine: extra intra-op threads only wait for each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# optimiser and schedule
def test_optimizer_groups_skip_decay_on_1d_params():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2))
    net[0].bias.requires_grad_(False)
    params = list(net.named_parameters()) + [("again", net[3].weight)]
    for name in ("sgd", "adamw"):
        opt = build_optimizer(params, OptimConfig(name=name, lr=0.1, weight_decay=0.05))
        decay, no_decay = opt.param_groups
        assert decay["name"] == "decay" and decay["weight_decay"] == 0.05
        assert no_decay["name"] == "no_decay" and no_decay["weight_decay"] == 0.0
        assert decay["param_names"] == ["0.weight", "3.weight"]
        assert no_decay["param_names"] == ["1.weight", "1.bias", "3.bias"]
        assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ConfigError, match="optim.name"):
        build_optimizer(params, OptimConfig(name="lamb"))
    with pytest.raises(ConfigError, match="no trainable"):
        build_optimizer([("w", nn.Parameter(torch.ones(2), requires_grad=False))], OptimConfig())


def test_no_decay_group_is_really_not_decayed():
    bias = nn.Parameter(torch.ones(3))
    weight = nn.Parameter(torch.ones(3, 3))
    opt = build_optimizer([("b", bias), ("w", weight)], OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.5))
    bias.grad, weight.grad = torch.zeros(3), torch.zeros(3, 3)
    opt.step()
    assert torch.equal(bias, torch.ones(3))
    assert torch.allclose(weight, torch.full((3, 3), 1 - 0.1 * 0.5))


def _lrs(cfg, steps_per_epoch, epochs):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_scheduler_warmup_then_cosine():
    lrs = _lrs(OptimConfig(lr=1.0, warmup_epochs=0.5, schedule="cosine"), steps_per_epoch=8, epochs=2)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # 4 warm-up steps
    expected = [0.5 * (1 + math.cos(math.pi * (s - 4) / 12)) for s in range(4, 16)]
    assert lrs[4:] == pytest.approx(expected)
    assert lrs[4] == pytest.approx(1.0) and 0 < lrs[-1] < 0.02
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_scheduler_constant_and_no_warmup():
    assert _lrs(OptimConfig(lr=0.2, schedule="constant", warmup_epochs=0.25), 4, 2) == pytest.approx([0.2] * 8)
    lrs = _lrs(OptimConfig(lr=0.2, warmup_epochs=0), 4, 1)
    assert lrs == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    with pytest.raises(ConfigError):
        _lrs(OptimConfig(schedule="step"), 4, 1)


# ---------------------------------------------------------------------------------------------
# fit, in process
def _setup(seed=0, batch_size=8):
    torch.manual_seed(seed)
    data, model = toy.ToyData(), toy.ToyNet()
    sampler = TaskBatchSampler(data, batch_size=batch_size, seed=seed, drop_last=True)
    return data, model, sampler


def _objective(nan_at=0, task=1):
    calls = {"n": 0}

    def objective(net, batch, counts):
        calls["n"] += 1
        values = net(batch.images, batch.task_ids, batch.labels)
        if calls["n"] == nan_at:
            values = torch.where(batch.task_ids == task, values * float("nan"), values)
        per = per_task_mean(values, batch.task_ids, counts, 1)
        total = sum(per.values())
        return StepLoss(total, {t: float(v.detach()) for t, v in per.items()}, {"ce": float(total.detach())})

    return objective


def _cfg(**kw):
    base = dict(epochs=2, batch_size=8, optim=OptimConfig(lr=0.1, weight_decay=1e-2), progress=False)
    base.update(kw)
    return FitConfig(**base)


NAMES = ["task0", "task1", "task2", "task3"]


def test_fit_writes_history_and_checkpoints(tmp_path):
    data, model, sampler = _setup()
    calls = []

    def evaluate(m):
        assert not m.training and not isinstance(m, nn.parallel.DistributedDataParallel)
        calls.append(1)
        return {"acc": [0.5, 0.7][len(calls) - 1], "loss": 1.0}

    res = fit(model, _objective(), data, sampler, _cfg(select_metric="acc"), tmp_path, DistributedContext(),
              evaluate=evaluate, task_names=NAMES)
    assert model.training
    assert len(res.history) == 2 and res.best_epoch == 1 and res.best["value"] == 0.7
    lines = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert lines == res.history
    assert lines[0]["epoch"] == 0 and lines[0]["stage"] == "train" and lines[0]["val/acc"] == 0.5
    assert {"loss", "ce", "lr", "seconds", "loss/task0", "loss/task2"} <= set(lines[0])
    assert "loss/task3" not in lines[0]  # task 3 has no data
    assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("epoch,stage,step,loss")
    latest = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert latest["global_step"] == 24 and latest["epoch"] == 1 and latest["epoch_finished"]
    for k, v in model.state_dict().items():
        assert torch.equal(latest["model"][k], v)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == 1 and best["best"]["metric"] == "acc"


def test_absent_task_keeps_no_gradient_and_weights(tmp_path):
    data, model, sampler = _setup()
    before = [p.detach().clone() for p in model.task_parameters(3)]
    fit(model, _objective(), data, sampler, _cfg(epochs=1), tmp_path, DistributedContext(), task_names=NAMES)
    after = model.task_parameters(3)
    assert toy.absent_has_no_gradient(model)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_non_finite_loss_names_step_and_task_and_keeps_last_checkpoint(tmp_path):
    data, model, sampler = _setup()
    with pytest.raises(TrainingError, match=r"task1 \(task 1\).*epoch 0.*step 5 of the run") as err:
        fit(model, _objective(nan_at=5), data, sampler, _cfg(checkpoint_every=2), tmp_path, DistributedContext(),
            task_names=NAMES)
    assert "task0" not in str(err.value) and "task2" not in str(err.value)
    latest = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert latest["global_step"] == 4 and latest["sampler"]["batches_done"] == 4
    assert all(torch.isfinite(v).all() for v in latest["model"].values())
    assert not (tmp_path / "history.jsonl").exists()


def test_resume_refuses_changed_settings(tmp_path):
    data, model, sampler = _setup()
    fit(model, _objective(), data, sampler, _cfg(epochs=1), tmp_path, DistributedContext(), task_names=NAMES)
    data, model, sampler = _setup()
    with pytest.raises(ConfigError, match=r"cannot resume.*optim"):
        fit(model, _objective(), data, sampler, _cfg(epochs=1, optim=OptimConfig(lr=0.5)), tmp_path,
            DistributedContext(), task_names=NAMES, resume=True)


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    data, model, sampler = _setup()
    res = fit(model, _objective(), data, sampler, _cfg(epochs=1), tmp_path, DistributedContext(), task_names=NAMES)
    data, model2, sampler = _setup()
    res2 = fit(model2, _objective(), data, sampler, _cfg(epochs=1), tmp_path, DistributedContext(),
               task_names=NAMES, resume=True)
    assert res2.history == res.history
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_select_metric_must_be_reported(tmp_path):
    data, model, sampler = _setup()
    with pytest.raises(ConfigError, match="auc"):
        fit(model, _objective(), data, sampler, _cfg(epochs=1, select_metric="auc"), tmp_path,
            DistributedContext(), evaluate=lambda m: {"acc": 1.0}, task_names=NAMES)


def test_amp_on_cpu_warns_and_trains_in_float32(tmp_path):
    data, model, sampler = _setup()
    with pytest.warns(UserWarning, match="amp"):
        fit(model, _objective(), data, sampler, _cfg(epochs=1, amp="bf16"), tmp_path, DistributedContext(),
            task_names=NAMES)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_extra_modules_are_trained_and_saved(tmp_path):
    data, model, sampler = _setup()
    proj = nn.Linear(8, 8)
    before = proj.weight.detach().clone()

    def objective(net, batch, counts):
        feats = toy_feats(net, batch)
        values = proj(feats).pow(2).mean(1)
        per = per_task_mean(values, batch.task_ids, counts, 1)
        return StepLoss(sum(per.values()))

    def toy_feats(net, batch):
        return net.student(batch.images, batch.task_ids)

    fit(model, objective, data, sampler, _cfg(epochs=1), tmp_path, DistributedContext(), extra_modules=proj,
        task_names=NAMES)
    assert not torch.equal(proj.weight, before)
    saved = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["extra_modules"]
    assert torch.equal(saved["weight"], proj.weight.detach())


# ---------------------------------------------------------------------------------------------
# exact resume after SIGKILL (subprocesses)
def _run(*args, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_toy.py {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run("--out", out, "--epochs", 2, "--checkpoint-every", 2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("every,kill", [(2, 5), (5, 13)], ids=["mid-epoch", "after-epoch-end"])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, uninterrupted, every, kill):
    # every=2, kill=5: steps 1-5 done, latest.pt from step 4, so step 5 is redone.
    # every=5, kill=13: latest.pt from the end of epoch 0 (step 12); dies during epoch 1's first step.
    out = tmp_path / "run"
    proc = _run("--out", out, "--epochs", 2, "--checkpoint-every", every, "--kill-at-step", kill, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "final.pt").exists()
    assert load_checkpoint(out / "checkpoints" / "latest.pt")["global_step"] < kill
    _run("--out", out, "--epochs", 2, "--checkpoint-every", every, "--resume")
    a = load_checkpoint(out / "final.pt")["state"]
    b = load_checkpoint(uninterrupted / "final.pt")["state"]
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6  # on CPU it is exactly 0
    hist = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                      for x in (p / "history.jsonl").read_text().splitlines()]
    assert hist(out) == hist(uninterrupted)


# ---------------------------------------------------------------------------------------------
# handlers and early stopping
class Recorder(Handler):
    """Records every event; keeps a checkpointed count of steps."""

    state_key = "recorder"

    def __init__(self):
        self.events, self.steps, self.loaded = [], 0, None

    def __getattribute__(self, name):
        if name in EVENTS or name == "close":
            events = object.__getattribute__(self, "events")
            return lambda loop: events.append((name, loop.state.epoch, loop.state.global_step,
                                               dict(loop.state.row) if name == "epoch_completed" else None))
        return object.__getattribute__(self, name)

    def state_dict(self):
        return {"steps": sum(1 for e in self.events if e[0] == "iteration_completed")}

    def load_state_dict(self, state):
        self.loaded = state


def test_user_handler_receives_events_in_order_and_its_state_is_checkpointed(tmp_path):
    data, model, sampler = _setup()
    rec = Recorder()
    res = fit(model, _objective(), data, sampler, _cfg(select_metric="acc"), tmp_path, DistributedContext(),
              evaluate=lambda m: {"acc": 0.5}, task_names=NAMES, handlers=[rec])
    names = [e[0] for e in rec.events]
    epoch = ["epoch_started"] + ["iteration_started", "iteration_completed"] * 12 + ["epoch_completed"]
    assert names == ["started", *epoch, *epoch, "completed", "close"]
    steps = [e[2] for e in rec.events if e[0] == "iteration_completed"]
    assert steps == list(range(1, 25))
    ends = [e for e in rec.events if e[0] == "epoch_completed"]
    assert [(e[1], e[2]) for e in ends] == [(0, 12), (1, 24)]
    assert ends[0][3]["val/acc"] == 0.5 and ends[0][3] == res.history[0]  # after validation, as logged
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["handlers"] == {"recorder": {"steps": 24}}
    data, model, sampler = _setup()
    again = Recorder()
    fit(model, _objective(), data, sampler, _cfg(select_metric="acc"), tmp_path, DistributedContext(),
        evaluate=lambda m: {"acc": 0.5}, task_names=NAMES, handlers=[again], resume=True)
    assert again.loaded == {"steps": 24} and [e[0] for e in again.events] == ["started", "completed", "close"]


class EpochOf(Handler):
    """Which epoch is running (so that evaluate() can depend on it across a resume)."""

    epoch = -1

    def epoch_started(self, loop):
        self.epoch = loop.state.epoch


class StopAt(Handler):
    def __init__(self, step):
        self.step = step

    def iteration_started(self, loop):
        if loop.state.global_step == self.step:
            raise KeyboardInterrupt


ACC = [0.5, 0.7, 0.6, 0.6, 0.8, 0.9]  # best at epoch 1, then two epochs without improvement


def _early(tmp_path, patience=2, resume=False, stop_at=None, epochs=6, acc=ACC, min_delta=0.0):
    data, model, sampler = _setup()
    now = EpochOf()
    extra = [now] + ([StopAt(stop_at)] if stop_at else [])
    res = fit(model, _objective(), data, sampler, _cfg(epochs=epochs, select_metric="acc", early_stop=patience,
                                                       early_stop_min_delta=min_delta, checkpoint_every=5),
              tmp_path, DistributedContext(), evaluate=lambda m: {"acc": acc[now.epoch]}, task_names=NAMES,
              handlers=extra, resume=resume)
    return res, model


def test_early_stop_min_delta_counts_only_improvements_larger_than_it(tmp_path):
    creeping = [0.5, 0.52, 0.53, 0.54, 0.9, 0.9]  # new bests every epoch, each by less than 0.05
    res, _ = _early(tmp_path / "delta", acc=creeping, min_delta=0.05)
    assert res.stopped_early and len(res.history) == 3  # epochs 1 and 2 do not count: stop after epoch 2
    assert [r["early_stop_wait"] for r in res.history] == [0, 1, 2] and res.history[-1]["early_stop"] is True
    assert res.best_epoch == 2  # the best epoch is still the best value seen
    rows = [json.loads(line) for line in (tmp_path / "delta" / "history.jsonl").read_text().splitlines()]
    assert [r["early_stop_wait"] for r in rows] == [0, 1, 2] and rows[-1]["early_stop"] is True
    plain, _ = _early(tmp_path / "plain", acc=creeping)  # min_delta 0: every new best counts
    assert not plain.stopped_early and len(plain.history) == 6
    with pytest.raises(ConfigError, match="min_delta must be >= 0"):
        _early(tmp_path / "bad", min_delta=-0.1)


def test_early_stopping_stops_when_the_metric_stalls(tmp_path):
    res, model = _early(tmp_path)
    assert res.stopped_early and [r["epoch"] for r in res.history] == [0, 1, 2, 3]
    assert res.best_epoch == 1 and res.best["value"] == 0.7
    latest = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert latest["epoch"] == 3 and latest["epoch_finished"] and latest["handlers"]["early_stop"] == {"wait": 2}
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["epoch"] == 1
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 4
    # a larger patience trains on to the next improvement and beyond
    res3, _ = _early(tmp_path / "p3", patience=3)
    assert not res3.stopped_early and len(res3.history) == 6


def test_the_early_stop_line_prints_after_the_stopping_epochs_metrics(tmp_path, capsys):
    """Issue 31: the stop line follows that epoch's own line of metrics on stderr, and prints once."""
    res, _ = _early(tmp_path)
    err = capsys.readouterr().err.splitlines()
    stop = [i for i, line in enumerate(err) if "early stop after epoch 3" in line]
    epoch3 = [i for i, line in enumerate(err) if "epoch=3" in line and "early stop after" not in line]
    assert res.stopped_early and len(stop) == 1 and epoch3 and epoch3[-1] < stop[0]


@pytest.mark.parametrize("stop_at", [27, 41], ids=["before-the-stalling-epochs", "in-the-stopping-epoch"])
def test_resume_across_an_early_stop_is_exact(tmp_path, stop_at):
    ref, ref_model = _early(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        _early(tmp_path / "run", stop_at=stop_at)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["global_step"] < stop_at
    res, model = _early(tmp_path / "run", resume=True)
    assert res.stopped_early
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(res.history) == strip(ref.history) and res.best == ref.best
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    # resuming the stopped run trains no further
    again, model2 = _early(tmp_path / "run", resume=True)
    assert again.stopped_early and strip(again.history) == strip(ref.history)
    for (k, a), b in zip(ref_model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_without_early_stop_every_epoch_runs(tmp_path):
    data, model, sampler = _setup()
    res = fit(model, _objective(), data, sampler, _cfg(epochs=3, select_metric="acc"), tmp_path, DistributedContext(),
              evaluate=lambda m: {"acc": 0.5}, task_names=NAMES)  # never improves after epoch 0
    assert not res.stopped_early and len(res.history) == 3
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["handlers"] == {}
    with pytest.raises(ConfigError, match="early_stop needs select_metric"):
        _cfg(early_stop=2).validate()
    with pytest.raises(ConfigError, match="early_stop must be"):
        _cfg(early_stop=0, select_metric="acc").validate()
    with pytest.raises(ConfigError, match="early_stop needs an evaluate"):
        fit(model, _objective(), data, sampler, _cfg(select_metric="acc", early_stop=1), tmp_path / "x",
            DistributedContext(), task_names=NAMES)


def test_the_engine_imports_no_medmnist_code():
    code = "import sys, lorkd.engine; print(sorted(m for m in sys.modules if 'medmnist' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "[]"
