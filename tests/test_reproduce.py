"""benchmarks/reproduce.py: the --dry-run plan (exact commands and folders, nothing run) and the
argument errors. No recipe is run here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
sys.modules["reproduce"] = reproduce  # dataclasses look their module up
spec.loader.exec_module(reproduce)


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("--dry-run ran a command")
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_dry_run_prints_every_run_with_its_seeds_and_folders(tmp_path, capsys, no_subprocess):
    out = tmp_path / "r"
    assert reproduce.main(["--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for run in reproduce.RUNS:
        assert f"## {run.name}:" in text and run.config in text
    found = f"{out}/foundation_medmnist2d"
    assert (f"lorkd pretrain configs/foundation_medmnist2d.yaml --out {found} --set seed=0 --set device=cpu "
            "--no-progress --resume") in text
    assert text.index("lorkd pretrain configs/foundation_medmnist2d.yaml") < text.index("lorkd run configs/medmnist.yaml")
    single = f"{out}/teacher_medmnist2d"
    assert f"lorkd pretrain configs/teacher_medmnist2d.yaml --out {single} --set seed=0" in text
    members = (f"teacher.source=[{{kind: lorkd, path: {found}/teacher, label: foundation}}, "
               f"{{kind: lorkd, path: {single}/teacher, label: single}}]")
    for s in (0, 1, 2):
        assert (f"lorkd run configs/medmnist.yaml --out {out}/medmnist/seed{s} --set seed={s} --set "
                f"'{members}' --set device=cpu") in text
    # a run with one pretrained teacher and no teacher= distils from its folder
    assert (f"lorkd run configs/medmnist_routed.yaml --out {out}/medmnist_routed/seed0 --set seed=0 --set "
            f"teacher.source.path={found}/teacher --set device=cpu") in text
    assert f"lorkd report {out}/medmnist/seed0 {out}/medmnist/seed1 {out}/medmnist/seed2 --out {out}/medmnist/report.md" in text
    assert f"lorkd run configs/transfer_medmnist_foundation.yaml --out {out}/transfer/foundation" in text
    assert (f"lorkd transfer configs/transfer_medmnist.yaml --out {out}/transfer/transfer --set "
            f"foundation.run={out}/transfer/foundation --set 'seeds=[0,1,2]'") in text
    assert "seed1" not in text.split("## cardiac")[1].split("## transfer_la")[0]  # cardiac: one seed
    assert not out.exists()


def test_only_seeds_and_device(tmp_path, capsys, no_subprocess):
    out = tmp_path / "r"
    assert reproduce.main(["--dry-run", "--out", str(out), "--only", "medmnist3d", "--only", "transfer",
                           "--seeds", "4,5", "--device", "cuda"]) == 0
    text = capsys.readouterr().out
    assert "## medmnist3d" in text and "## transfer" in text and "## medmnist:" not in text and "## cardiac" not in text
    assert f"--out {out}/medmnist3d/seed5 --set seed=5 --set device=cuda" in text and "seed0" not in text
    assert "'seeds=[4,5]'" in text and "--set device=cpu" not in text
    cmds = [line for line in text.splitlines() if line.startswith("lorkd ")]
    assert len(cmds) == 2 + 1 + 3  # medmnist3d: 2 seeds + report; transfer: foundation, transfer, report
    assert all(f"# -> {out}/" in line for line in cmds)


@pytest.mark.parametrize("argv, message", [
    (["--only", "nope", "--only", "medmnist"], "unknown --only nope; the runs are: medmnist, medmnist_routed, select_random"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--seeds", "0,x"], "--seeds: integers separated by commas"),
    (["--seeds", "1,1"], "--seeds: distinct integers"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_argument_errors(argv, message, capsys, no_subprocess):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--dry-run", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
