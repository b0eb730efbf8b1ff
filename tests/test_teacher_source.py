"""Bring-your-own foundation model: every ``teacher.source`` kind loaded through a config, the
adapt stage, the teacher input adapter, ``lorkd teacher``, and the errors for bad input.

The foundation model is made here: a tiny MONAI DenseNet (RGB input, 3 outputs) trained a few
steps, saved as a ``.pt`` state dict with a DDP ``module.`` prefix, as safetensors, scripted, and
as a minimal MONAI bundle folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import DenseNet
from safetensors.torch import load_file, save_file

import lorkd
from lorkd import cli
from lorkd.errors import ConfigError
from lorkd.models.teacher import Foundation, InputAdapter

NET_KWARGS = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "init_features": 8, "growth_rate": 4,
              "block_config": [1, 1, 1, 1], "bn_size": 2}
FACTORY = "monai.networks.nets:DenseNet"
DATA = {"synthetic": {"num_tasks": 2, "size": 16, "n_train": 24, "n_val": 12, "n_test": 12}}
STAGE = {"epochs": 1, "batch_size": 12}


def trained_densenet(seed: int = 0) -> DenseNet:
    """The stand-in foundation model: a few SGD steps on random data (weights and BN stats move)."""
    torch.manual_seed(seed)
    net = DenseNet(**NET_KWARGS)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fm")
    net = trained_densenet()
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, root / "fm.pt")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "fm.safetensors"))
    torch.jit.script(net).save(str(root / "fm_script.pt"))
    bundle = root / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": {"_target_": "monai.networks.nets.DenseNet", **NET_KWARGS}}))
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    torch.save(net, root / "original.pt")  # the reference module (read back with weights_only=False)
    return {"pt": root / "fm.pt", "safetensors": root / "fm.safetensors", "script": root / "fm_script.pt",
            "bundle": bundle, "original": root / "original.pt"}


SOURCES = {
    "state_dict": lambda f: {"kind": "state_dict", "path": str(f["pt"]), "factory": FACTORY, "kwargs": NET_KWARGS,
                             "key_map": {"strip_prefix": "module."}},
    "safetensors": lambda f: {"kind": "state_dict", "path": str(f["safetensors"]), "factory": FACTORY,
                              "kwargs": NET_KWARGS},
    "torchscript": lambda f: {"kind": "torchscript", "path": str(f["script"])},
    "monai_bundle": lambda f: {"kind": "monai_bundle", "path": str(f["bundle"])},
}


def load(source: dict) -> torch.nn.Module:
    s = dict(source)
    key_map = s.pop("key_map", {})
    return lorkd.load_foundation(s.pop("kind"), s.pop("path"), **s, **key_map)


# ------------------------------------------------------------------ loading: every kind, exact outputs
@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_kind_loads_the_original_outputs(kind, teacher_files):
    original = torch.load(teacher_files["original"], weights_only=False).eval()
    loaded = load(SOURCES[kind](teacher_files))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), original(x), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_rename_rules_and_a_wrapped_checkpoint(tmp_path, teacher_files):
    state = {k.replace("features.", "body."): v for k, v in torch.load(teacher_files["pt"]).items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = lorkd.load_foundation("state_dict", tmp_path / "ckpt.pth", factory=FACTORY, kwargs=NET_KWARGS,
                                   strip_prefix="module.", rename=[[r"^body\.", "features."]])
    original = torch.load(teacher_files["original"], weights_only=False).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), original(x), atol=1e-6, rtol=0)


def test_key_mismatch_lists_missing_and_unexpected_keys(teacher_files):
    with pytest.raises(ConfigError, match=r"teacher\.source: .*missing keys \(\d+\): features\.conv0\.weight.*"
                                          r"unexpected keys \(\d+\): module\.features\.conv0\.weight.*every "
                                          r"unexpected key starts with 'module\.': set teacher\.source\.key_map: "
                                          r"\{strip_prefix: module\.\}"):
        lorkd.load_foundation("state_dict", teacher_files["pt"], factory=FACTORY, kwargs=NET_KWARGS)
    with pytest.raises(ConfigError, match=r"missing keys .*fix the names with teacher\.source\.key_map"):
        lorkd.load_foundation("state_dict", teacher_files["pt"], factory=FACTORY, kwargs=NET_KWARGS, strip_prefix="module.",
                              rename=[[r"^features\.conv0", "features.first"]])
    small = dict(NET_KWARGS, init_features=4)
    with pytest.raises(ConfigError, match=r"shape mismatches.*factory's teacher\.source\.kwargs") as err:
        lorkd.load_foundation("state_dict", teacher_files["pt"], factory=FACTORY, kwargs=small, strip_prefix="module.")
    assert "strict: false" not in str(err.value)


def test_missing_file_unknown_kind_and_missing_packages(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher\.source\.path: file .*nope\.pt not found"):
        lorkd.load_foundation("state_dict", tmp_path / "nope.pt", factory=FACTORY, kwargs=NET_KWARGS)
    with pytest.raises(ConfigError, match=r"teacher\.source\.kind: 'onnx' is not one of"):
        lorkd.load_foundation("onnx", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match=r"teacher\.source\.path: .*not a MONAI bundle"):
        (tmp_path / "b").mkdir()
        lorkd.load_foundation("monai_bundle", tmp_path / "b")
    for kind in ("torchvision", "timm"):
        try:
            __import__(kind)
        except ImportError:
            with pytest.raises(ConfigError, match=rf"needs the {kind} package, which is not installed"):
                lorkd.load_foundation(kind, tmp_path / "w.pth", name="resnet18")


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_torchvision_and_timm_models_with_local_weights(kind, tmp_path):
    package = pytest.importorskip(kind)  # optional packages: this runs where they are installed
    torch.manual_seed(0)
    model = (package.models.get_model("resnet18", weights=None) if kind == "torchvision"
             else package.create_model("resnet18", pretrained=False)).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = lorkd.load_foundation(kind, tmp_path / "w.pth", name="resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=rf"teacher\.source\.name: {kind} cannot build 'no_such_net'"):
        lorkd.load_foundation(kind, tmp_path / "w.pth", name="no_such_net")


# ------------------------------------------------------------------ the wrapper and the input adapter
def test_foundation_maps_outputs_and_fits_heads_on_a_named_layer():
    net = trained_densenet()
    adapter = InputAdapter(2, size=32, channels="repeat", in_channels=3)
    x, ids = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 1, 0, 1, 0])
    teacher = Foundation(net, [2, 3], x, heads={1: [0, 3]}, features="features.denseblock4", input_adapter=adapter,
                         task_names=["a", "b"])
    assert teacher.feature_root is net and teacher.fitted_tasks == [0] and teacher.feature_dim > 0
    out = teacher(x, ids)
    with torch.no_grad():
        expected = net(torch.nn.functional.interpolate(x.repeat(1, 3, 1, 1), size=[32, 32], mode="bilinear",
                                                       align_corners=False))
    assert torch.allclose(out.logits[1], expected[ids == 1], atol=1e-6)
    assert out.logits[0].shape == (3, 2) and out.features.shape == (6, teacher.feature_dim)
    with pytest.raises(ConfigError, match=r"teacher\.features: no layer named 'features\.denseblok4'.*did you mean "
                                          r"'features\.denseblock4'"):
        Foundation(net, [2, 3], x, features="features.denseblok4", input_adapter=adapter)
    with pytest.raises(ConfigError, match=r"teacher\.heads\.b: \[0, 2\] gives shape \[6, 2\].*3 classes"):
        Foundation(net, [2, 3], x, heads={1: [0, 2]}, input_adapter=adapter, task_names=["a", "b"])


class TwoOutputs(torch.nn.Module):
    """A model with two outputs (a tuple), as multi-head foundation models often have."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.a, self.b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 5)

    def forward(self, x):
        f = self.body(x)
        return self.a(f), self.b(f)


