"""Saving and loading students and exported experts."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import resnet18
from safetensors.torch import load_file

import lorkd
from lorkd.errors import DataError

from test_experts_layers import randomise_experts

ARCH = {"factory": "monai.networks.nets.resnet18", "kwargs": {"spatial_dims": 2, "n_input_channels": 1, "num_classes": 3}}


def make_student(norm="per_task"):
    torch.manual_seed(0)
    student = lorkd.add_experts(lorkd.build_architecture(ARCH), 2, rank={"layer4*": 8, "*": 4}, norm=norm)
    return randomise_experts(student, std=0.05).eval()


def test_student_round_trip_rebuilds_from_the_saved_architecture(tmp_path):
    student = make_student()
    lorkd.save_student(student, tmp_path / "s", architecture=ARCH)
    meta = json.loads((tmp_path / "s" / "student.json").read_text())
    assert meta["config"]["norm"] == "per_task" and meta["layers"]["layer4.0.conv1"] == 8
    loaded = lorkd.load_student(tmp_path / "s").eval()
    x, ids = torch.randn(3, 1, 32, 32), torch.tensor([1, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, ids), student(x, ids))
    assert loaded.config.rank == {"layer4*": 8, "*": 4}


def test_student_loads_into_a_given_model(tmp_path):
    student = make_student(norm="shared")
    lorkd.save_student(student, tmp_path)
    loaded = lorkd.load_student(tmp_path, model=resnet18(spatial_dims=2, n_input_channels=1, num_classes=3)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 1), student(x, 1))



def test_a_student_saved_with_a_layout_of_an_earlier_lorkd_is_refused_naming_the_file(tmp_path):
    lorkd.save_student(make_student(), tmp_path, architecture=ARCH)
    meta = json.loads((tmp_path / "student.json").read_text())
    meta["config"]["layout"] = "fused"
    (tmp_path / "student.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"student.json: config.layout 'fused' is not one of"):
        lorkd.load_student(tmp_path)

def test_expert_is_a_plain_state_dict_that_needs_no_lorkd(tmp_path):
    student = make_student()
    expert = student.extract(1).eval()
    lorkd.save_expert(expert, tmp_path / "e", architecture=ARCH, card={"task": "b"})
    state = load_file(str(tmp_path / "e" / "expert.safetensors"))
    plain = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3)
    plain.load_state_dict(state, strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), student(x, 1), rtol=1e-5, atol=1e-5)
    again = lorkd.load_expert(tmp_path / "e").eval()
    assert again.card["task"] == "b" and again.card["parameters"] == sum(p.numel() for p in plain.parameters())


def test_missing_corrupt_and_mismatched_files_are_reported(tmp_path):
    with pytest.raises(DataError, match="student.json: file not found"):
        lorkd.load_student(tmp_path)
    student = make_student()
    lorkd.save_student(student, tmp_path, architecture=ARCH)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match="weights.safetensors: not a readable safetensors file"):
        lorkd.load_student(tmp_path)
    (tmp_path / "student.json").write_text("{not json")
    with pytest.raises(DataError, match="student.json: not valid JSON"):
        lorkd.load_student(tmp_path)
    lorkd.save_expert(student.extract(0), tmp_path / "e", architecture=ARCH)
    other = {"factory": "monai.networks.nets.resnet18", "kwargs": {"spatial_dims": 2, "n_input_channels": 1, "num_classes": 7}}
    with pytest.raises(DataError, match="do not fit the architecture"):
        lorkd.load_expert(tmp_path / "e", model=lorkd.build_architecture(other))
    with pytest.raises(DataError, match="cannot be imported"):
        lorkd.build_architecture({"factory": "monai.networks.nets.no_such_net"})
