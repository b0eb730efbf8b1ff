"""Feature distillation between named layers: names, taps in input order, projectors, the
objective's gradients (student and projector only, per task), and bad names before training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from lorkd import cli
from lorkd.config import from_dict
from lorkd.errors import ConfigError
from lorkd.models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec
from lorkd.models.taps import LayerTaps
from lorkd.pipelines.core.objective import DistillObjective, TaskRemap
from lorkd.pipelines.core.features import FeatureDistiller, check_layer_names, feature_terms, student_layer_names
from lorkd.pipelines.schema import Distill, FeaturePair

from test_cli import TINY

EXPERTS = {"rank": 2, "alpha": 4.0, "norm": "per_task", "targets": None}


def nets(dims: int):
    torch.manual_seed(0)
    student = MultiTaskSegmenter(segmentation_backbone_spec("unet", dims, 1, [4, 8], 4), [2, 3], EXPERTS)
    teacher = MultiTaskSegmenter(segmentation_backbone_spec("unet", dims, 1, [6, 12], 6), [2, 3])
    return student, teacher


def distill(*pairs, **weights) -> Distill:
    return from_dict(Distill, {"ce_weight": 0.0, "kd_weight": 0.0, **weights, "features": [dict(p) for p in pairs]},
                     "student.distill")


def test_student_names_are_those_of_the_exported_expert():
    student, _ = nets(2)
    names = student_layer_names(student)
    assert names["backbone"] == "backbone"
    assert names["backbone.model.0.conv"] == "backbone.model.model.0.conv"  # one level deeper with experts
    assert not any(".experts." in n or n.endswith(".base") or ".norms." in n for n in names)
    exported = {f"backbone.{n}" for n, _ in student.export_task(0)[0].backbone.named_modules() if n}
    assert set(names) - {"backbone"} == exported
    plain = MultiTaskSegmenter(student.backbone_spec, [2, 3])
    assert student_layer_names(plain).keys() == names.keys()
    assert student_layer_names(plain)["backbone.model.0.conv"] == "backbone.model.0.conv"


def test_inner_layer_outputs_come_back_in_input_order():
    student, teacher = nets(2)
    student.eval()
    terms = feature_terms(distill({"student": "backbone.model.0", "teacher": "backbone.model.0", "kind": "cka"}))
    features = FeatureDistiller(terms, student, teacher, torch.zeros(1, 1, 16, 16))
    x, ids = torch.randn(4, 1, 16, 16), torch.tensor([1, 0, 1, 0])  # the experts run it sorted by task
    out = student(x, ids)
    s, t = features.collect(out, teacher(x, ids))["feat_0"]
    with LayerTaps(student, ["backbone.model.model.0"]) as taps:
        for i in range(4):
            student(x[i:i + 1], ids[i:i + 1])
            torch.testing.assert_close(s[i:i + 1], taps["backbone.model.model.0"])
    assert s.shape == (4, 4, 8, 8) and t.shape == (4, 6, 8, 8) and not t.requires_grad
    features.close()


@pytest.mark.parametrize("kind", ["mse", "cosine", "cka"])
@pytest.mark.parametrize("dims", [2, 3])
def test_objective_gradients_reach_the_student_and_projector_only(kind, dims):
    student, teacher = nets(dims)
    shape = (16, 16) if dims == 2 else (8, 16, 16)
    # the student map is 1/2 the teacher's size: resized to it
    d = distill({"student": "backbone.model.0", "teacher": "backbone", "kind": kind, "weight": 2.0})
    features = FeatureDistiller(feature_terms(d), student, teacher, torch.zeros(1, 1, *shape))
    assert (kind == "cka") == (len(features.projectors) == 0)
    objective = DistillObjective(d, teacher, features)
    x = torch.randn(4, 1, *shape)
    batch = SimpleNamespace(images=x, task_ids=torch.tensor([0, 0, 0, 0]), labels=torch.zeros(4, *shape, dtype=torch.long))
    loss = objective(student, batch, torch.tensor([4, 0]))
    assert set(loss.parts) == {"feat_0"} and loss.total.item() == pytest.approx(2.0 * loss.parts["feat_0"], rel=1e-5)
    loss.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    task0 = dict(student.backbone.named_expert_gradients(0))
    feeding = [g for n, g in task0.items() if n.startswith("model.model.0.")]  # the layers before the tap
    assert feeding and all(g is not None for g in feeding)  # (A's is 0 while B is at its init 0)
    assert any(g.abs().sum() > 0 for g in feeding)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in student.backbone.expert_gradients(1))  # task 1 absent
    assert all(p.grad is None for p in student.heads.parameters())  # no term reads the heads
    assert all(p.grad is not None for p in features.parameters())
    features.close()


@pytest.mark.parametrize("kind", ["mse", "cka"])
def test_a_task_term_reaches_only_its_own_expert_in_a_mixed_batch(kind):
    """Mixed batch [0, 1, 0, 1]: expert 0's gradient is half the one of task 0's rows alone (the
    total is the mean over the 2 tasks present), so task 1's term does not reach expert 0."""
    student, teacher = nets(2)
    d = distill({"student": "backbone.model.1", "teacher": "backbone.model.1", "kind": kind})
    features = FeatureDistiller(feature_terms(d), student, teacher, torch.zeros(1, 1, 16, 16))
    objective = DistillObjective(d, teacher, features)
    torch.manual_seed(1)
    x, ids = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():  # move B off 0 so that every expert factor gets a gradient
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def expert0_grads(rows, counts):
        student.zero_grad(set_to_none=True)
        batch = SimpleNamespace(images=x[rows], task_ids=ids[rows], labels=torch.zeros(len(rows), 16, 16, dtype=torch.long))
        objective(student, batch, torch.tensor(counts)).total.backward()
        return [None if g is None else g.clone() for g in student.backbone.expert_gradients(0)]

    mixed = expert0_grads([0, 1, 2, 3], [2, 2])
    alone = expert0_grads([0, 2], [2, 0])
    assert [g is None for g in mixed] == [g is None for g in alone]  # layers after the tap: unused
    assert any(g is not None and g.abs().sum() > 0 for g in alone)
    for a, b in zip(mixed, alone):
        if a is not None:
            torch.testing.assert_close(a, 0.5 * b, rtol=1e-4, atol=1e-6)
    features.close()