def test_heads_by_output_index_and_by_layer_name():
    torch.manual_seed(0)
    net, x = TwoOutputs().eval(), torch.randn(4, 1, 8, 8)
    teacher = Foundation(net, [2, 5, 5], x, heads={0: 0, 1: "b", 2: 1}, task_names=["a", "b", "b5"])
    out = teacher(x, torch.tensor([0, 2, 1, 2]))
    a, b = net(x)
    assert torch.equal(out.logits[0], a[[0]]) and torch.equal(out.logits[2], b[[1, 3]])
    assert torch.equal(out.logits[1], b[[2]]) and teacher.fitted_tasks == []
    with pytest.raises(ConfigError, match=r"teacher\.heads\.b3: 'b' gives shape \[4, 5\].*3 classes"):
        Foundation(net, [2, 3], x, heads={1: "b"}, task_names=["a", "b3"])
    with pytest.raises(ConfigError, match=r"teacher\.heads\.a: output index 2 is out of range: the teacher returns 2"):
        Foundation(net, [2], x, heads={0: 2}, task_names=["a"])


def test_head_indices_are_checked_against_the_output_width():
    torch.manual_seed(0)
    two = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2)).eval()  # one output of width 2
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"teacher\.heads\.a: \[start, stop\] = \[0, 3\] is out of range: the "
                                          r"teacher's output has 2 channels"):
        Foundation(two, [2], x, heads={0: [0, 3]}, task_names=["a"])  # a slice past the width gives only 2
    with pytest.raises(ConfigError, match=r"teacher\.heads\.a: \[start, stop\] = \[-2, 2\] is out of range.*"
                                          r"negative indices are not accepted"):
        Foundation(two, [2], x, heads={0: [-2, 2]}, task_names=["a"])
    with pytest.raises(ConfigError, match=r"teacher\.heads\.a: \[start, stop\] = \[1, 1\] is out of range"):
        Foundation(two, [2], x, heads={0: [1, 1]}, task_names=["a"])
    with pytest.raises(ConfigError, match=r"teacher\.heads\.a: give an output index, \[start, stop\] \(two integers\)"):
        Foundation(two, [2], x, heads={0: [0, 1, 2]}, task_names=["a"])
    with pytest.raises(ConfigError, match=r"teacher\.heads\.b: output index -1 is out of range: the teacher returns 2 "
                                          r"outputs \(indices 0\.\.1; negative indices are not accepted\)"):
        Foundation(TwoOutputs().eval(), [2, 5], x, heads={1: -1}, task_names=["a", "b"])
    teacher = Foundation(two, [2], x, heads={0: [0, 2]}, task_names=["a"])  # the whole width is fine
    assert torch.equal(teacher(x, torch.zeros(4, dtype=torch.long)).logits[0], two(x))


