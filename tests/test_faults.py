"""Bad input through the command line: a one-line message naming the file and field, exit
code 2, no traceback, and the outputs of an earlier run left exactly as they were."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorkd import cli

from test_cli import TINY


def good_arrays(n=24, classes=2, shape=(16, 16)):
    rng = np.random.default_rng(0)
    data = {}
    for split in ("train", "val", "test"):
        data[f"{split}_images"] = rng.integers(0, 255, (n, *shape), dtype=np.uint8)
        data[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
    return data


def corrupt(kind: str, path: Path) -> str:
    """Write a bad ``.npz`` of the given kind; return a fragment the error message must hold."""
    data = good_arrays()
    if kind == "truncated":
        np.savez(path, **data)
        path.write_bytes(path.read_bytes()[:300])
        return "breast.npz"
    if kind == "missing_key":
        del data["val_labels"]
    elif kind == "label_out_of_range":
        data["test_labels"][3] = 7
    elif kind == "length_mismatch":
        data["train_labels"] = data["train_labels"][:-2]
    elif kind == "empty_split":
        data["val_images"], data["val_labels"] = data["val_images"][:0], data["val_labels"][:0]
    elif kind == "bad_shape":
        data["train_images"] = data["train_images"][:, :, :, None, None]
    np.savez(path, **data)
    return {"missing_key": "val_labels", "label_out_of_range": "7", "length_mismatch": "train",
            "empty_split": "val", "bad_shape": "train_images"}[kind]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    np.savez(root / "breast.npz", **good_arrays())
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**{k: v for k, v in TINY.items() if k != "data"},
                                   "data": {"tasks": [{"name": "breast", "path": str(root / "breast.npz"), "num_classes": 2}]}}))
    assert cli.main(["run", str(cfg), "--out", str(root / "out"), "--no-progress"]) == 0
    return root


@pytest.mark.parametrize("kind", ["truncated", "missing_key", "label_out_of_range", "length_mismatch",
                                  "empty_split", "bad_shape"])
def test_bad_input_file_is_reported_and_earlier_output_is_intact(finished_run, kind, capsys):
    before = digest(finished_run / "out")
    bad = finished_run / "bad" / "breast.npz"
    bad.parent.mkdir(exist_ok=True)
    fragment = corrupt(kind, bad)
    cfg = finished_run / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**{k: v for k, v in TINY.items() if k != "data"},
                                   "data": {"tasks": [{"name": "breast", "path": str(bad), "num_classes": 2}]}}))
    # continuing the finished run with the bad data: refused before anything is written
    assert cli.main(["run", str(cfg), "--out", str(finished_run / "out"), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorkd: error:") and str(bad.name) in err and fragment in err, err
    assert "Traceback" not in err
    assert digest(finished_run / "out") == before


def test_corrupt_checkpoint_is_reported_by_resume(finished_run, capsys):
    out = finished_run / "out2"
    cfg = finished_run / "cfg.yaml"
    assert cli.main(["pretrain", str(cfg), "--out", str(out), "--no-progress"]) == 0
    (out / "teacher" / "model.safetensors").unlink()  # the stage is unfinished: resume reads latest.pt
    latest = out / "teacher" / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:64])
    assert cli.main(["pretrain", str(cfg), "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "latest.pt" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.distributed
def test_run_under_torchrun_with_two_processes(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "baselines": {"run": ["mtl"]}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "lorkd.cli", "run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "out" / "report.md").is_file()
    assert proc.stdout.count("report:") == 1  # rank 0 alone writes


def test_reused_teacher_must_fit_the_data(finished_run, capsys):
    more = good_arrays(classes=3)
    np.savez(finished_run / "three.npz", **more)
    cfg = finished_run / "three.yaml"
    cfg.write_text(yaml.safe_dump({**{k: v for k, v in TINY.items() if k != "data"},
                                   "data": {"tasks": [{"name": "breast", "path": str(finished_run / "three.npz")}]},
                                   "teacher": {"source": {"kind": "lorkd", "path": str(finished_run / "out" / "teacher")}}}))
    assert cli.main(["run", str(cfg), "--out", str(finished_run / "out3"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "teacher/model.json" in err and "classes [2]" in err and "[3]" in err
