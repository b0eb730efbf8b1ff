"""``lorkd transfer`` with any foundation model (``foundation.source``, the ``teacher.source``
schema) and the experts of a lorkd run: end to end, the frozen foundation bit-identical, errors.

The foundation model is a tiny MONAI DenseNet (RGB, 32 px) trained a few steps and saved as a
``.pt`` state dict with a DDP ``module.`` prefix (as in test_teacher_source.py); the experts come
from a tiny ``lorkd run`` on 1-channel 12 px images, so the teacher input adapter (repeat to 3
channels, resize to 32) is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lorkd import cli, load_expert
from lorkd.config import from_dict
from lorkd.engine.distributed import DistributedContext
from lorkd.engine.metrics import count_parameters
from lorkd.errors import ConfigError
from lorkd.pipelines.recipes.transfer import TransferRun
from lorkd.pipelines.recipes.transfer_foundation import FoundationFeatures
from lorkd.pipelines.schema import TransferConfig
from test_teacher_source import FACTORY, NET_KWARGS, trained_densenet
from test_transfer import STAGE, make_foundation_run, write_npz

LAYER = "features.denseblock4"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fmsrc")
    net = trained_densenet()
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, root / "fm.pt")
    run = make_foundation_run(root / "lorkd", (12, 12))
    return {"weights": root / "fm.pt", "run": run, "down": write_npz(root / "down.npz", (12, 12), classes=3, seed=4)}


def source_section(parts: dict[str, Path], **extra) -> dict:
    return {"source": {"kind": "state_dict", "path": str(parts["weights"]), "factory": FACTORY, "kwargs": NET_KWARGS,
                       "key_map": {"strip_prefix": "module."}},
            "features": LAYER, "input": {"size": 32, "channels": "repeat", "mean": 0.0, "std": 1.0},  # [0, 1] in
            "experts": str(parts["run"] / "experts"),
            **extra}


def config(parts: dict[str, Path], foundation: dict | None = None, **extra) -> dict:
    return {"foundation": foundation or source_section(parts), "data": {"tasks": [{"name": "down", "path": str(parts["down"])}]},
            "train": STAGE, "bootstrap": 20, "rd": {"pairs": [["layer4", "features.denseblock3"]]}, **extra}


def make_run(parts: dict[str, Path], out: Path, foundation: dict | None = None, **extra) -> TransferRun:
    cfg = from_dict(TransferConfig, config(parts, foundation, **extra))
    out.mkdir(parents=True, exist_ok=True)
    return TransferRun(cfg, out, DistributedContext.from_env(torch.device("cpu")), progress=False)


def test_source_foundation_is_the_loaded_model_behind_the_input_adapter(parts, tmp_path):
    run = make_run(parts, tmp_path / "out", methods=["foundation_lp"])
    f = run.foundation
    assert isinstance(f.backbone, FoundationFeatures) and f.backbone_spec is None
    assert (f.channels, f.spatial_dims, f.size, f.tasks) == (1, 2, None, ["ta", "tb"])
    assert set(f.experts) == {"ta", "tb"} and "state_dict" in f.source and LAYER in f.source
    net = trained_densenet().eval()
    x = torch.randn(3, 1, 12, 12)
    kept = {}
    handle = dict(net.named_modules())[LAYER].register_forward_hook(lambda m, i, o: kept.update(out=o))
    with torch.no_grad():  # the data's normalisation undone, gray repeated to RGB, resized to 32 px
        net(torch.nn.functional.interpolate((x * 0.5 + 0.5).repeat(1, 3, 1, 1), size=[32, 32], mode="bilinear",
                                            align_corners=False))
        feats = f.backbone.eval()(x)
    handle.remove()
    assert f.feature_dim == kept["out"].shape[1]
    assert torch.allclose(feats, kept["out"].mean((2, 3)), atol=1e-6)
    # a deep copy runs on its own (its hook lives only during the call)
    copy = __import__("copy").deepcopy(f.backbone)
    assert torch.allclose(copy(x), feats, atol=1e-6)


def test_every_method_end_to_end_with_a_state_dict_foundation(parts, tmp_path):
    cfg = config(parts)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["transfer", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    table = metrics["methods"]["down"]
    assert set(table) == {"scratch", "foundation_ft", "foundation_lp", "expert_ft:ta", "expert_ft:tb", "expert_lp:ta",
                          "expert_lp:tb", "foundation_lora", "kd", "rd"}
    assert all(0 <= m["test_mean"] <= 1 and m["trained_params"] > 0 for m in table.values())
    assert metrics["foundation"]["backbone"] is None and "state_dict" in metrics["foundation"]["source"]
    # the DenseNet's layers after `features` (norm5, its classifier) get no gradient: not trained, not counted
    net = trained_densenet()
    after = count_parameters(net.features.norm5) + count_parameters(net.class_layers)
    head = table["foundation_lp"]["trained_params"]
    assert table["foundation_ft"]["trained_params"] == count_parameters(net) - after + head
    assert head < table["foundation_lora"]["trained_params"] < table["foundation_ft"]["trained_params"]
    # kd and rd export plain students (the expert architecture); rd's reprogramming modules are saved
    for folder in ("kd", "rd"):
        expert = load_expert(tmp_path / "out" / "down" / "seed0" / folder / "model")
        assert expert.card["foundation"] == metrics["foundation"]["source"]
    assert (tmp_path / "out" / "down" / "seed0" / "rd" / "reprogram.safetensors").is_file()
    card = json.loads((tmp_path / "out" / "down" / "seed0" / "foundation_ft" / "model" / "card.json").read_text())
    assert card["architecture"] is None  # the user's model: no lorkd spec to rebuild it from
    assert "Foundation: state_dict" in (tmp_path / "out" / "report.md").read_text()


def test_frozen_source_foundation_is_bit_identical_after_lp_lora_rd(parts, tmp_path):
    run = make_run(parts, tmp_path / "out", keep_checkpoints=True)
    task = run.tasks[0]
    data = run.recipe(task, 0)
    original = {k: v.clone() for k, v in trained_densenet().state_dict().items()}
    _, lp = data.train_method("foundation_lp", None, None)
    _, lora = data.train_method("foundation_lora", None, None)
    _, rd = data.train_method("rd", None, None)

    def same(state):
        assert set(state) == set(original)
        for k, v in original.items():
            assert torch.equal(state[k], v), k

    same(run.foundation.backbone.module.state_dict())
    same(lp.backbone.module.state_dict())  # weights and BatchNorm statistics
    same(rd.foundation.module.state_dict())
    adapters = {n for n, _ in lora.backbone.named_task_parameters()}
    base = [v for k, v in lora.backbone.state_dict().items() if k not in adapters]
    assert len(base) == len(original) and all(torch.equal(a, b) for a, b in zip(base, original.values()))
    # ... while what trains did change
    assert not torch.equal(rd.feature_reprogram.body[2].weight, torch.zeros_like(rd.feature_reprogram.body[2].weight))
    assert any(bool(p.detach().abs().sum() > 0) for n, p in lora.backbone.named_expert_parameters(0) if n.endswith(".B"))


def test_bad_foundation_sources_name_the_key(parts, tmp_path):
    out = tmp_path / "out"
    bad = source_section(parts)
    bad["source"] = {**bad["source"], "path": str(tmp_path / "nope.pt")}
    with pytest.raises(ConfigError, match=r"foundation\.source\.path: file .*nope\.pt not found"):
        make_run(parts, out, bad)
    with pytest.raises(ConfigError, match=r"foundation\.features: no layer named 'features\.denseblok4'.*did you mean "
                                          r"'features\.denseblock4'"):
        make_run(parts, out, source_section(parts, features="features.denseblok4"))
    with pytest.raises(ConfigError, match=r"foundation\.input: the foundation model takes 3 channels, the experts' data "
                                          r"has 1; set foundation\.input\.channels"):
        make_run(parts, out, {k: v for k, v in source_section(parts).items() if k != "input"})
    with pytest.raises(ConfigError, match=r"foundation\.input\.channels: the teacher takes 3 channels, the data has 1"):
        make_run(parts, out, source_section(parts, input={"size": 32}))
    with pytest.raises(ConfigError, match=r"foundation\.source: the weights of .* missing keys .*key_map"):
        no_prefix = source_section(parts)
        no_prefix["source"] = {k: v for k, v in no_prefix["source"].items() if k != "key_map"}
        make_run(parts, out, no_prefix)
    torch.jit.script(trained_densenet()).save(str(tmp_path / "fm_script.pt"))
    scripted = source_section(parts, source={"kind": "torchscript", "path": str(tmp_path / "fm_script.pt")})
    with pytest.raises(ConfigError, match=r"foundation\.features: a TorchScript model runs its layers out of reach"):
        make_run(parts, out, scripted)
    scripted.pop("features")  # its output (3 logits) as the feature: loads and runs
    assert make_run(parts, out, scripted, rd={"pairs": []}, methods=["rd"]).foundation.feature_dim == 3
    with pytest.raises(ConfigError, match=r"methods: foundation_lora .* TorchScript"):
        make_run(parts, out, scripted, rd={"pairs": []})
    with pytest.raises(ConfigError, match=r"foundation\.experts: folder .*missing not found"):
        make_run(parts, out, source_section(parts, experts=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match=r"foundation\.experts: with source, give the folder"):
        make_run(parts, out, source_section(parts, experts=["ta"]))
    with pytest.raises(ConfigError, match=r"foundation\.source\.factory: a state_dict needs its architecture"):
        no_factory = source_section(parts)
        no_factory["source"] = {k: v for k, v in no_factory["source"].items() if k != "factory"}
        make_run(parts, out, no_factory)
    with pytest.raises(ConfigError, match=r"foundation: give exactly one of run .* or source"):
        make_run(parts, out, {**source_section(parts), "run": str(parts["run"])})
    with pytest.raises(ConfigError, match=r"foundation\.features: only with source"):
        make_run(parts, out, {"run": str(parts["run"]), "features": LAYER})
    with pytest.raises(ConfigError, match=r"rd\.pairs\[0\]\[1\] \(foundation layer\): no layer named 'layer4'.*"
                                          r"DenseNet"):
        make_run(parts, out, rd={"pairs": [["layer4", "layer4"]]})


def test_a_lorkd_teacher_folder_as_source(parts, tmp_path):
    """``source: {kind: lorkd, path: RUN/teacher}`` with ``experts: RUN``: the run's own teacher."""
    section = {"source": {"kind": "lorkd", "path": str(parts["run"] / "teacher")}, "experts": str(parts["run"])}
    run = make_run(parts, tmp_path / "out", section, methods=["foundation_lp"], rd={"pairs": []})
    by_run = make_run(parts, tmp_path / "out2", {"run": str(parts["run"])}, methods=["foundation_lp"])
    assert run.foundation.feature_dim == by_run.foundation.feature_dim and run.foundation.backbone_spec is not None
    assert run.foundation.tasks == ["ta", "tb"] and len(run.foundation.task_files) == 2
    with pytest.raises(ConfigError, match=r"foundation\.source\.path: .*holds no trained foundation model"):
        make_run(parts, tmp_path / "out3", {**section, "source": {"kind": "lorkd", "path": str(tmp_path)}})