def test_torchscript_module_that_rejects_the_input_shape_is_a_config_error(teacher_files):
    scripted = torch.jit.load(str(teacher_files["script"]))
    with pytest.raises(ConfigError, match=r"teacher: the teacher .* rejects an input of shape \[2, 1, 16, 16\].*"
                                          r"teacher\.input"):
        Foundation(scripted, [2], torch.randn(2, 1, 16, 16))


@pytest.mark.parametrize("dims", [2, 3])
def test_input_adapter_channels_size_and_normalisation(dims):
    x = torch.rand(2, 1, *([6] * dims))
    rep = InputAdapter(dims, size=8, channels="repeat", in_channels=3, mean=[0.1, 0.2, 0.3], std=0.5,
                       data_mean=0.5, data_std=0.5)
    y = rep(x)
    assert y.shape == (2, 3, *([8] * dims))
    raw = torch.nn.functional.interpolate(x * 0.5 + 0.5, size=[8] * dims,
                                          mode=("bilinear", "trilinear")[dims - 2], align_corners=False)
    assert torch.allclose(y[:, 2:3], (raw - 0.3) / 0.5, atol=1e-6)
    size_only = InputAdapter(dims, size=8, data_mean=0.5, data_std=0.5)  # intensities as the recipe gives them
    assert torch.allclose(size_only(x * 2 - 1), torch.nn.functional.interpolate(
        x * 2 - 1, size=[8] * dims, mode=("bilinear", "trilinear")[dims - 2], align_corners=False), atol=1e-6)
    rgb = torch.rand(2, 3, *([4] * dims))
    assert torch.allclose(InputAdapter(dims, channels="average", in_channels=1)(rgb), rgb.mean(1, keepdim=True))
    with pytest.raises(ConfigError, match=r"teacher\.input\.channels: the teacher takes 3 channels, the data has 1"):
        InputAdapter(dims, in_channels=3)(x)
    with pytest.raises(ConfigError, match=r"teacher\.input\.std: give one number or 3"):
        InputAdapter(dims, channels="repeat", in_channels=3, std=[0.2, 0.2])