def test_final_features_are_one_implicit_pair():
    student, teacher = nets(2)
    d = distill(feat_weight=0.5, feat_kind="cosine")
    terms = feature_terms(d)
    assert [(t.name, t.student, t.teacher, t.weight, t.kind) for t in terms] == [("feat", None, None, 0.5, "cosine")]
    features = FeatureDistiller(terms, student, teacher, torch.zeros(1, 1, 16, 16))
    assert features.projectors["feat"].in_channels == 4 and features.projectors["feat"].out_channels == 6


def test_pooled_against_map_is_a_config_error_naming_the_pair():
    from lorkd.models.backbones import backbone_spec
    from lorkd.models.classifier import MultiTaskClassifier

    _, teacher = nets(2)
    student = MultiTaskClassifier(backbone_spec("resnet10", 2, 1, 0.125, 1, {}), [2, 3], EXPERTS)  # pooled [B, F]
    d = distill({"student": "backbone", "teacher": "backbone.model.0"})
    with pytest.raises(ConfigError, match=r"student.distill.features\[0\]: the student output \[1, 64\] and the "
                                          r"teacher output \[1, 6, 8, 8\] need the same number of dims"):
        FeatureDistiller(feature_terms(d), student, teacher, torch.zeros(1, 1, 16, 16))


