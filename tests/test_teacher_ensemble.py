"""Multi-teacher distillation: ``teacher.source`` as a list (an ensemble of teachers).

Unit level: two identical teachers give the single teacher's logits, features and distillation loss
exactly; weights by validation metric sum to 1 per task; segmentation maps combine the same way.
Run level (tiny synthetic tasks, a tiny MONAI DenseNet as the foundation model): the teacher stage
adapts each member into ``teacher/members/<i>``, saves the ensemble in ``teacher/``, reuses and
resumes it, another run reads it with ``kind: lorkd``, and a member that cannot load stops the run
before any training with an error naming ``teacher.source[i]``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import DenseNet, UNet
from safetensors.torch import load_file

from lorkd import cli
from lorkd.config import from_dict
from lorkd.data.multitask import TaskBatch
from lorkd.errors import ConfigError
from lorkd.models.ensemble import EnsembleTeacher, build_ensemble, mean_weights, metric_weights
from lorkd.models.teacher import Foundation
from lorkd.pipelines.core.objective import DistillObjective
from lorkd.pipelines.schema import ClassificationConfig, Distill

NET_KWARGS = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "init_features": 8, "growth_rate": 4,
              "block_config": [1, 1, 1, 1], "bn_size": 2}
DATA = {"synthetic": {"num_tasks": 2, "size": 16, "n_train": 24, "n_val": 12, "n_test": 12}}
STAGE = {"epochs": 1, "batch_size": 12}


def densenet(seed: int) -> DenseNet:
    torch.manual_seed(seed)
    return DenseNet(**NET_KWARGS).eval()


def foundation(module: torch.nn.Module, seed: int = 0) -> Foundation:
    torch.manual_seed(seed)  # the fitted head's initial weights
    x = torch.randn(4, 1, 16, 16)
    from lorkd.models.teacher import InputAdapter
    return Foundation(module, [3, 2], x, heads={0: [0, 3]}, features="features.denseblock4",
                      input_adapter=InputAdapter(2, 32, "repeat", 3)).freeze_backbone(True).eval()


# ------------------------------------------------------------------ unit: exactness, weights, segmentation
def test_two_identical_teachers_give_the_single_teachers_logits_features_and_loss_exactly():
    single = foundation(densenet(0))
    twin = foundation(densenet(0))
    twin.load_state_dict(single.state_dict())
    for weights in (None, metric_weights([[0.7, 0.4], [0.7, 0.4]])):
        ensemble = EnsembleTeacher([single, twin], weights).eval()
        torch.manual_seed(1)
        x, ids = torch.randn(6, 1, 16, 16), torch.tensor([1, 0, 0, 1, 1, 0])
        with torch.no_grad():
            a, b = single(x, ids), ensemble(x, ids)
        assert a.logits.keys() == b.logits.keys()
        assert all(torch.equal(a.logits[t], b.logits[t]) for t in a.logits)
        assert torch.equal(a.features, b.features) and all(torch.equal(a.rows[t], b.rows[t]) for t in a.rows)
        # the distillation loss of a student: the same, term by term
        student = foundation(densenet(5), seed=5).train()
        batch = TaskBatch(x, torch.tensor([0, 1, 2, 1, 0, 1]), ids)
        counts = torch.bincount(ids, minlength=2)
        out = student(x, ids)
        w = Distill(ce_weight=1.0, kd_weight=1.0, temperature=4.0)
        one = DistillObjective(w, single).step_loss(out, batch, counts)
        two = DistillObjective(w, ensemble).step_loss(out, batch, counts)
        assert torch.equal(one.total, two.total) and one.parts == two.parts and one.per_task == two.per_task


def test_ensemble_of_different_teachers_is_the_weighted_sum_and_reads_features_from_the_named_member():
    a, b = foundation(densenet(0), 0), foundation(densenet(1), 1)
    weights = torch.tensor([[0.25, 0.5], [0.75, 0.5]])
    ensemble = EnsembleTeacher([a, b], weights, features_from=1, labels=["dn0", "dn1"]).eval()
    x, ids = torch.randn(5, 1, 16, 16), torch.tensor([0, 1, 0, 1, 1])
    with torch.no_grad():
        oa, ob, oe = a(x, ids), b(x, ids), ensemble(x, ids)
    for t in (0, 1):
        assert torch.allclose(oe.logits[t], weights[0, t] * oa.logits[t] + weights[1, t] * ob.logits[t], atol=1e-6)
    assert torch.equal(oe.features, ob.features) and ensemble.feature_root is b.feature_root
    plain, _ = ensemble.export_task(1)
    with torch.no_grad():
        assert torch.allclose(plain(x), ensemble(x, torch.ones(5, dtype=torch.long)).logits[1])
    # rebuilt from its record and state dict: the same outputs
    again = build_ensemble({"members": [0, 1], "features_from": 1, "labels": ["dn0", "dn1"]},
                           lambda i: foundation(densenet(7), 7))
    again.load_state_dict(ensemble.state_dict())
    with torch.no_grad():
        assert all(torch.equal(again.eval()(x, ids).logits[t], oe.logits[t]) for t in (0, 1))


def test_weights_by_validation_metric_sum_to_one_per_task():
    w = metric_weights([[0.9, 0.5, 0.0], [0.6, 0.5, 0.0], [0.3, 1.0, 0.0]])
    assert w.shape == (3, 3) and torch.allclose(w.sum(0), torch.ones(3))
    assert torch.allclose(w[:, 0], torch.tensor([0.5, 1 / 3, 1 / 6])) and torch.allclose(w[:, 2], torch.full((3,), 1 / 3))
    assert torch.equal(mean_weights(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="finite values >= 0"):
        metric_weights([[0.5, -0.1], [0.5, 0.2]])
    with pytest.raises(ValueError, match="must sum to 1"):
        EnsembleTeacher([foundation(densenet(0)), foundation(densenet(0))], torch.tensor([[0.5, 0.5], [0.6, 0.5]]))


def test_segmentation_maps_combine_the_same_way():
    torch.manual_seed(0)
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 8], strides=[2], num_res_units=0).eval()
    x = torch.randn(2, 1, 8, 16, 16)
    make = lambda: Foundation(unet, [3], x, features="model.1.submodule", dense=True).freeze_backbone(True).eval()  # noqa: E731
    single, twin = make(), make()
    twin.load_state_dict(single.state_dict())
    ids = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        a, b = single(x, ids), EnsembleTeacher([single, twin]).eval()(x, ids)
    assert b.logits[0].shape == (2, 3, 8, 16, 16) and torch.equal(a.logits[0], b.logits[0])


# ------------------------------------------------------------------ config: errors name the key
def cfg_of(teacher: dict) -> ClassificationConfig:
    return from_dict(ClassificationConfig, {"data": DATA, "teacher": teacher})


@pytest.mark.parametrize("teacher, pattern", [
    ({"source": [{"kind": "lorkd", "path": "a"}, {"kind": "state_dict", "path": ""}]},
     r"^teacher\.source\[1\]\.path: give the file"),
    ({"source": [{"kind": "lorkd", "path": "a"}, {"kind": "timm", "path": "w.pth"}]}, r"^teacher\.source\[1\]\.name:"),
    ({"source": [{"kind": "lorkd", "path": "a"}]}, r"^teacher\.source: an ensemble needs two or more"),
    ({"source": {"kind": "lorkd", "path": "a"}, "ensemble": {"weights": "mean"}}, r"^teacher\.ensemble: only with a list"),
    ({"source": [{"kind": "lorkd", "path": "a"}, {"kind": "lorkd", "path": "b"}], "ensemble": {"features_from": 2}},
     r"^teacher\.ensemble\.features_from: member 2 is out of range"),
    ({"source": [{"kind": "lorkd", "path": "a", "label": "x"}, {"kind": "lorkd", "path": "b"}],
      "ensemble": {"features_from": "y"}}, r"^teacher\.ensemble\.features_from: no member labelled 'y'.*\['x', '1'\]"),
    ({"source": [{"kind": "lorkd", "path": "a", "label": "x"}, {"kind": "lorkd", "path": "b", "label": "x"}]},
     r"^teacher\.source\[1\]\.label: 'x' names two members"),
    ({"source": [{"kind": "lorkd", "path": "a"}, {"kind": "lorkd", "path": "b", "features": "f"}]},
     r"^teacher\.source\[1\]\.features: only for a loaded foundation model"),
    ({"source": [{"kind": "lorkd", "path": "a"}, {"kind": "lorkd", "path": "b"}], "ensemble": {"weights": "max"}},
     r"^teacher\.ensemble\.weights: 'max' is not one of"),
])
def test_bad_ensemble_configs_name_the_key(teacher, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cfg_of(teacher)


def test_a_single_source_is_read_as_before():
    cfg = cfg_of({"source": {"kind": "lorkd", "path": "a"}})
    assert type(cfg.teacher.source).__name__ == "TeacherSource" and cfg.teacher.ensemble is None
    cfg = cfg_of({"source": [{"kind": "lorkd", "path": "a"}, {"kind": "lorkd", "path": "b"}]})
    assert cfg.teacher.ensemble.weights == "mean" and cfg.teacher.ensemble.features_from == 0


# ------------------------------------------------------------------ run level
@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fm") / "fm.pt"
    torch.save({f"module.{k}": v for k, v in densenet(0).state_dict().items()}, path)
    return path


def member(path: Path, **extra) -> dict:
    return {"kind": "state_dict", "path": str(path), "factory": "monai.networks.nets:DenseNet", "kwargs": NET_KWARGS,
            "key_map": {"strip_prefix": "module."}, **extra}


def write_config(tmp_path: Path, teacher: dict, name: str = "cfg.yaml", **student) -> Path:
    cfg = {"data": DATA, "teacher": teacher, "evaluate": {"latency_repeats": 1},
           "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": STAGE, **student}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def ensemble_teacher(*members: dict, **extra) -> dict:
    return {"source": list(members), "features": "features.denseblock4", "heads": {"synth_xray": [0, 3]},
            "input": {"size": 32, "channels": "repeat"}, "adapt": {"mode": "heads", **STAGE}, **extra}


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_ensemble_teacher_folder_is_adapted_saved_reused_resumed_and_read_as_a_lorkd_source(tmp_path, weights_file,
                                                                                            capsys):
    teacher = ensemble_teacher(member(weights_file, label="dn"), member(weights_file, features="features.denseblock3"),
                               ensemble={"weights": "val_accuracy", "features_from": "dn"})
    cfg = write_config(tmp_path, teacher)
    out = tmp_path / "run"
    assert run_cli("pretrain", cfg, "--out", out, "--no-progress") == 0
    folder = out / "teacher"
    for i in (0, 1):
        assert (folder / "members" / str(i) / "model.safetensors").is_file()
        assert (folder / "members" / str(i) / "checkpoints" / "best.pt").is_file()
    meta = json.loads((folder / "model.json").read_text())
    info = meta["teacher_info"]
    assert info["source"]["kind"] == "ensemble" and meta["ensemble"]["labels"] == ["dn", "1"]
    ens = info["ensemble"]
    assert ens["weights"] == "val_accuracy" and ens["metric"] == "acc" and ens["features_from"] == 0
    for task, ws in ens["per_task"].items():
        assert abs(sum(ws) - 1.0) < 1e-6 and len(ens["val"][task]) == 2
    assert info["description"].startswith("ensemble of 2 teachers (dn, 1), logits weighted per task by each member's "
                                          "validation acc")
    assert "member dn: foundation model loaded from state_dict" in info["description"]
    saved = load_file(str(folder / "model.safetensors"))
    assert "weights" in saved and torch.allclose(saved["weights"].sum(0), torch.ones(2))
    # a second command reuses the saved ensemble; with the ensemble gone, the members are reused (resume)
    assert run_cli("pretrain", cfg, "--out", out, "--resume", "--no-progress") == 0
    (folder / "model.safetensors").unlink()
    (folder / "members" / "1" / "model.safetensors").unlink()  # member 1 resumes from its checkpoint
    history = (folder / "members" / "1" / "history.csv").read_text()
    assert run_cli("pretrain", cfg, "--out", out, "--resume", "--no-progress") == 0
    again = load_file(str(folder / "model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert (folder / "members" / "1" / "history.csv").read_text() == history
    # the folder's fingerprint covers the ensemble: another combination is refused unless --reuse
    cfg_mean = write_config(tmp_path, {**teacher, "ensemble": {"weights": "mean", "features_from": "dn"}}, "mean.yaml")
    capsys.readouterr()
    assert run_cli("pretrain", cfg_mean, "--out", out, "--resume", "--no-progress") == 2
    assert 'teacher.ensemble.weights: "val_accuracy" -> "mean"' in capsys.readouterr().err
    # transfer starts from one foundation model: a run whose teacher is an ensemble is refused, naming it
    from lorkd.pipelines.recipes.transfer_foundation import foundation_from_run
    with pytest.raises(ConfigError, match=r"foundation\.run: the teacher in .* is an ensemble of 2 teachers"):
        foundation_from_run(out)
    # another run reads the ensemble folder as a lorkd teacher and distils it (features from member dn, a
    # layer inside its DenseNet); the report says what it is
    distill = {"feat_weight": 0.5, "features": [{"student": "backbone.layer1", "teacher": "features.denseblock2"}]}
    cfg2 = write_config(tmp_path, {"source": {"kind": "lorkd", "path": str(folder)}}, "cfg2.yaml", distill=distill)
    assert run_cli("run", cfg2, "--out", tmp_path / "r2", "--no-progress") == 0
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert metrics["teacher"]["description"].startswith(f"teacher reused from {folder}: ensemble of 2 teachers")
    assert "ensemble of 2 teachers" in (tmp_path / "r2" / "report.md").read_text()
    assert 0.0 <= metrics["tasks"]["synth_xray"]["teacher"]["acc"] <= 1.0
    header = (tmp_path / "r2" / "student" / "history.csv").read_text().splitlines()[0].split(",")
    assert "feat" in header and "feat_0" in header


def test_a_member_that_cannot_load_stops_the_run_before_training_naming_it(tmp_path, weights_file, capsys):
    for bad, pattern in [
        (member(tmp_path / "nope.pt"), r"teacher\.source\[1\]\.path: file .*nope\.pt not found"),
        (member(weights_file, key_map={}), r"teacher\.source\[1\]: the weights of .* missing keys"),
        ({"kind": "lorkd", "path": str(tmp_path / "nothing")}, r"teacher\.source\[1\]\.path: .*is not a lorkd teacher"),
        (member(weights_file, features="features.nope"), r"teacher\.source\[1\]\.features: no layer named 'features\.nope'"),
    ]:
        cfg = write_config(tmp_path, ensemble_teacher(member(weights_file), bad))
        assert run_cli("pretrain", cfg, "--out", tmp_path / "run", "--no-progress") == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err), err
        assert not (tmp_path / "run" / "teacher" / "members" / "0" / "checkpoints").exists()


def test_lorkd_teacher_describes_each_member(tmp_path, weights_file, capsys):
    cfg = write_config(tmp_path, ensemble_teacher(member(weights_file), member(weights_file, label="b")))
    assert run_cli("teacher", cfg) == 0
    text = capsys.readouterr().out
    assert text.startswith("ensemble of 2 teachers (0, b): logits averaged") and "member b (teacher.source[1]):" in text
    assert text.count("synth_xray (3 classes): its output [0, 3] -> logits [2, 3]") == 2


def test_segmentation_takes_an_ensemble_of_two_unets(tmp_path):
    from test_segmentation import tiny_config, write_h5_task

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
              "num_res_units": 0}
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(UNet(**kwargs).state_dict(), tmp_path / f"unet{seed}.pt")
    root = write_h5_task(tmp_path / "h5", shape=(8, 16, 16), classes=3, patients=4, frames=1)
    sources = [{"kind": "state_dict", "path": str(tmp_path / f"unet{s}.pt"), "factory": "monai.networks.nets:UNet",
                "kwargs": kwargs} for s in (0, 1)]
    cfg = tiny_config([{"name": "heart", "path": str(root)}], [8, 16, 16], evaluate={"latency_repeats": 1, "hd95": False})
    cfg["teacher"] = {"source": sources, "features": "model.1.submodule", "ensemble": {"weights": "val_accuracy"},
                      "adapt": {"mode": "heads", "epochs": 1, "batch_size": 4}}
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli("pretrain", path, "--out", tmp_path / "run", "--no-progress") == 0
    info = json.loads((tmp_path / "run" / "teacher" / "model.json").read_text())["teacher_info"]
    assert info["ensemble"]["metric"] == "dice" and abs(sum(info["ensemble"]["per_task"]["heart"]) - 1) < 1e-6