# ------------------------------------------------------------------ through a config, end to end
def write_config(tmp_path: Path, teacher: dict, name: str = "cfg.yaml", **extra) -> Path:
    """A tiny classification config on the synthetic tasks; ``extra`` replaces top-level sections."""
    cfg = {"data": DATA, "teacher": teacher, "evaluate": {"latency_repeats": 1},
           "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": STAGE}, **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def foundation_teacher(source: dict, **extra) -> dict:
    return {"source": source, "features": "features.denseblock4", "heads": {"synth_xray": [0, 3]},
            "input": {"size": 32, "channels": "repeat"}, "adapt": {"mode": "heads", **STAGE}, **extra}


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def backbone_state(folder: Path) -> dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v for k, v in load_file(str(folder / "model.safetensors")).items()
            if k.startswith("backbone.")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "monai_bundle"])
def test_run_end_to_end_with_each_kind_and_heads_adaptation(kind, tmp_path, teacher_files, capsys):
    # a TorchScript module offers only its outputs: the fitted head reads its logits
    extra = {"features": None} if kind == "torchscript" else {}
    student = {"net": {"arch": "resnet10", "widen": 0.125}, "train": STAGE, "distill": {"feat_weight": 0.5}}
    cfg = write_config(tmp_path, foundation_teacher(SOURCES[kind](teacher_files), **extra), student=student)
    out = tmp_path / "run"
    assert run_cli("run", cfg, "--out", out, "--no-progress") == 0
    original = torch.load(teacher_files["original"], weights_only=False).state_dict()
    saved = backbone_state(out / "teacher")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original)
    assert (out / "teacher" / "checkpoints" / "best.pt").is_file() and (out / "teacher" / "history.csv").is_file()
    meta = json.loads((out / "teacher" / "model.json").read_text())
    info = meta["teacher_info"]
    assert info["source"]["kind"] == kind and info["adapt"]["mode"] == "heads" and info["adapt"]["epochs"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"]["teacher"].startswith(f"foundation model loaded from {kind}")
    assert "linear probe" in metrics["teacher"]["description"]
    report = (out / "report.md").read_text()
    assert "trained on all tasks" not in report and str(SOURCES[kind](teacher_files)["path"]) in report
    assert "feat" in (out / "student" / "history.csv").read_text().splitlines()[0].split(",")
    assert 0.0 <= metrics["tasks"]["synth_xray"]["teacher"]["acc"] <= 1.0
    capsys.readouterr()


@pytest.mark.slow
def test_finetune_changes_the_backbone_and_a_rerun_reuses_the_adapted_teacher(tmp_path, teacher_files):
    teacher = foundation_teacher(SOURCES["state_dict"](teacher_files), adapt={"mode": "finetune", **STAGE})
    cfg = write_config(tmp_path, teacher)
    out = tmp_path / "run"
    assert run_cli("pretrain", cfg, "--out", out, "--no-progress") == 0
    original = torch.load(teacher_files["original"], weights_only=False).state_dict()
    saved = backbone_state(out / "teacher")
    changed = [k for k in original if original[k].is_floating_point() and not torch.equal(saved[k], original[k])]
    assert "features.conv0.weight" in changed
    # the stage resumes from its checkpoint like every stage: same weights, no second training
    first = load_file(str(out / "teacher" / "model.safetensors"))
    history = (out / "teacher" / "history.csv").read_text()
    (out / "teacher" / "model.safetensors").unlink()
    assert run_cli("pretrain", cfg, "--out", out, "--resume", "--no-progress") == 0
    again = load_file(str(out / "teacher" / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert (out / "teacher" / "history.csv").read_text() == history
    # a second run reads the adapted teacher through kind: lorkd; the report says where it came from
    cfg2 = write_config(tmp_path, {"source": {"kind": "lorkd", "path": str(out / "teacher")}}, "cfg2.yaml")
    assert run_cli("run", cfg2, "--out", tmp_path / "r2", "--no-progress") == 0
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    description = metrics["teacher"]["description"]
    assert description.startswith(f"teacher reused from {out / 'teacher'}: foundation model loaded")
    assert "fine-tuned" in description and "fine-tuned" in (tmp_path / "r2" / "report.md").read_text()


@pytest.mark.slow
def test_segmentation_with_a_state_dict_teacher_and_a_named_decoder_layer(tmp_path):
    from test_segmentation import tiny_config, write_h5_task

    from monai.networks.nets import UNet

    torch.manual_seed(0)
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 8], strides=[2], num_res_units=0)
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    root = write_h5_task(tmp_path / "h5", shape=(8, 16, 16), classes=3, patients=4, frames=1)
    teacher = {"source": {"kind": "state_dict", "path": str(tmp_path / "unet.pt"), "factory": "monai.networks.nets:UNet",
                          "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
                                     "strides": [2], "num_res_units": 0}},
               "features": "model.1.submodule", "adapt": {"mode": "heads", "epochs": 1, "batch_size": 4}}
    cfg = tiny_config([{"name": "heart", "path": str(root)}], [8, 16, 16], evaluate={"latency_repeats": 1, "hd95": False})
    cfg["teacher"] = teacher
    cfg["student"]["distill"] = {"feat_weight": 0.5}  # feature KD from the named teacher layer (resized map)
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli("teacher", path) == 0
    assert run_cli("run", path, "--out", tmp_path / "run", "--no-progress") == 0
    saved = backbone_state(tmp_path / "run" / "teacher")
    assert all(torch.equal(saved[k], v) for k, v in unet.state_dict().items())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["tasks"]["heart"]["teacher"]["dice"] <= 1.0
    assert "feat" in (tmp_path / "run" / "student" / "history.csv").read_text().splitlines()[0].split(",")


