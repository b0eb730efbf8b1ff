"""Checkpoint files, RNG state and run folders (lorkd.engine.checkpoint)."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from lorkd.engine.checkpoint import (
    RUN_MARKER, CheckpointManager, capture_rng_state, load_checkpoint, prepare_run_dir, restore_rng_state,
    save_checkpoint,
)
from lorkd.errors import ConfigError, DataError


def _state():
    return {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "history": [{"loss": 0.5}], "best": None}


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "c.pt", _state())
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], torch.arange(6.0).view(2, 3))
    assert back["epoch"] == 3 and back["history"] == [{"loss": 0.5}] and back["best"] is None
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left


def test_missing_truncated_and_corrupt_files_raise_data_error_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    good = save_checkpoint(tmp_path / "good.pt", _state())
    data = good.read_bytes()
    for name, content in [("trunc.pt", data[: len(data) // 2]), ("empty.pt", b""),
                          ("junk.pt", bytes(range(256)) * 8), ("text.pt", b"not a checkpoint\n")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=name):
            load_checkpoint(tmp_path / name)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(DataError, match="list.pt"):
        load_checkpoint(tmp_path / "list.pt")


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "latest.pt", _state())
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)
        with open(f, "r+b") as fh:  # leave a half-written file behind, then fail
            fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 99})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_checkpoint_manager(tmp_path):
    m = CheckpointManager(tmp_path / "ck")
    assert not m.has_latest()
    m.save_latest({"step": 1})
    m.save_best({"step": 0})
    assert m.has_latest() and m.latest_path.name == "latest.pt" and m.best_path.name == "best.pt"
    assert m.load_latest()["step"] == 1 and load_checkpoint(m.best_path)["step"] == 0


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # has_gauss path
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    first = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    assert first == again
    with pytest.raises(DataError):
        restore_rng_state({"python": None})


def test_prepare_run_dir_new_and_empty(tmp_path):
    run = prepare_run_dir(tmp_path / "a" / "run")
    assert run.is_dir() and (run / RUN_MARKER).is_file()
    assert prepare_run_dir(run) == run  # only the marker: still counts as empty


def test_prepare_run_dir_refuses_a_used_folder(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    (run / "history.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"another run's output.*--overwrite.*--resume"):
        prepare_run_dir(run)
    with pytest.raises(ConfigError, match="not both"):
        prepare_run_dir(run, overwrite=True, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_run_dir(tmp_path / "file")


def test_prepare_run_dir_resume_keeps_everything(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest.pt").write_text("x")
    assert prepare_run_dir(run, resume=True) == run
    assert (run / "checkpoints" / "latest.pt").read_text() == "x"


def test_prepare_run_dir_overwrite_with_marker_clears_the_folder(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest.pt").write_text("x")
    (run / "notes.txt").write_text("mine")  # inside a folder lorkd created: goes too
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [RUN_MARKER]


def test_prepare_run_dir_overwrite_without_marker_keeps_foreign_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").write_text("x")
    (run / "history.csv").write_text("x")
    (run / "thesis.tex").write_text("precious")
    with pytest.warns(UserWarning, match="thesis.tex"):
        prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["thesis.tex"]  # no marker: a later overwrite stays careful
    assert (run / "thesis.tex").read_text() == "precious"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_run_dir(run, overwrite=True)
    assert (run / "thesis.tex").read_text() == "precious"
