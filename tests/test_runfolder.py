"""Run-folder integrity: stage fingerprints, --reuse, failed starts, file modes (issue 12.1)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lorkd import cli
from lorkd.config import from_dict
from lorkd.errors import ConfigError
from lorkd.fileio import write_atomic, write_json
from lorkd.pipelines.core.fingerprint import differences, flatten, stage_config, write_fingerprint
from lorkd.pipelines.core.recipe import DecompositionRecipe, RunState
from lorkd.pipelines.core.runfolder import check_fingerprints
from lorkd.pipelines.schema import ClassificationConfig
from lorkd.pipelines.schema import SegmentationConfig

from test_cli import TINY



def fake_run(cfg, out, names):
    """What check_fingerprints reads of a recipe: its config, folder, task names and baseline folders."""
    run = SimpleNamespace(cfg=cfg, out=out, names=names, state=RunState())
    run.baseline_groups = lambda name: DecompositionRecipe.baseline_groups(run, name)
    return run

def cfg_file(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_flatten_and_differences_name_dotted_keys():
    flat = flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}})
    assert flat == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
    assert differences({"a.b": 1, "x": "s", "z": [1]}, {"a.b": 2, "y": None, "w": 0}) == [
        "a.b: 1 -> 2", "w: (absent) -> 0", 'x: "s" -> (absent)', "z: [1] -> (absent)"]  # y: added later, at null


def test_stage_configs_hold_only_what_the_stage_depends_on():
    cfg = from_dict(ClassificationConfig, TINY)
    teacher, stl = stage_config(cfg, "teacher"), stage_config(cfg, "baselines/stl/a")
    assert "teacher.net.arch" in teacher and not any(k.startswith("student") for k in teacher)
    assert "student.net.arch" in stl and not any(k.startswith(("teacher", "student.distill")) for k in stl)
    assert "teacher.net.arch" in stage_config(cfg, "baselines/stl_kd/a")
    assert not any(k.startswith(("device", "evaluate", "num_workers")) for k in stage_config(cfg, "student"))


def _fake_stage(out: Path, stage: str, cfg) -> None:
    folder = out / stage
    write_json(folder / "model.json", {})
    (folder / "model.safetensors").write_bytes(b"x")
    write_fingerprint(folder, stage, cfg)


@pytest.mark.parametrize("recipe", ["classification", "segmentation"])
def test_both_recipes_refuse_a_stage_trained_with_another_config(tmp_path, recipe):
    if recipe == "classification":
        old = from_dict(ClassificationConfig, TINY)
        new = from_dict(ClassificationConfig, {**TINY, "student": {**TINY["student"], "train": {"epochs": 3}}})
    else:
        data = {"data": {"tasks": [{"name": "heart", "path": "x"}]}}
        old = from_dict(SegmentationConfig, data)
        new = from_dict(SegmentationConfig, {**data, "student": {"net": {"features": 4}}})
    _fake_stage(tmp_path, "student", old)
    _fake_stage(tmp_path, "teacher", old)
    run = fake_run(new, tmp_path, ["heart"])
    with pytest.raises(ConfigError) as err:
        check_fingerprints(run, reuse=False)
    msg = str(err.value)
    assert "student" in msg and "--reuse" in msg and "teacher (" not in msg  # the teacher's parts are the same
    assert ("student.train.epochs: 1 -> 3" if recipe == "classification" else "student.net.features: 8 -> 4") in msg
    assert set(check_fingerprints(run, reuse=True)) == {"student"}
    run.cfg = old
    assert check_fingerprints(run, reuse=False) == {}


def test_stage_without_fingerprint_counts_as_unknown(tmp_path):
    cfg = from_dict(ClassificationConfig, TINY)
    _fake_stage(tmp_path, "teacher", cfg)
    (tmp_path / "teacher" / "fingerprint.json").unlink()
    with pytest.raises(ConfigError, match="teacher.*no fingerprint.json"):
        check_fingerprints(fake_run(cfg, tmp_path, ["a"]), reuse=False)


@pytest.mark.slow
def test_evaluate_with_another_config_is_refused_then_reused_and_recorded(tmp_path, capsys, caplog):
    cfg = cfg_file(tmp_path, {**TINY, "evaluate": {"latency_repeats": 1}})
    out = tmp_path / "run"
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    config_before = (out / "config.yaml").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(s["stage"], s["status"]) for s in metrics["stages"]] == [("teacher", "trained"), ("student", "trained")]
    capsys.readouterr()
    argv = ["evaluate", str(cfg), "--out", str(out), "--no-progress", "--set", "student.train.epochs=2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "student.train.epochs: 1 -> 2" in err and "--reuse" in err and "Traceback" not in err
    with caplog.at_level(logging.INFO, logger="lorkd"):
        assert cli.main(argv + ["--reuse"]) == 0
    assert f"teacher: reused from {out / 'teacher'} (trained earlier with the same config)" in caplog.text
    assert f"student: reused from {out / 'student'} though its config differs (student.train.epochs: 1 -> 2)" in caplog.text
    assert (out / "config.yaml").read_text() == config_before  # still describes the models in the folder
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["student"]["train"]["epochs"] == 1
    student = [s for s in metrics["stages"] if s["stage"] == "student"][0]
    assert student["status"] == "reused with --reuse" and student["config_differs"] == ["student.train.epochs: 1 -> 2"]
    report = (out / "report.md").read_text()
    assert "## Stages" in report and "| teacher | reused |" in report and "reused with --reuse" in report


def test_a_resumed_or_loaded_stage_says_so(tmp_path, caplog):
    from lorkd.pipelines.core.runfolder import record_stage

    run = SimpleNamespace(ctx=SimpleNamespace(is_main=True), state=RunState())
    with caplog.at_level(logging.INFO, logger="lorkd"):
        record_stage(run, "student", "resumed", tmp_path / "student")
        record_stage(run, "teacher", "loaded", tmp_path / "fm.pt")
        record_stage(run, "baselines/stl/a", "trained", tmp_path / "stl")
    assert caplog.messages == [f"student: resumed from {tmp_path / 'student' / 'checkpoints' / 'latest.pt'}",
                               f"teacher: loaded from {tmp_path / 'fm.pt'}"]
    assert [e["status"] for e in run.state.stage_log] == ["resumed", "loaded", "trained"]


@pytest.mark.parametrize("bad, fragments", [
    ({"teacher": {"net": {"arch": "resnet1O"}}}, ["teacher.net.arch", "resnet1O"]),
    ({"teacher": {"net": {"arch": "resnet10", "kwargs": {"shortcut_type": "Z"}}}}, ["teacher.net.kwargs", "'Z'"]),
    ({"data": {"tasks": [{"name": "x", "path": "nowhere/missing.npz"}]}}, ["data.tasks[0].path", "missing.npz"])])
def test_a_failed_start_leaves_nothing_that_blocks_the_rerun(tmp_path, capsys, bad, fragments):
    data = json.loads(json.dumps(TINY))
    for key, value in bad.items():
        data[key] = {**data[key], **value} if key != "data" else value
    out = tmp_path / "run"
    assert cli.main(["pretrain", str(cfg_file(tmp_path, data, "bad.yaml")), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments) and err.count("\n") == 1, err
    assert not out.exists()  # the command created the folder: it removes it again
    assert cli.main(["pretrain", str(cfg_file(tmp_path, TINY)), "--out", str(out), "--no-progress"]) == 0
    assert (out / "teacher" / "model.safetensors").is_file() and (out / "teacher" / "fingerprint.json").is_file()



def test_a_failed_start_never_deletes_a_folder_with_files_lorkd_did_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    bad = {**TINY, "teacher": {**TINY["teacher"], "net": {"arch": "resnet1O"}}}
    with pytest.warns(UserWarning, match="notes.txt"):
        code = cli.main(["pretrain", str(cfg_file(tmp_path, bad, "bad.yaml")), "--out", str(out), "--no-progress",
                         "--overwrite"])
    assert code == 2 and "resnet1O" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"

def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "sub" / "a.json", {"a": 1})
        from safetensors.torch import save_file
        import torch
        write_atomic(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))
        os.umask(0o077)
        write_json(tmp_path / "private.json", {})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "sub" / "a.json") == 0o644 and mode(tmp_path / "w.safetensors") == 0o644
    assert mode(tmp_path / "sub") == 0o755
    assert mode(tmp_path / "private.json") == 0o600


def test_baselines_left_in_the_folder_are_checked_even_when_no_longer_configured(tmp_path):
    old = from_dict(ClassificationConfig, {**TINY, "baselines": {"run": ["stl"]}})
    _fake_stage(tmp_path, "baselines/stl/a", old)
    new = from_dict(ClassificationConfig, {**TINY, "student": {**TINY["student"], "net": {"arch": "resnet18"}}})
    with pytest.raises(ConfigError, match=r"baselines/stl/a .*student\.net\.arch: \"resnet10\" -> \"resnet18\""):
        check_fingerprints(fake_run(new, tmp_path, ["a"]), reuse=False)


def test_segmentation_recipe_records_and_checks_its_stages(tmp_path, capsys):
    from test_segmentation import tiny_config, write_h5_task

    task = write_h5_task(tmp_path / "a", shape=(8, 24, 24), classes=3, patients=4, frames=1)
    data = tiny_config([{"name": "a", "path": str(task), "num_classes": 3}], [4, 8, 8])
    out = tmp_path / "run"
    assert cli.main(["pretrain", str(cfg_file(tmp_path, data)), "--out", str(out), "--no-progress"]) == 0
    recorded = json.loads((out / "teacher" / "fingerprint.json").read_text())
    assert recorded["stage"] == "teacher" and recorded["config"]["data.patch_size"] == [4, 8, 8]
    capsys.readouterr()
    data["teacher"]["train"]["optim"]["lr"] = 1e-3
    assert cli.main(["decompose", str(cfg_file(tmp_path, data, "b.yaml")), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "teacher.train.optim.lr: 0.01 -> 0.001" in err and "--reuse" in err
    assert not (out / "student").exists()
