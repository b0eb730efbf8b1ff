"""An exported expert as a MONAI bundle (``export.bundle: true``, :mod:`lorkd.pipelines.core.bundle`):
MONAI's ConfigParser and lorkd's ``load_foundation("monai_bundle")`` both rebuild the expert's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lorkd import cli
from lorkd.errors import ConfigError
from lorkd.models.backbones import backbone_spec
from lorkd.models.classifier import MultiTaskClassifier
from lorkd.models.foundation import load_foundation
from lorkd.models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec
from lorkd.pipelines.core.bundle import check_bundle, write_bundle

EXPERTS = {"rank": 2, "alpha": 4}
CLS_CARD = {"task": "xray", "classes": 3, "input_channels": 1, "input_size": [16, 16], "spatial_dims": 2,
            "normalisation": {"mean": 0.5, "std": 0.25, "scale": "x / 255"}, "class_names": ["a", "b", "c"]}
SEG_CARD = {"task": "heart", "task_kind": "segmentation", "classes": 2, "in_channels": 1, "input_channels": 1,
            "spatial_dims": 3, "patch_size": [8, 16, 16],
            "inference": {"roi_size": [8, 16, 16], "overlap": 0.25, "sw_batch_size": 2, "mode": "gaussian"},
            "preprocessing": {"normalize": "minmax", "scale": None, "target_spacing": None, "target_shape": None}}


def _perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """Random nonzero expert factors and statistics, so the exported weights are not the init."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in net.named_buffers():
            if b.is_floating_point():
                b.add_(0.1 * torch.rand(b.shape, generator=gen))
    return net.eval()