def test_bad_names_raise_config_errors_naming_the_key_with_close_names():
    student, teacher = nets(2)
    pairs = [FeaturePair("backbone.model.0", "backbone.model.0"), FeaturePair("backbone.model.O", "backbone")]
    with pytest.raises(ConfigError, match=r"features\[1\]\.student: no layer named 'backbone.model.O'.*"
                                          r"did you mean .*'backbone.model.0'"):
        check_layer_names(pairs, student=student)
    pairs = [FeaturePair("backbone", "backbone.modle.1")]
    with pytest.raises(ConfigError, match=r"features\[0\]\.teacher: no layer named 'backbone.modle.1'.*'backbone.model.1'"):
        check_layer_names(pairs, teacher=teacher)
    # teacher names are resolved in feature_root when the teacher has one (a wrapped foundation model)
    wrapped = torch.nn.Module()
    wrapped.feature_root = teacher.backbone
    check_layer_names([FeaturePair("backbone", "model.1")], teacher=wrapped)
    check_layer_names([FeaturePair("backbone", "backbone.model.1")], teacher=TaskRemap(teacher, [1]))
    with pytest.raises(ConfigError, match="features"):
        from_dict(Distill, {"features": [{"student": " ", "teacher": "x"}]}, "student.distill")


def write(tmp_path, data):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("side,bad", [("student", "backbone.layer9"), ("teacher", "backbone.layr3")])
def test_bad_names_stop_the_cli_before_any_training(tmp_path, capsys, side, bad):
    pair = {"student": "backbone.layer3", "teacher": "backbone.layer3", side: bad}
    cfg = write(tmp_path, {**TINY, "student": {**TINY["student"], "distill": {"features": [pair]}}})
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"student.distill.features[0].{side}: no layer named '{bad}'" in err and "did you mean" in err
    assert not (tmp_path / "run" / "teacher").exists()  # not even the teacher was trained


