"""Every ``lorkd`` command end to end on tiny data (synthetic tasks and tiny .npz files)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lorkd import cli
from lorkd.pipelines.schema import presets

TINY = {
    "data": {"synthetic": {"num_tasks": 2, "size": 16, "n_train": 48, "n_val": 24, "n_test": 24}},
    "teacher": {"net": {"arch": "resnet10", "widen": 0.25}, "train": {"epochs": 1, "batch_size": 16}},
    "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": {"epochs": 1, "batch_size": 16}},
}


def write_config(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


@pytest.mark.slow
def test_stage_commands_one_after_another_then_predict(tmp_path, capsys):
    cfg = write_config(tmp_path, TINY)
    out = tmp_path / "run"
    assert run_cli("pretrain", cfg, "--out", out, "--no-progress") == 0
    assert (out / "teacher" / "model.safetensors").is_file() and not (out / "student").exists()
    assert run_cli("decompose", cfg, "--out", out, "--no-progress") == 0
    assert (out / "student" / "model.safetensors").is_file()
    assert run_cli("baselines", cfg, "--out", out, "--no-progress", "--set", "baselines.run=[stl,mtl]") == 0
    assert (out / "baselines" / "mtl" / "all" / "model.safetensors").is_file()  # evaluate finds them: no --set
    assert run_cli("export", cfg, "--out", out, "--no-progress") == 0
    card = json.loads((out / "experts" / "synth_xray" / "card.json").read_text())
    assert card["classes"] == 3 and card["architecture"]["factory"].endswith("plain_classifier")
    assert run_cli("evaluate", cfg, "--out", out, "--no-progress") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]["synth_xray"]) == {"teacher", "student", "expert", "stl", "mtl"}
    assert metrics["tasks"]["synth_xray"]["expert"]["acc"] == pytest.approx(metrics["tasks"]["synth_xray"]["student"]["acc"])
    assert (out / "report.md").is_file() and (out / "plots" / "metric_acc.png").is_file()
    # what the bootstrap needs is kept, and its intervals, the majority rates and every size are recorded
    from lorkd.report.stats import load_predictions

    kept = load_predictions(out / "predictions_test.npz")["synth_xray"]
    assert set(kept) == {"teacher", "student", "expert", "stl", "mtl"} and kept["stl"]["probs"].shape == (24, 3)
    stats = metrics["statistics"]
    assert stats["intervals"]["synth_xray"]["expert"]["acc"]["value"] == metrics["tasks"]["synth_xray"]["expert"]["acc"]
    assert stats["differences"]["synth_xray"]["expert - best baseline"]["baseline"] in ("stl", "mtl")
    assert 0 < metrics["majority"]["synth_xray"]["test"] <= 1 and {"stl", "mtl"} <= set(metrics["params"])
    capsys.readouterr()

    # predict: a .npz split and two image files through the exported expert
    npz = tmp_path / "x.npz"
    rng = np.random.default_rng(0)
    images = {f"{s}_images": rng.integers(0, 255, (3, 16, 16), dtype=np.uint8) for s in ("train", "val", "test")}
    labels = {f"{s}_labels": np.zeros((3, 1), np.uint8) for s in ("train", "val", "test")}
    np.savez(npz, **images, **labels)
    Image.fromarray(images["test_images"][0]).save(tmp_path / "a.png")
    Image.fromarray(np.stack([images["test_images"][1]] * 3, -1)).resize((20, 20)).save(tmp_path / "b.png")
    assert run_cli("predict", out / "experts" / "synth_xray", npz, tmp_path / "a.png", tmp_path / "b.png") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 5 and set(rows[0]) == {"input", "prediction", "p0", "p1", "p2"}
    assert all(abs(sum(float(r[f"p{c}"]) for c in range(3)) - 1) < 1e-5 for r in rows)
    assert run_cli("predict", out / "experts" / "synth_xray", tmp_path / "a.png", "--output", tmp_path / "p.json") == 0
    assert json.loads((tmp_path / "p.json").read_text())[0]["input"] == str(tmp_path / "a.png")


@pytest.mark.slow
def test_run_on_npz_files_then_reuse_teacher_and_aggregate_report(tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = []
    for name, shape, classes in (("gray", (16, 16), 2), ("rgb", (16, 16, 3), 3)):
        data = {}
        for split, n in (("train", 40), ("val", 12), ("test", 12)):
            data[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
            data[f"{split}_images"] = rng.integers(0, 255, (n, *shape), dtype=np.uint8)
        np.savez(tmp_path / f"{name}.npz", **data)
        paths.append({"name": name, "path": str(tmp_path / f"{name}.npz")})
    base = {k: v for k, v in TINY.items() if k != "data"}
    cfg = write_config(tmp_path, {**base, "data": {"tasks": paths}})
    assert run_cli("run", cfg, "--out", tmp_path / "r0", "--no-progress") == 0
    # a second run reuses the first run's teacher through teacher.source (kind lorkd)
    assert run_cli("run", cfg, "--out", tmp_path / "r1", "--no-progress", "--set", "seed=1",
                   "--set", "teacher.source.kind=lorkd", "--set", f"teacher.source.path={tmp_path / 'r0' / 'teacher'}") == 0
    assert not (tmp_path / "r1" / "teacher").exists()
    # the second run's config differs in teacher.source too: refused unless allowed, and said
    assert run_cli("report", tmp_path / "r0", tmp_path / "r1", "--out", tmp_path / "summary.md") == 2
    assert "teacher.source" in capsys.readouterr().err and not (tmp_path / "summary.md").exists()
    assert run_cli("report", tmp_path / "r0", tmp_path / "r1", "--out", tmp_path / "summary.md",
                   "--allow-different") == 0
    text = (tmp_path / "summary.md").read_text()
    assert "±" in text and "`teacher.source.kind`" in text and "--allow-different" in text


@pytest.mark.slow
def test_stl_baseline_of_a_gray_task_in_a_mix_with_an_rgb_task(tmp_path):
    cfg = write_config(tmp_path, {**TINY, "data": {"synthetic": {"num_tasks": 3, "size": 16, "n_train": 24,
                                                                 "n_val": 12, "n_test": 12}},
                                  "baselines": {"run": ["stl"]}})
    assert run_cli("run", cfg, "--out", tmp_path / "run", "--no-progress") == 0
    card = json.loads((tmp_path / "run" / "experts" / "synth_ultrasound" / "card.json").read_text())
    assert card["input_channels"] == 3  # the run's channel count, shared by every network


def test_run_refuses_to_overwrite_another_run(tmp_path, capsys):
    cfg = write_config(tmp_path, TINY)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    assert run_cli("run", cfg, "--out", tmp_path / "run") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"


def test_stage_command_needs_a_run_folder(tmp_path, capsys):
    cfg = write_config(tmp_path, TINY)
    assert run_cli("decompose", cfg, "--out", tmp_path / "nothing") == 2
    assert "not a lorkd run folder" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"student": {"experts": {"rnak": 4}}}, "student.experts.rnak: unknown key (did you mean 'rank'?)"),
    ({"student": {"train": {"epochs": "ten"}}}, "student.train.epochs: expected an integer"),
    ({"student": {"train": {"epochs": 0}}}, "student.train.epochs: must be >= 1"),
    ({"student": {"experts": {"norm": "group"}}}, "student.experts.norm: 'group' is not one of"),
    ({"student": {"distill": {"temperature": -1}}}, "student.distill.temperature: must be > 0"),
    ({"data": {"tasks": [{"name": "a"}]}}, "data.tasks[0].path: required key is missing"),
    ({"data": {}}, "give either data.tasks"),
    ({"teacher": {"train": {"optim": {"lr": -1}}}}, "teacher.train.optim"),
])
def test_config_errors_name_the_key(tmp_path, capsys, change, message):
    data = json.loads(json.dumps(TINY))
    for section, value in change.items():
        if section == "data":
            data["data"] = value
        else:
            for key, sub in value.items():
                data[section].setdefault(key, {}).update(sub)
    assert run_cli("run", write_config(tmp_path, data), "--out", tmp_path / "run") == 2
    assert message in capsys.readouterr().err


def test_bad_override_and_missing_data_file_are_reported(tmp_path, capsys):
    cfg = write_config(tmp_path, TINY)
    assert run_cli("run", cfg, "--out", tmp_path / "a", "--set", "student.train.epochs") == 2
    err = capsys.readouterr().err
    assert "expected key=value, e.g. " in err
    example = err.split("e.g. ")[1].split()[0]
    assert cli.load_recipe(cfg, [example]).student.train.epochs == 5  # the error's own example is a real key
    bad = write_config(tmp_path, {**TINY, "data": {"tasks": [{"name": "x", "path": str(tmp_path / "none.npz")}]}}, "bad.yaml")
    assert run_cli("run", bad, "--out", tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert "none.npz" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_command_runs_the_whole_recipe_with_seed_and_overrides(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(presets, "DEMO", {**TINY, "baselines": {"run": ["student_nokd"]}})
    out = tmp_path / "demo"
    with caplog.at_level("INFO", logger="lorkd"):
        assert run_cli("demo", "--out", out, "--no-progress", "--seed", "3", "--set", "data.student_n_train=24",
                       "--set", "student.train.batch_size=8") == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["seed"] == 3 and config["data"]["synthetic"]["seed"] == 3
    assert config["student"]["train"]["batch_size"] == 8 and config["data"]["student_n_train"] == 24
    assert "lorkd: seed 3, device cpu, " in caplog.text and " torch threads" in caplog.text
    # the teacher trains on all 48 training images per task, the students on the subset of 24
    assert "task synth_xray: train 24 (teacher 48), val 24, test 24" in caplog.text
    assert "[teacher] 1 epochs x 6 steps per epoch (batch 16 per rank x world size 1; 96 training items)" in caplog.text
    assert "[student] 1 epochs x 6 steps per epoch (batch 8 per rank x world size 1; 48 training items)" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(d["n_train"], d["n_train_teacher"]) for d in metrics["data"]] == [(24, 48), (24, 48)]
    assert "student_nokd" in metrics["tasks"]["synth_ultrasound"]
    # the headline, then the report's path, end the output
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report: {out / 'report.md'}" and (out / "report.md").is_file()
    assert printed[-2].startswith("  mean over tasks: teacher ") and "student_nokd" in printed[-2]
    assert printed[-7].startswith("headline (test acc") and printed[-6].startswith("  synth_ultrasound: expert ")
    # another seed: other synthetic data
    assert run_cli("demo", "--out", tmp_path / "seed4", "--no-progress", "--seed", "4") == 0
    first = np.load(out / "predictions_test.npz")
    assert not np.array_equal(first[sorted(first.files)[0]], np.load(tmp_path / "seed4" / "predictions_test.npz")[sorted(first.files)[0]])


def test_demo_config_and_its_overrides_are_validated_naming_the_key(tmp_path, capsys):
    cfg = presets.demo_config(7)
    assert cfg["seed"] == cfg["data"]["synthetic"]["seed"] == 7 and presets.DEMO["seed"] == 0  # a copy
    assert run_cli("demo", "--out", tmp_path / "d", "--set", "student.train.epoch=3") == 2
    err = capsys.readouterr().err
    assert "lorkd demo: " in err and "student.train.epoch" in err and "did you mean 'epochs'" in err
    assert run_cli("demo", "--out", tmp_path / "d", "--set", "data.student_n_train=0") == 2
    assert "data.student_n_train: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_student_subset_keeps_the_class_proportions_and_the_other_splits():
    from lorkd.data.synthetic import make_synthetic_tasks
    from lorkd.errors import DataError
    from lorkd.pipelines.recipes.classification import student_subset

    task = make_synthetic_tasks(3, 16, n_train=40, n_val=8, n_test=8)[2]  # 4 classes, 10 images each
    task.labels["train"][:6] = 0  # now class 0: 13 images, the others fewer (order otherwise random)
    sub = student_subset(task, 20)
    counts = np.bincount(sub.labels["train"], minlength=4)
    full = np.bincount(task.labels["train"], minlength=4)
    assert counts.sum() == 20 and np.all(np.abs(counts - full * 20 / 40) <= 1)
    assert np.array_equal(sub.images["train"], student_subset(task, 20).images["train"])  # the same every time
    assert not np.array_equal(sub.images["train"], student_subset(task, 20, seed=1).images["train"])  # data.cap_seed
    assert sub.images["val"] is task.images["val"] and student_subset(task, None) is task
    with pytest.raises(DataError, match="data.student_n_train: 41 is more than the 40 training images of synth_dermoscopy"):
        student_subset(task, 41)


@pytest.mark.slow
def test_early_stop_key_stops_a_stage_and_is_recorded_in_its_history(tmp_path, capsys):
    teacher = {**TINY["teacher"], "train": {"epochs": 6, "batch_size": 16, "early_stop": {"patience": 1, "min_delta": 0.5}}}
    cfg = write_config(tmp_path, {**TINY, "teacher": teacher})
    out = tmp_path / "run"
    assert run_cli("pretrain", cfg, "--out", out, "--no-progress") == 0
    rows = [json.loads(line) for line in (out / "teacher" / "history.jsonl").read_text().splitlines()]
    # no validation accuracy rises by 0.5 after the first epoch: it stops after the second
    assert [r["early_stop_wait"] for r in rows] == [0, 1] and rows[-1]["early_stop"] is True
    assert "early stop after epoch 1" in capsys.readouterr().err
    bad = write_config(tmp_path, {**TINY, "student": {**TINY["student"], "train": {"early_stop": {"patience": 0}}}}, "bad.yaml")
    assert run_cli("run", bad, "--out", tmp_path / "bad", "--no-progress") == 2
    assert "student.train.early_stop.patience: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_recompute_norm_stats_gives_the_saved_student_exact_training_statistics(tmp_path):
    import torch
    from safetensors.torch import load_file

    from lorkd.config import from_dict
    from lorkd.engine.distributed import DistributedContext
    from lorkd.engine.norms import recompute_norm_statistics
    from lorkd.pipelines.core.netio import load_network
    from lorkd.pipelines.core.training import norm_batches
    from lorkd.pipelines.recipes.classification import ClassificationRecipe
    from lorkd.pipelines.schema import ClassificationConfig

    student = {**TINY["student"], "train": {"epochs": 2, "batch_size": 16, "recompute_norm_stats": 10}}
    data = {**TINY, "student": student}
    cfg = write_config(tmp_path, data)
    out = tmp_path / "run"
    assert run_cli("run", cfg, "--out", out, "--no-progress") == 0
    model, _ = load_network(out / "student", ClassificationRecipe.build)
    saved = load_file(str(out / "student" / "model.safetensors"))
    # the saved (best-epoch) statistics are the exact averages over the first 10 training images per task
    config = from_dict(ClassificationConfig, data)
    recipe = ClassificationRecipe(config, tmp_path / "probe", DistributedContext(), progress=False)
    recompute_norm_statistics(model, norm_batches(recipe.train_set, 10, 16), "cpu")
    running = [k for k in saved if k.endswith("running_mean")]
    assert running
    for k in running:
        torch.testing.assert_close(model.state_dict()[k], saved[k])