def _monai_load(folder: Path) -> torch.nn.Module:
    """The bundle's network as a MONAI user builds it: ConfigParser + models/model.pt, no lorkd call."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True), strict=True)
    return net.eval()


def _targets(config) -> list[str]:
    if isinstance(config, dict):
        return [str(v) for k, v in config.items() if k == "_target_"] + [t for v in config.values() for t in _targets(v)]
    if isinstance(config, list):
        return [t for v in config for t in _targets(v)]
    return []


@pytest.mark.parametrize("kind", ["classifier_2d", "segmenter_3d"])
def test_bundle_round_trip_through_monai_and_lorkd_gives_the_expert_logits(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "classifier_2d":
        net = MultiTaskClassifier(backbone_spec("resnet10", 2, 1, widen=0.25), [2, 3], EXPERTS)
        card, x = CLS_CARD, torch.randn(3, 1, 16, 16)
    else:
        net = MultiTaskSegmenter(segmentation_backbone_spec("unet", 3, 1, [4, 8], 4), [3, 2], EXPERTS)
        card, x = SEG_CARD, torch.randn(2, 1, 8, 16, 16)
    expert, spec = _perturbed(net).export_task(1)
    expert.eval()
    folder = write_bundle(expert, spec, card, tmp_path / "bundle")
    with torch.no_grad():
        want = expert(x)
        assert want.shape[1] == card["classes"]
        by_monai = _monai_load(folder)(x)
        by_lorkd = load_foundation("monai_bundle", folder)(x)
    torch.testing.assert_close(by_monai, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(by_lorkd, want, atol=1e-6, rtol=0)
    inference = json.loads((folder / "configs" / "inference.json").read_text())
    assert not [t for t in _targets(inference) if t.startswith("lorkd")]  # MONAI + torch only
    assert inference["network_backbone"]["_target_"].startswith("monai.networks.nets.")
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert meta["lorkd_required"] is False and meta["required_packages_version"] == {}
    assert meta["monai_version"] and meta["pytorch_version"] and meta["version"] == "0.1.0"
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 1 and pred["num_channels"] == card["classes"]
    if kind == "classifier_2d":
        assert image["spatial_shape"] == [16, 16] and image["value_range"] == [-2.0, 2.0]
        assert pred["channel_def"] == {"0": "a", "1": "b", "2": "c"} and meta["intensity_normalisation"]["std"] == 0.25
    else:
        assert image["spatial_shape"] == pred["spatial_shape"] == [8, 16, 16] and image["value_range"] == [0.0, 1.0]
        assert meta["intensity_normalisation"]["normalize"] == "minmax" and image["is_patch_data"] is True
    assert "ConfigParser" in (folder / "docs" / "README.md").read_text()


def test_bundle_parses_its_inferer_with_monai(tmp_path):
    from monai.bundle import ConfigParser
    from monai.inferers import SlidingWindowInferer

    net = MultiTaskSegmenter(segmentation_backbone_spec("unet", 3, 1, [4, 8], 4), [2])
    expert, spec = net.export_task(0)
    folder = write_bundle(expert, spec, SEG_CARD, tmp_path / "b")
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, SlidingWindowInferer) and list(inferer.roi_size) == [8, 16, 16]


def test_a_backbone_that_needs_a_lorkd_factory_says_so_and_still_loads(tmp_path):
    net = MultiTaskClassifier(backbone_spec("densenet121", 2, 1), [2])
    expert, spec = net.export_task(0)
    expert.eval()
    folder = write_bundle(expert, spec, {**CLS_CARD, "classes": 2, "class_names": None}, tmp_path / "b")
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert meta["lorkd_required"] is True and "lorkd" in meta["required_packages_version"]
    inference = json.loads((folder / "configs" / "inference.json").read_text())
    assert inference["network_backbone"]["_target_"] == "lorkd.models.backbones.densenet121_features"
    assert "install lorkd" in (folder / "docs" / "README.md").read_text()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_monai_load(folder)(x), expert(x), atol=1e-6, rtol=0)


def test_check_bundle_refuses_a_bundle_that_is_not_the_expert_and_removes_it(tmp_path):
    torch.manual_seed(0)
    net = _perturbed(MultiTaskClassifier(backbone_spec("resnet10", 2, 1, widen=0.25), [2, 2], EXPERTS))
    first, spec = net.export_task(0)
    other, _ = net.export_task(1)
    folder = write_bundle(first, spec, {**CLS_CARD, "classes": 2, "class_names": None}, tmp_path / "b")
    entry = check_bundle(first, folder, (1, 16, 16))
    assert entry["format"] == "monai_bundle" and entry["max_abs_diff"] <= 1e-6
    with pytest.raises(ConfigError, match="export.bundle.*differs from PyTorch"):
        check_bundle(other, folder, (1, 16, 16))
    assert not folder.exists()


def test_export_bundle_in_a_tiny_run_writes_and_checks_the_bundle(tmp_path):
    tiny = {"data": {"synthetic": {"num_tasks": 2, "size": 16, "n_train": 24, "n_val": 12, "n_test": 12}},
            "teacher": {"net": {"arch": "resnet10", "widen": 0.25}, "train": {"epochs": 1, "batch_size": 16}},
            "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": {"epochs": 1, "batch_size": 16}},
            "export": {"bundle": True}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    for expert in sorted((tmp_path / "run" / "experts").iterdir()):
        bundle = expert / "bundle"
        assert (bundle / "configs" / "metadata.json").is_file() and (bundle / "docs" / "README.md").is_file()
        card = json.loads((expert / "card.json").read_text())
        [entry] = [f for f in card["files"] if f["format"] == "monai_bundle"]
        assert entry["file"] == "bundle/" and entry["max_abs_diff"] <= 1e-4
        x = torch.randn(2, card["input_channels"], 16, 16)
        from lorkd import load_expert

        plain = load_expert(expert).eval()
        with torch.no_grad():
            torch.testing.assert_close(_monai_load(bundle)(x), plain(x), atol=1e-6, rtol=0)


def test_export_bundle_of_a_3d_segmentation_run_carries_the_sliding_window_and_patch(tmp_path):
    from test_segmentation import tiny_config, write_h5_task

    task = write_h5_task(tmp_path / "a", shape=(8, 24, 24), classes=3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config([{"name": "a", "path": str(task), "num_classes": 3}], [4, 8, 8],
                                              export={"bundle": True})))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    expert = tmp_path / "run" / "experts" / "a"
    meta = json.loads((expert / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [4, 8, 8]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3 and meta["lorkd_required"] is False
    inference = json.loads((expert / "bundle" / "configs" / "inference.json").read_text())
    assert inference["inferer"]["_target_"] == "SlidingWindowInferer" and inference["network_head"]["_target_"] == "torch.nn.Conv3d"
    from lorkd import load_expert

    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(_monai_load(expert / "bundle")(x), load_expert(expert).eval()(x), atol=1e-6, rtol=0)


def test_a_segmentation_bundle_run_as_its_metadata_says_gives_the_masks_of_lorkd_predict(tmp_path, monkeypatch, capsys):
    """Issue 31: z-score is per channel; the metadata says so exactly and inference.json's
    'preprocessing' computes it, so the bundle run as described gives lorkd predict's masks on an RGB
    image whose channels have very different ranges (one mean/std over all channels would not);
    the metadata says the output is logits."""
    import numpy as np
    from monai.bundle import ConfigParser
    from PIL import Image

    from lorkd.experts import save_expert
    from lorkd.pipelines import predict as P

    torch.manual_seed(0)
    net = MultiTaskSegmenter(segmentation_backbone_spec("unet", 2, 3, [4, 8], 4), [2])
    plain, spec = net.export_task(0)
    card = {"task": "polyp", "task_kind": "segmentation", "classes": 2, "in_channels": 3, "input_channels": 3,
            "task_channels": 3, "channel_fill": "zeros", "spatial_dims": 2, "patch_size": [16, 16],
            "inference": {"roi_size": [16, 16], "overlap": 0.25, "sw_batch_size": 4, "mode": "constant"},
            "preprocessing": {"normalize": "zscore", "scale": None, "target_spacing": None, "target_shape": None}}
    rng = np.random.default_rng(0)
    rgb = np.stack([rng.normal(m, s, (24, 24)) for m, s in ((200, 5), (20, 15), (100, 50))], -1)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(tmp_path / "scan.png")
    expert = save_expert(plain.eval(), tmp_path / "expert", spec, card)
    logits = []  # a random network's mask is one class: move the class-1 bias to the median logit gap
    real = P.sliding_window_logits
    monkeypatch.setattr(P, "sliding_window_logits", lambda *a: logits.append(real(*a)) or logits[-1])
    P.predict_files(expert, [tmp_path / "scan.png"], output=tmp_path / "probe", class_indices=True)
    monkeypatch.undo()
    with torch.no_grad():
        plain.head.bias[1] -= float((logits[0][1] - logits[0][0]).median())
    expert = save_expert(plain.eval(), tmp_path / "expert", spec, card)
    P.predict_files(expert, [tmp_path / "scan.png"], output=tmp_path / "masks", class_indices=True)
    by_lorkd = np.asarray(Image.open(tmp_path / "masks" / "scan_mask.png"))
    assert 0 < by_lorkd.sum() < by_lorkd.size  # both classes
    folder = write_bundle(plain.eval(), spec, card, tmp_path / "bundle")
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    norm, pred = meta["intensity_normalisation"], meta["network_data_format"]["outputs"]["pred"]
    assert norm["normalize"] == "zscore" and norm["normalize_per"] == "channel"
    assert "per channel c" in norm["normalize_detail"] and "not one mean/std over all channels" in norm["normalize_detail"]
    assert "'preprocessing'" in norm["in_bundle"] and pred["description"].startswith("logits [B, 2, *spatial], not probabilities")
    parser = ConfigParser()  # the bundle as its metadata describes: preprocessing, batch axis, inferer, argmax
    parser.read_config(str(folder / "configs" / "inference.json"))
    network = _monai_load(folder)
    image = torch.from_numpy(np.moveaxis(np.asarray(Image.open(tmp_path / "scan.png"), np.float32), -1, 0).copy())
    with torch.no_grad():
        x = parser.get_parsed_content("preprocessing")(image.clone())  # (MONAI's transform works in place)
        by_bundle = parser.get_parsed_content("inferer")(torch.as_tensor(x)[None], network)[0].argmax(0).numpy()
    np.testing.assert_array_equal(by_bundle, by_lorkd)
    flat = (image - image.mean()) / image.std(unbiased=False)  # one z-score over all channels: another input,
    assert (torch.as_tensor(x) - flat).abs().max() > 1.0
    torch.testing.assert_close(torch.as_tensor(x).mean((1, 2)).as_subclass(torch.Tensor), torch.zeros(3), atol=1e-5, rtol=0)
    capsys.readouterr()