def test_bad_teacher_name_of_a_loaded_teacher_stops_before_the_student(tmp_path, capsys):
    cfg = write(tmp_path, TINY)
    assert cli.main(["pretrain", str(cfg), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    pair = {"student": "backbone.layer3", "teacher": "backbone.layer33"}
    cfg = write(tmp_path, {**TINY, "teacher": {**TINY["teacher"], "checkpoint": str(tmp_path / "t" / "teacher")},
                           "student": {**TINY["student"], "distill": {"features": [pair]}}})
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "student.distill.features[0].teacher: no layer named 'backbone.layer33'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "student").exists()


# ------------------------------------------------------------------ end to end through the CLI
def test_cli_classification_run_with_feature_pairs(tmp_path, capsys):
    from lorkd.engine import load_checkpoint
    from safetensors.torch import load_file

    pairs = [{"student": "backbone.layer3", "teacher": "backbone.layer2", "kind": "mse"},
             {"student": "backbone.layer4", "teacher": "backbone.layer4", "kind": "cka", "weight": 0.5},
             {"student": "backbone", "teacher": "backbone", "kind": "cosine"}]
    student = {**TINY["student"], "distill": {"feat_weight": 0.5, "features": pairs}}
    cfg = write(tmp_path, {**TINY, "student": student, "baselines": {"run": ["mtl_kd"]}})
    out = tmp_path / "run"
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    history = [yaml.safe_load(line) for line in (out / "student" / "history.jsonl").read_text().splitlines()]
    assert {"ce", "kd", "feat", "feat_0", "feat_1", "feat_2"} <= set(history[-1])
    assert {"feat_0", "feat_1"} <= set(yaml.safe_load((out / "baselines" / "mtl_kd" / "all" / "history.jsonl").read_text()))
    projectors = load_checkpoint(out / "student" / "checkpoints" / "latest.pt")["extra_modules"]
    assert {k.split(".")[1] for k in projectors} == {"feat", "feat_0", "feat_2"}  # cka has none
    assert not any("projector" in k for k in load_file(str(out / "student" / "model.safetensors")))
    assert not any("projector" in k for k in load_file(str(out / "experts" / "synth_xray" / "expert.safetensors")))


def test_cli_segmentation_run_with_a_feature_pair(tmp_path, capsys):
    import json

    from test_segmentation import tiny_config, write_h5_task

    a = write_h5_task(tmp_path / "a", shape=(8, 24, 24), classes=3, patients=4, frames=1)
    cfg = tiny_config([{"name": "a", "path": str(a), "num_classes": 3}], [4, 8, 8],
                      evaluate={"latency_repeats": 1, "hd95": False})
    # the student's first down-sampled map against the teacher's full-size output map (resized)
    cfg["student"]["distill"] = {"features": [{"student": "backbone.model.0", "teacher": "backbone", "kind": "mse"},
                                              {"student": "backbone.model.1", "teacher": "backbone.model.1",
                                               "kind": "cka"}]}
    out = tmp_path / "run"
    assert cli.main(["run", str(write(tmp_path, cfg)), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    row = json.loads((out / "student" / "history.jsonl").read_text().splitlines()[-1])
    assert row["feat_0"] > 0 and 0 <= row["feat_1"] <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"]["a"]["expert"]["dice"] == pytest.approx(metrics["tasks"]["a"]["student"]["dice"], abs=1e-6)


# ------------------------------------------------------------------ exact resume with projectors
def classification_run(tmp_path, student: dict):
    from lorkd.engine.distributed import DistributedContext
    from lorkd.pipelines.recipes import classification as C
    from lorkd.pipelines.schema import ClassificationConfig

    cfg = from_dict(ClassificationConfig, {**TINY, "student": {**TINY["student"], **student}})
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return C.ClassificationRecipe(cfg, tmp_path / "run", DistributedContext(), progress=False)


class Stop(Exception):
    pass


def test_resume_restores_model_and_projectors_exactly(tmp_path):
    from dataclasses import replace

    from lorkd.engine import load_checkpoint
    from lorkd.pipelines.stages.teacher import stage_teacher

    pairs = [{"student": "backbone.layer3", "teacher": "backbone.layer3", "kind": "mse"},
             {"student": "backbone.layer2", "teacher": "backbone.layer4", "kind": "cosine"}]
    run = classification_run(tmp_path, {"distill": {"feat_weight": 1.0, "features": pairs}})
    teacher = stage_teacher(run)
    sc = run.cfg.student
    stage = replace(sc.train, epochs=2, checkpoint_every=4)  # 6 steps per epoch: checkpoints at 4, 6, 8, 12

    def train(folder):
        run.distill_fit(run.network(sc.net, run.num_classes, sc.experts.as_kwargs()), stage, folder, sc.distill, teacher)
        return load_checkpoint(folder / "checkpoints" / "latest.pt")

    whole = train(run.out / "whole")
    evaluate, calls = run.val_metrics, []

    def fails_at_the_end_of_epoch_1(model, tasks=None):
        calls.append(1)
        if len(calls) == 2:
            raise Stop()
        return evaluate(model, tasks)

    run.val_metrics = fails_at_the_end_of_epoch_1
    with pytest.raises(Stop):
        train(run.out / "cut")
    assert load_checkpoint(run.out / "cut" / "checkpoints" / "latest.pt")["global_step"] == 8
    run.val_metrics, run.resume = evaluate, True
    resumed = train(run.out / "cut")
    assert resumed["global_step"] == whole["global_step"] == 12
    for part in ("model", "extra_modules"):
        assert resumed[part].keys() == whole[part].keys()
        assert all(torch.equal(resumed[part][k], whole[part][k]) for k in whole[part]), part
    assert {k.split(".")[1] for k in whole["extra_modules"]} == {"feat", "feat_0", "feat_1"}
    assert whole["extra_modules"]["projectors.feat_1.proj.weight"].ndim == 4  # a 1x1 conv: maps of other sizes
