"""A routed student in the classification recipe (``student.router``, MoLA-Router): config keys,
the training schedule, routed scoring, the report section, the ``routed/`` export and predict."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lorkd import cli
from lorkd.config import from_dict
from lorkd.errors import ConfigError
from lorkd.models.backbones import backbone_spec
from lorkd.models.classifier import MultiTaskClassifier
from lorkd.models.router import RoutedExperts, TaskRouter, load_routed
from lorkd.pipelines.core.routing import RouterTraining
from lorkd.pipelines.recipes.routing_scores import routed_val_metrics, routing_summary
from lorkd.pipelines.schema import ClassificationConfig, Router, SegmentationConfig
from lorkd.report import write_report
from lorkd.report.routing import routing_section

TINY = {
    "data": {"synthetic": {"num_tasks": 2, "size": 16, "n_train": 48, "n_val": 24, "n_test": 24}},
    "teacher": {"net": {"arch": "resnet10", "widen": 0.25}, "train": {"epochs": 1, "batch_size": 16}},
    "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": {"epochs": 2, "batch_size": 16},
                "router": {"net": {"channels": [4, 8], "projection_dim": 8}, "teacher_forcing": 0.5}},
    "baselines": {"run": ["mola_grad"]},
}


def config(**changes):
    data = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return data


# ---------------------------------------------------------------------------------------- config
def test_router_keys_are_typed_with_defaults():
    cfg = from_dict(ClassificationConfig, config())
    r = cfg.student.router
    assert isinstance(r, Router) and r.net.channels == [4, 8] and r.twd_weight == 0.1 and r.top_k is None
    assert from_dict(ClassificationConfig, {**config(), "student": {}, "baselines": {}}).student.router is None


@pytest.mark.parametrize("key, value, message", [
    ("twd_weight", -1, "student.router.twd_weight"),
    ("temperature", 0, "student.router.temperature"),
    ("twd_temperature", 0, "student.router.twd_temperature"),
    ("top_k", 0, "student.router.top_k"),
    ("teacher_forcing", -0.5, "student.router.teacher_forcing"),
    ("net", {"channels": []}, "student.router.net.channels"),
    ("net", {"projection_dim": 0}, "student.router.net.projection_dim"),
    ("tpo_k", 1, "student.router.tpo_k"),
])
def test_bad_router_keys_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        from_dict(ClassificationConfig, config(**{f"student__router__{key}": value}))


def test_top_1_without_the_task_cross_entropy_is_refused():
    with pytest.raises(ConfigError, match=r"student\.router\.task_loss_weight"):
        from_dict(ClassificationConfig, config(student__router__top_k=1, student__router__task_loss_weight=0))


def test_mola_grad_needs_a_router_and_segmentation_refuses_classification_settings():
    plain = config()
    del plain["student"]["router"]
    with pytest.raises(ConfigError, match=r"baselines\.run.*mola_grad"):
        from_dict(ClassificationConfig, plain)
    with pytest.raises(ConfigError, match=r"student\.router\.input_size"):
        from_dict(ClassificationConfig, config(student__router__input_size=[8, 8]))
    seg = {"data": {"tasks": [{"name": "heart", "path": "x"}]}, "student": {"router": {"input_size": [8, 16, 16]}}}
    assert from_dict(SegmentationConfig, seg).student.router.input_size == [8, 16, 16]
    for key, value in (("teacher_forcing", 2), ("top_k", 1), ("temperature", 2.0)):
        bad = copy.deepcopy(seg)
        bad["student"]["router"][key] = value
        with pytest.raises(ConfigError, match=rf"student\.router\.{key}: segmentation"):
            from_dict(SegmentationConfig, bad)
    with pytest.raises(ConfigError, match=r"baselines\.run: mola_grad"):
        from_dict(SegmentationConfig, {**seg, "baselines": {"run": ["mola_grad"]}})
    with pytest.raises(ConfigError, match=r"student\.router\.input_size"):
        from_dict(SegmentationConfig, {**seg, "student": {"router": {"input_size": [0, 8]}}})


# ---------------------------------------------------------------------------------------- training schedule
def test_router_training_forces_the_task_id_then_routes_by_the_router():
    logits, ids = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([1, 0])
    soft = RouterTraining(TaskRouter(1, 2, channels=[2]), Router(temperature=2.0), forced_steps=2)
    assert [soft.routing(logits, ids) is ids for _ in range(3)] == [True, True, False]
    torch.testing.assert_close(soft.routing(logits, ids), torch.softmax(logits / 2.0, dim=1))
    assert int(soft.step) == 4 and "step" in dict(soft.named_buffers())  # kept in checkpoints
    hard = RouterTraining(TaskRouter(1, 2, channels=[2]), Router(top_k=1), forced_steps=0)
    assert hard.routing(logits, ids).tolist() == [0, 1]


# ---------------------------------------------------------------------------------------- scoring and report
def fake_routed():
    """Two tasks of 4 items: task 0 all routed right, 3 correct; task 1 one item routed to task 0."""
    return {0: {"routed": np.array([0, 0, 0, 0]), "pred": np.array([0, 1, 1, 0]), "correct": np.array([1, 1, 1, 0], bool)},
            1: {"routed": np.array([1, 0, 1, 1]), "pred": np.array([2, 0, 1, 2]), "correct": np.array([1, 0, 1, 1], bool)}}


def fake_outputs():
    onehot = lambda pred, c: np.eye(c, dtype=np.float32)[pred]  # noqa: E731
    return {"a": {"student": {"probs": onehot([0, 1, 1, 1], 2), "labels": np.array([0, 1, 1, 1])},
                  "mola_grad": {"probs": onehot([0, 1, 0, 1], 2), "labels": np.array([0, 1, 1, 1])}},
            "b": {"student": {"probs": onehot([2, 0, 1, 2], 3), "labels": np.array([2, 0, 1, 2])},
                  "mola_grad": {"probs": onehot([2, 0, 1, 2], 3), "labels": np.array([2, 0, 1, 2])}}}


def test_routing_summary_counts_routes_and_task_agnostic_answers():
    summary = routing_summary(fake_routed(), ["a", "b"], fake_outputs())
    assert summary["confusion"] == [[4, 0], [1, 3]]
    assert summary["route_acc"]["value"] == pytest.approx(7 / 8)
    a, b = summary["per_task"]["a"], summary["per_task"]["b"]
    assert a["task_agnostic_acc"]["value"] == 0.75 and a["true_id_acc"]["value"] == 1.0
    assert a["task_agnostic_minus_true_id"]["value"] == pytest.approx(-0.25)
    assert b["route_acc"]["value"] == 0.75 and b["task_agnostic_acc"]["value"] == 0.75
    assert a["mola_grad_acc"]["value"] == 0.75 and a["route_acc"]["low"] == a["route_acc"]["high"] == 1.0
    assert summary["mean"]["task_agnostic_acc"] == 0.75 and summary["mean"]["true_id_acc"] == 1.0
    val = routed_val_metrics(fake_routed(), ["a", "b"])
    assert val == {"acc": 0.75, "route_acc": pytest.approx(7 / 8), "acc_a": 0.75, "acc_b": 0.75}


def test_report_has_the_routing_section(tmp_path):
    summary = routing_summary(fake_routed(), ["a", "b"], fake_outputs())
    text = "\n".join(routing_section({"routing": summary}))
    assert "## Routing without a task id" in text and "Task-routing accuracy: 0.875" in text
    assert "| a | 4 | 1.000 [1.000, 1.000] | 0.750" in text and "mola_grad acc" in text
    assert "| b | 1 | 3 |" in text  # confusion row of task b
    assert routing_section({}) == []
    metrics = {"tasks": {"a": {"student": {"acc": 1.0}}, "b": {"student": {"acc": 1.0}}}, "routing": summary}
    assert "## Routing without a task id" in write_report(tmp_path, metrics, None).read_text()


# ---------------------------------------------------------------------------------------- routed model
def test_routed_experts_reproduce_the_routed_student():
    torch.manual_seed(0)
    spec = backbone_spec("resnet10", 2, 1, 0.125, 1, {})
    student = MultiTaskClassifier(spec, [2, 3], {"rank": 2, "alpha": 4, "norm": "per_task", "targets": None})
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.eval()
    router = TaskRouter(1, 2, channels=[4, 8]).eval()
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        tasks = router(x).logits.argmax(1)
        out = student(x, tasks)
        plain = RoutedExperts(router.plain()[0].eval(), [student.export_task(t)[0].eval() for t in range(2)], ["a", "b"])
        got_tasks, got = plain(x)
    assert got_tasks.tolist() == tasks.tolist()
    for t, rows in out.rows.items():
        for row, want in zip(rows.tolist(), out.logits[t]):
            torch.testing.assert_close(got[row], want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- end to end
def run_cli(*argv):
    return cli.main([str(a) for a in argv])


@pytest.mark.slow
def test_routed_run_exports_routed_and_predicts_task_and_class(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(export={"onnx": True})))
    out = tmp_path / "run"
    assert run_cli("run", cfg, "--out", out, "--no-progress") == 0
    assert (out / "student" / "router" / "model.safetensors").is_file()
    assert (out / "baselines" / "mola_grad" / "model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    routing = metrics["routing"]
    assert set(routing["per_task"]) == set(metrics["tasks"]) and np.sum(routing["confusion"]) == 48
    for name, row in routing["per_task"].items():  # the true-id column is the student's own test accuracy
        assert row["true_id_acc"]["value"] == pytest.approx(metrics["tasks"][name]["student"]["acc"])
        assert row["mola_grad_acc"]["value"] == pytest.approx(metrics["tasks"][name]["mola_grad"]["acc"])
    history = [json.loads(line) for line in (out / "student" / "history.jsonl").read_text().splitlines()]
    assert history[0]["router"] > 0 and "val/route_acc" in history[0]  # the router's loss and routing, logged
    report = (out / "report.md").read_text()
    assert "## Routing without a task id" in report and "Task confusion matrix" in report

    # routed/: router + every expert, ONNX checked, reproducing the routed student
    card = json.loads((out / "routed" / "routed.json").read_text())
    assert card["tasks"] == list(metrics["tasks"]) and (out / "routed" / "router" / "expert.onnx").is_file()
    assert all((out / "routed" / p / "expert.onnx").is_file() for p in card["experts"].values())
    routed = load_routed(out / "routed")
    from lorkd.engine.distributed import DistributedContext
    from lorkd.pipelines.recipes.classification import ClassificationRecipe
    from lorkd.pipelines.stages.routed import load_router

    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    recipe = ClassificationRecipe(from_dict(ClassificationConfig, yaml.safe_load(cfg.read_text())), out, ctx)
    student, router = recipe.reuse_network(out / "student").eval(), load_router(recipe)
    x = torch.stack([recipe.test_set[i][0] for i in range(0, 48, 5)])
    with torch.no_grad():
        tasks = router(x).logits.argmax(1)
        want = student(x, tasks)
        got_tasks, got = routed(x)
    assert got_tasks.tolist() == tasks.tolist()
    for t, rows in want.rows.items():
        for row, value in zip(rows.tolist(), want.logits[t]):
            torch.testing.assert_close(got[row], value, atol=1e-5, rtol=0)

    # predict on files: task, class and probabilities, no task id
    capsys.readouterr()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", rng.random((16, 16)).astype(np.float32))
    assert run_cli("predict", out / "routed", tmp_path / "a.png", tmp_path / "b.npy") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 2 and {"input", "task", "task_probability", "prediction", "p0", "p1"} <= set(rows[0])
    for row in rows:
        assert row["task"] in card["tasks"]
        probs = [float(row[f"p{c}"]) for c in range(card["classes"][row["task"]])]
        assert abs(sum(probs) - 1) < 1e-5 and int(row["prediction"]) == int(np.argmax(probs))