def test_lorkd_teacher_prints_source_layers_and_shapes(tmp_path, teacher_files, capsys):
    cfg = write_config(tmp_path, foundation_teacher(SOURCES["monai_bundle"](teacher_files)))
    assert run_cli("teacher", cfg) == 0
    text = capsys.readouterr().out
    assert f"source: monai_bundle {teacher_files['bundle']}" in text and "adapt: heads (1 epochs)" in text
    assert "synth_xray (3 classes): its output [0, 3] -> logits [2, 3]" in text
    assert "synth_ultrasound (2 classes): head -> logits [2, 2]" in text
    assert "features.denseblock4  _DenseBlock  [4, " in text and "sample batch: [4, 1, 16, 16]" in text


def test_lorkd_teacher_on_a_torchscript_source_shows_its_outputs_without_hooks(tmp_path, teacher_files, capsys):
    cfg = write_config(tmp_path, foundation_teacher(SOURCES["torchscript"](teacher_files), features=None))
    assert run_cli("teacher", cfg) == 0
    text = capsys.readouterr().out
    assert f"source: torchscript {teacher_files['script']}" in text and "features: the output -> [4, 3]" in text
    assert "synth_xray (3 classes): its output [0, 3] -> logits [2, 3]" in text
    assert "layers: none usable (a TorchScript model offers only its outputs" in text


