"""Safety of loading (issue 12.6): weights-only checkpoints, architecture factories limited to
known namespaces unless the user trusts the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lorkd import cli
from lorkd.engine.checkpoint import load_checkpoint, save_checkpoint
from lorkd.errors import DataError
from lorkd.experts import build_architecture, load_expert, save_expert
from lorkd.factories import is_allowed, trusted_code

SRC = Path(__file__).parents[1] / "src"


class Payload:
    """Stands for any object a pickle could smuggle into a checkpoint."""


def test_every_torch_load_in_the_code_base_is_weights_only():
    calls = [(p, m) for p in SRC.rglob("*.py") for m in re.finditer(r"torch\.load\(([^)]*)\)", p.read_text())]
    assert calls, "expected at least the checkpoint loader"
    assert all("weights_only=True" in m.group(1) for _, m in calls), [str(p) for p, m in calls]


def test_checkpoint_with_a_pickled_object_is_refused_by_name(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", {"model": {"w": torch.ones(2)}, "history": [{"epoch": 0, "loss": 1.5}],
                                         "rng": {"python": (3, tuple(range(4)), None)}})
    assert load_checkpoint(tmp_path / "ok.pt")["history"][0]["loss"] == 1.5
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match=r"evil\.pt.*weights_only=True.*Payload"):
        load_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("name, allowed", [
    ("monai.networks.nets.UNet", True), ("monai.networks.utils.save_state", False), ("lorkd.models.classifier.plain_classifier", True),
    ("torchvision.models.resnet18", True), ("timm.create_model", True), ("timm.models.resnet.resnet18", True),
    ("torch.nn.Linear", False), ("os.system", False), ("lorkd.fileio.write_json", False),
    ("monai.networksX.evil", False), ("builtins.eval", False)])
def test_known_namespaces(name, allowed):
    assert is_allowed(name) is allowed


def test_foreign_factory_needs_trust_code(tmp_path):
    spec = {"factory": "torch.nn.Linear", "kwargs": {"in_features": 2, "out_features": 3}}
    with pytest.raises(DataError, match="torch.nn.Linear.*outside the known namespaces.*trust_code"):
        build_architecture(spec)
    with trusted_code():
        assert isinstance(build_architecture(spec), nn.Linear)
    with trusted_code(False):  # trust is not switched on by a nested False, nor left on after the block
        with pytest.raises(DataError):
            build_architecture(spec)
    folder = save_expert(nn.Linear(2, 3), tmp_path / "expert", architecture=spec)
    with pytest.raises(DataError, match=r"expert/card\.json: factory 'torch.nn.Linear'"):
        load_expert(folder)
    with trusted_code(True):
        assert load_expert(folder).out_features == 3


def test_trust_code_is_a_config_key_and_a_cli_flag(tmp_path):
    from test_cli import TINY
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "trust_code": True}))
    assert cli.load_recipe(path, []).trust_code is True
    args = cli.build_parser().parse_args(["run", str(path), "--out", "x", "--trust-code", "--reuse"])
    assert args.trust_code and args.reuse
    assert cli.build_parser().parse_args(["predict", "e", "a.png", "--trust-code"]).trust_code


def test_model_json_factory_is_checked_before_anything_is_called(tmp_path, monkeypatch):
    from lorkd.fileio import write_json
    from lorkd.pipelines.core.netio import load_network
    from lorkd.pipelines.recipes.classification import ClassificationRecipe

    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "teacher" / "model.json", {"num_classes": [2], "backbone": {
        "factory": "os.system", "kwargs": {"command": "touch pwned"}}})
    with pytest.raises(DataError, match=r"teacher/model\.json: .*'os\.system' is outside the known namespaces"):
        load_network(tmp_path / "teacher", ClassificationRecipe.build)
    assert not (tmp_path / "pwned").exists()