@pytest.mark.slow
def test_segmentation_transfer_with_a_state_dict_unet(tmp_path):
    """A MONAI UNet state dict as the foundation of a segmentation transfer (Dice), with the
    experts of a tiny segmentation run; the feature map of a named layer is resized to the input."""
    from monai.networks.nets import UNet
    from test_segmentation import tiny_config, write_h5_task

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]}
    torch.manual_seed(0)
    torch.save({f"module.{k}": v for k, v in UNet(**kwargs).state_dict().items()}, tmp_path / "unet.pt")
    tasks = [{"name": n, "path": str(write_h5_task(tmp_path / n, classes=c)), "format": "hdf5"} for n, c in (("sa", 3), ("sb", 2))]
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(tiny_config(tasks, [8, 16, 16])))
    assert cli.main(["run", str(tmp_path / "seg.yaml"), "--out", str(tmp_path / "segrun"), "--no-progress"]) == 0
    down = write_h5_task(tmp_path / "sdown", classes=2, patients=4)
    cfg = {"foundation": {"source": {"kind": "state_dict", "path": str(tmp_path / "unet.pt"),
                                     "factory": "monai.networks.nets:UNet", "kwargs": kwargs,
                                     "key_map": {"strip_prefix": "module."}},
                          "features": "model.1", "experts": str(tmp_path / "segrun")},
           "data": {"segmentation": {"tasks": [{"name": "sdown", "path": str(down), "format": "hdf5"}],
                                     "patch_size": [8, 16, 16], "samples_per_epoch": 8, "split": [0.5, 0.25, 0.25]}},
           "train": {"epochs": 1, "batch_size": 4}, "methods": ["foundation_lp", "foundation_lora", "expert_ft", "kd", "rd"],
           "rd": {"pairs": [["model.0", "model.0"]]}, "bootstrap": 10}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["transfer", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["task_kind"] == "segmentation" and "state_dict" in metrics["foundation"]["source"]
    table = metrics["methods"]["sdown"]
    assert set(table) == {"foundation_lp", "foundation_lora", "expert_ft:sa", "expert_ft:sb", "kd", "rd"}
    assert all(0 <= m["test_mean"] <= 1 for m in table.values())
    rd = load_expert(tmp_path / "out" / "sdown" / "seed0" / "rd" / "model")
    assert rd.card["task_kind"] == "segmentation" and isinstance(rd.head, torch.nn.Conv3d)


def test_a_run_whose_teacher_came_from_a_source(parts, tmp_path):
    """``foundation.run`` of a run that loaded its teacher from ``teacher.source`` and fine-tuned
    it: the rebuilt model carries the run's (adapted) weights, not the file's."""
    root = parts["run"].parent
    tasks = [{"name": n, "path": str(root / f"{n}.npz")} for n in ("ta", "tb")]
    section = source_section(parts)
    teacher = {"source": section["source"], "features": LAYER, "input": section["input"],
               "adapt": {"mode": "finetune", **STAGE}}
    cfg = {"data": {"tasks": tasks}, "teacher": teacher, "evaluate": {"latency_repeats": 1},
           "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": STAGE}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    run = make_run(parts, tmp_path / "out", {"run": str(tmp_path / "run"), "experts": ["tb"]}, methods=["foundation_lp"])
    f = run.foundation
    assert isinstance(f.backbone, FoundationFeatures) and list(f.experts) == ["tb"] and len(f.task_files) == 2
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "teacher" / "model.safetensors"))
    mine, original = f.backbone.module.state_dict(), trained_densenet().state_dict()
    assert all(torch.equal(mine[k], saved[f"backbone.{k}"]) for k in mine)
    assert not torch.equal(mine["features.conv0.weight"], original["features.conv0.weight"])  # fine-tuned
    assert "teacher of lorkd run" in f.source