def test_lorkd_teacher_without_a_source_shows_the_network_lorkd_would_train(tmp_path, capsys):
    cfg = write_config(tmp_path, {"net": {"arch": "resnet10", "widen": 0.25}})
    assert run_cli("teacher", cfg) == 0
    text = capsys.readouterr().out
    assert "source: none: `lorkd run` trains teacher.net (resnet10)" in text and "  backbone.layer1  Sequential  [4, " in text


# ------------------------------------------------------------------ bad input: one clear error, before training
BAD = {
    "missing file": (lambda f: foundation_teacher({**SOURCES["state_dict"](f), "path": "/nonexistent/fm.pt"}),
                     r"teacher\.source\.path: file /nonexistent/fm\.pt not found"),
    "unknown kind": (lambda f: foundation_teacher({"kind": "onnx", "path": "x.onnx"}),
                     r"teacher\.source\.kind: 'onnx' is not one of"),
    "key mismatch": (lambda f: foundation_teacher({**SOURCES["state_dict"](f), "key_map": {}}),
                     r"teacher\.source: the weights of .* missing keys .* unexpected keys \(\d+\): module\."),
    "no such layer": (lambda f: foundation_teacher(SOURCES["state_dict"](f), features="features.denseblok4"),
                      r"teacher\.features: no layer named 'features\.denseblok4'.*did you mean"),
    "rejected shape": (lambda f: foundation_teacher(SOURCES["torchscript"](f), input=None, features=None),
                       r"teacher: the teacher .* rejects an input of shape \[4, 1, 16, 16\]"),
    "script layer": (lambda f: foundation_teacher(SOURCES["torchscript"](f)),
                     r"teacher\.features / teacher\.heads: cannot read layer 'features\.denseblock4'"),
    "unknown task": (lambda f: foundation_teacher(SOURCES["state_dict"](f), heads={"synth_ct": 0}),
                     r"teacher\.heads\.synth_ct: no task named 'synth_ct'"),
    "nothing to fit": (lambda f: foundation_teacher(SOURCES["state_dict"](f), features=None,
                                                    adapt={"mode": "none"}),
                       r"teacher\.adapt\.mode: none, but tasks \['synth_ultrasound'\] have no output"),
    "heads without a source": (lambda f: {"heads": {"synth_xray": 0}}, r"teacher\.heads: only for a loaded"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_teacher_config_fails_before_training_naming_the_key(case, tmp_path, teacher_files, capsys):
    make, pattern = BAD[case]
    cfg = write_config(tmp_path, make(teacher_files))
    assert run_cli("pretrain", cfg, "--out", tmp_path / "run", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "run" / "teacher" / "checkpoints").exists()


def test_old_teacher_checkpoint_key_is_an_alias_of_a_lorkd_source(tmp_path):
    from lorkd.config import from_dict
    from lorkd.pipelines.schema import ClassificationConfig

    cfg = from_dict(ClassificationConfig, {"data": DATA, "teacher": {"checkpoint": "runs/a/teacher"}})
    assert cfg.teacher.source.kind == "lorkd" and cfg.teacher.source.path == "runs/a/teacher"
    assert cfg.teacher.checkpoint is None


@pytest.mark.slow
def test_a_lorkd_teacher_trained_on_more_tasks_is_seen_through_the_runs_tasks(tmp_path, capsys):
    own = {"net": {"arch": "resnet10", "widen": 0.125}, "train": STAGE}
    three = {**DATA, "synthetic": {**DATA["synthetic"], "num_tasks": 3}}
    found = tmp_path / "foundation"
    assert run_cli("pretrain", write_config(tmp_path, own, "f.yaml", data=three), "--out", found, "--no-progress") == 0
    source = {"source": {"kind": "lorkd", "path": str(found / "teacher")}}
    one_channel = write_config(tmp_path, source, "c.yaml")
    assert run_cli("run", one_channel, "--out", tmp_path / "c", "--no-progress") == 2  # the folder's input has 3
    assert "3-channel input" in capsys.readouterr().err
    cfg = write_config(tmp_path, source, "r.yaml", data={**DATA, "channels": 3})
    assert run_cli("run", cfg, "--out", tmp_path / "r", "--no-progress") == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert sorted(metrics["tasks"]) == sorted(json.loads((found / "teacher" / "model.json").read_text())["tasks"][:2])
    # fine-tuned whole on the run's tasks: the run's two heads and the backbone move, the third head does not
    tuned = write_config(tmp_path, {**source, "adapt": {"mode": "finetune", **STAGE}}, "ft.yaml",
                         data={**DATA, "channels": 3})
    assert run_cli("pretrain", tuned, "--out", tmp_path / "ft", "--no-progress") == 0
    before, after = load_file(str(found / "teacher" / "model.safetensors")), load_file(str(tmp_path / "ft" / "teacher" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    moved = {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert any(k.startswith("heads.0.") for k in moved) and any(k.startswith("backbone.") for k in moved)
    assert not any(k.startswith("heads.2.") for k in moved)
    info = json.loads((tmp_path / "ft" / "teacher" / "model.json").read_text())["teacher_info"]
    assert info["adapt"]["mode"] == "finetune" and "fine-tuned whole on this run's tasks" in info["description"]
    assert run_cli("pretrain", tuned, "--out", tmp_path / "ft", "--resume", "--no-progress") == 0  # reused
    assert load_file(str(tmp_path / "ft" / "teacher" / "model.safetensors")).keys() == after.keys()
    # the other way round: a run task the folder has no head for is refused, naming the file
    two = tmp_path / "two"
    assert run_cli("pretrain", write_config(tmp_path, own, "t.yaml"), "--out", two, "--no-progress") == 0
    bad = write_config(tmp_path, {"source": {"kind": "lorkd", "path": str(two / "teacher")}}, "b.yaml", data=three)
    assert run_cli("run", bad, "--out", tmp_path / "b", "--no-progress") == 2
    assert "are not among them" in capsys.readouterr().err


@pytest.mark.slow
def test_an_ensemble_member_trained_on_more_tasks_is_rebuilt_on_reuse(tmp_path):
    own = {"net": {"arch": "resnet10", "widen": 0.125}, "train": STAGE}
    rgb = {**DATA, "channels": 3}
    found, single = tmp_path / "foundation", tmp_path / "single"
    three = {**rgb, "synthetic": {**DATA["synthetic"], "num_tasks": 3}}
    assert run_cli("pretrain", write_config(tmp_path, own, "f.yaml", data=three), "--out", found, "--no-progress") == 0
    assert run_cli("pretrain", write_config(tmp_path, own, "s.yaml", data=rgb), "--out", single, "--no-progress") == 0
    members = [{"kind": "lorkd", "path": str(found / "teacher"), "label": "foundation"},
               {"kind": "lorkd", "path": str(single / "teacher"), "label": "single"}]
    cfg = write_config(tmp_path, {"source": members}, "e.yaml", data=rgb)
    assert run_cli("pretrain", cfg, "--out", tmp_path / "e", "--no-progress") == 0
    first = load_file(str(tmp_path / "e" / "teacher" / "model.safetensors"))
    assert any(k.startswith("backbone.0.teacher.heads.2.") for k in first)  # the foundation's third head rides along
    assert run_cli("run", cfg, "--out", tmp_path / "e", "--resume", "--no-progress") == 0  # teacher rebuilt and reused
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "ensemble of 2 teachers" in metrics["teacher"]["description"]
