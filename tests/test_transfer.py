"""``lorkd transfer``: every method end to end on tiny data (2D and 3D), frozen parts unchanged
by training, reprogramming modules that start as the identity, and clear errors for bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lorkd import cli, load_expert
from lorkd.config import from_dict
from lorkd.data.medmnist import load_npz_task
from lorkd.distill.reprogram import FeatureReprogram, InputReprogram, ReprogrammingDistiller
from lorkd.engine.distributed import DistributedContext
from lorkd.errors import ConfigError, DataError
from lorkd.models.backbones import backbone_spec, build_backbone
from lorkd.pipelines.recipes.transfer import TransferRun, cap_train, load_downstream, scores, transfer_startup_summary
from lorkd.report.transfer import bootstrap_interval, item_statistic
from lorkd.pipelines.schema import TransferConfig

STAGE = {"epochs": 1, "batch_size": 8}
ALL_LABELS = {"scratch", "foundation_ft", "foundation_lp", "expert_ft:ta", "expert_ft:tb", "expert_lp:ta",
              "expert_lp:tb", "foundation_lora", "kd", "rd"}


def write_npz(path: Path, shape, classes=2, counts=(24, 12, 12), seed=0) -> Path:
    """Images ``[n, *shape]`` whose brightness tells the class (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in zip(("train", "val", "test"), counts):
        labels = np.arange(n) % classes
        images = rng.integers(0, 100, (n, *shape)) + (labels * 150 // max(classes - 1, 1)).reshape(-1, *([1] * len(shape)))
        data[f"{split}_images"] = images.astype(np.uint8)
        data[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
    np.savez(path, **data)
    return path


def make_foundation_run(root: Path, shape) -> Path:
    """A tiny `lorkd run` on tasks ta, tb of ``shape``: teacher/ and experts/{ta,tb}/."""
    root.mkdir(parents=True, exist_ok=True)
    for name, seed in (("ta", 0), ("tb", 1)):
        write_npz(root / f"{name}.npz", shape, seed=seed)
    cfg = {"data": {"tasks": [{"name": n, "path": str(root / f"{n}.npz")} for n in ("ta", "tb")]},
           "teacher": {"net": {"arch": "resnet10", "widen": 0.25}, "train": STAGE},
           "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": STAGE},
           "evaluate": {"latency_repeats": 1}}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", str(root / "run.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def run2d(tmp_path_factory) -> Path:
    return make_foundation_run(tmp_path_factory.mktemp("found2d"), (12, 12))


def transfer_cfg(run: Path, down: Path, **extra) -> dict:
    return {"recipe": "transfer", "foundation": {"run": str(run)},
            "data": {"tasks": [{"name": "down", "path": str(down)}]}, "train": STAGE, "bootstrap": 50, **extra}


def run_transfer_cli(tmp_path: Path, cfg: dict, *flags: str) -> int:
    path = tmp_path / "transfer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cli.main(["transfer", str(path), "--out", str(tmp_path / "out"), "--no-progress", *flags])


@pytest.mark.slow
def test_every_method_end_to_end_2d(run2d, tmp_path, capsys):
    down = write_npz(tmp_path / "down.npz", (12, 12, 3), classes=3, seed=5)  # RGB to the 1-channel foundation
    cfg = transfer_cfg(run2d, down, data={"tasks": [{"name": "down", "path": str(down)}], "max_train": 18},
                       seeds=[0, 1], methods=["scratch", "foundation_ft", "foundation_lp", "expert_ft", "expert_lp",
                                              "foundation_lora", "kd", "rd"])
    assert run_transfer_cli(tmp_path, cfg) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    table = metrics["methods"]["down"]
    assert set(table) == ALL_LABELS
    assert metrics["data"][0]["n_train"] == 18 and metrics["data"][0]["n_test"] == 12
    for label, m in table.items():
        assert m["n_seeds"] == 2 and 0 <= m["test_mean"] <= 1 and m["trained_params"] > 0, label
        lo, hi = m["test_ci95"]
        assert lo <= m["test_mean"] <= hi
    # trained parameters: a probe trains its head only; lora adds adapters; rd trains more than its student
    lp = table["foundation_lp"]
    assert lp["trained_params"] == lp["deployed_params"] - metrics["foundation"]["params"] == feat_dim(run2d) * 3 + 3
    assert table["foundation_lp"]["trained_params"] < table["foundation_lora"]["trained_params"] < table["foundation_ft"]["trained_params"]
    assert table["rd"]["trained_params"] > table["rd"]["deployed_params"] == table["kd"]["deployed_params"]
    assert metrics["foundation"]["tasks"] == ["ta", "tb"] and metrics["foundation"]["experts"] == ["ta", "tb"]
    # exported models (kd, rd, expert_ft) are plain experts that reproduce the reported test accuracy
    task = load_npz_task(down, name="down")
    from lorkd.data.multitask import MultiTaskDataset

    test = MultiTaskDataset([task], "test", channels=1)
    for folder, label in (("kd", "kd"), ("rd", "rd"), ("expert_ft-ta", "expert_ft:ta")):
        expert = load_expert(out / "down" / "seed1" / folder / "model")
        assert expert.card["method"] == label and not any("lorkd.experts" in type(m).__module__ for m in expert.modules())
        assert scores(expert, test, torch.device("cpu"))["acc"] == pytest.approx(table[label]["seeds"]["1"]["test"]["acc"])
    assert (out / "down" / "seed0" / "foundation_lp" / "head.safetensors").is_file()
    assert (out / "down" / "seed0" / "rd" / "reprogram.safetensors").is_file()
    assert (out / "down" / "seed0" / "rd" / "history.jsonl").is_file()
    assert not (out / "down" / "seed0" / "rd" / "checkpoints").exists()
    report = (out / "report.md").read_text()
    assert "| rd |" in report and "(n=2)" in report and (out / "plots" / "transfer_down.png").is_file()
    # predict runs on an exported transfer model
    capsys.readouterr()
    assert cli.main(["predict", str(out / "down" / "seed0" / "rd" / "model"), str(down)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 12
    # --resume reuses every finished method: same numbers, no retraining
    before = (out / "down" / "seed0" / "rd" / "result.json").stat().st_mtime_ns
    assert run_transfer_cli(tmp_path, cfg, "--resume") == 0
    again = json.loads((out / "metrics.json").read_text())["methods"]["down"]
    assert {k: v["test_mean"] for k, v in again.items()} == {k: v["test_mean"] for k, v in table.items()}
    assert (out / "down" / "seed0" / "rd" / "result.json").stat().st_mtime_ns == before


def feat_dim(run: Path) -> int:
    """The foundation model's feature width."""
    from lorkd.pipelines.recipes.transfer_foundation import foundation_from_run

    return foundation_from_run(run).feature_dim


def _run(run2d: Path, tmp_path: Path, **extra) -> TransferRun:
    down = write_npz(tmp_path / "down.npz", (12, 12), seed=3)
    cfg = from_dict(TransferConfig, {k: v for k, v in transfer_cfg(run2d, down, **extra).items() if k != "recipe"})
    (tmp_path / "out").mkdir(exist_ok=True)
    return TransferRun(cfg, tmp_path / "out", DistributedContext.from_env(torch.device("cpu")), progress=False)


@pytest.mark.slow
def test_frozen_parts_are_bit_identical_after_training(run2d, tmp_path):
    run = _run(run2d, tmp_path, keep_checkpoints=True)
    task = run.tasks[0]
    data = run.recipe(task, 0)
    original = {k: v.clone() for k, v in run.foundation.backbone.state_dict().items()}
    lp, lp_model = data.train_method("foundation_lp", None, None)
    lora, lora_model = data.train_method("foundation_lora", None, None)
    rd, rd_model = data.train_method("rd", None, None)

    def same(state, reference):
        assert set(state) == set(reference)
        for k, v in reference.items():
            assert torch.equal(state[k], v), k

    same(lp_model.backbone.state_dict(), original)  # weights and BatchNorm statistics
    same(rd_model.foundation.state_dict(), original)
    expert_names = {n for n, _ in lora_model.backbone.named_task_parameters()}
    base = {k: v for k, v in lora_model.backbone.state_dict().items() if k not in expert_names}
    assert len(base) == len(original)  # every foundation tensor is there, under the wrapped names
    assert all(torch.equal(a, b) for a, b in zip(base.values(), original.values()))
    # ... while what trains did change
    torch.manual_seed(0)
    initial_lp, _ = run.build("foundation_lp", None, task.num_classes)
    assert not torch.equal(initial_lp.head.weight, lp_model.head.weight)
    b_factors = [p for n, p in lora_model.backbone.named_expert_parameters(0) if n.endswith(".B")]
    assert b_factors and any(bool(p.detach().abs().sum() > 0) for p in b_factors)  # B starts at zero
    assert not torch.equal(rd_model.feature_reprogram.body[2].weight, torch.zeros_like(rd_model.feature_reprogram.body[2].weight))
    assert not torch.equal(rd_model.input_reprogram.body[2].weight, torch.zeros_like(rd_model.input_reprogram.body[2].weight))
    assert lp["trained_params"] == lp_model.head.weight.numel() + lp_model.head.bias.numel()


def test_interrupted_method_resumes_from_its_checkpoint(run2d, tmp_path):
    run = _run(run2d, tmp_path, keep_checkpoints=True, train={"epochs": 2, "batch_size": 8})
    task = run.tasks[0]
    first, _ = run.recipe(task, 0).train_method("rd", None, None)
    folder = tmp_path / "out" / "down" / "seed0" / "rd"
    (folder / "result.json").unlink()  # as if killed after its last checkpoint, before finishing
    history = (folder / "history.jsonl").read_text()
    run.resume = True
    again, _ = run.recipe(task, 0).train_method("rd", None, None)
    assert (folder / "history.jsonl").read_text() == history  # no epoch trained twice
    assert again["test"] == first["test"] and again["val"] == first["val"]


def test_reprogramming_modules_start_as_identity():
    torch.manual_seed(0)
    for dims, shape in ((2, (3, 2, 9, 9)), (3, (3, 2, 5, 6, 7))):
        x = torch.randn(*shape)
        module = InputReprogram(2, dims, hidden=4)
        assert torch.equal(module(x), x)
    f = torch.randn(5, 16)
    assert torch.equal(FeatureReprogram(16, 8)(f), f)
    found, fdim = build_backbone(backbone_spec("resnet10", 2, 1, widen=0.25))
    stud, sdim = build_backbone(backbone_spec("resnet10", 2, 1, widen=0.125))
    rd = ReprogrammingDistiller(found, fdim, stud, sdim, 3, 1, 2, pairs=[["layer4", "layer4"], ["layer2", "layer3"]]).eval()
    x = torch.randn(6, 1, 16, 16)
    out = rd(x, both=True)
    found.eval()
    # at initialisation the foundation branch is exactly the frozen foundation through the classifier
    assert torch.equal(out.foundation_logits, rd.classifier(found(x)))
    assert len(out.pairs) == 2 and out.pairs[1][0].shape[0] == 6
    # the exported student (projector and classifier merged) gives the student's logits
    assert torch.allclose(rd.export()(x), out.student_logits, atol=1e-5)
    # dense (segmentation): pointwise feature reprogramming, 1x1 classifier and projector, merged on export
    fmap = torch.randn(2, 16, 3, 4, 5)
    assert torch.equal(FeatureReprogram(16, 8, dense_dims=3)(fmap), fmap)
    dense = ReprogrammingDistiller(torch.nn.Conv3d(1, 6, 3, padding=1), 6, torch.nn.Conv3d(1, 4, 3, padding=1), 4,
                                   3, 1, 3, pairs=[], dense=True).eval()
    v = torch.randn(2, 1, 5, 6, 7)
    assert dense(v).shape == (2, 3, 5, 6, 7) and isinstance(dense.export().head, torch.nn.Conv3d)
    assert torch.allclose(dense.export()(v), dense(v), atol=1e-5)
    with pytest.raises(ConfigError, match=r"rd\.pairs \(foundation layer\): no layer named 'layer9'"):
        ReprogrammingDistiller(found, fdim, stud, sdim, 3, 1, 2, pairs=[["layer4", "layer9"]])
    with pytest.raises(ConfigError, match="input and/or feature"):
        ReprogrammingDistiller(found, fdim, stud, sdim, 3, 1, 2, input_reprogram=False, feature_reprogram=False)


def test_bad_input_errors(run2d, tmp_path):
    ta = run2d.parent / "ta.npz"
    with pytest.raises(ConfigError, match=r"data\.tasks\[0\]: task 'ta' .* one of the tasks the foundation"):
        _run(run2d, tmp_path, data={"tasks": [{"name": "ta", "path": str(tmp_path / "x.npz")}]})
    with pytest.raises(ConfigError, match=r"data\.tasks\[0\]: task 'renamed' .*ta\.npz.* one of the tasks"):
        _run(run2d, tmp_path, data={"tasks": [{"name": "renamed", "path": str(ta)}]})
    with pytest.raises(ConfigError, match=r"foundation\.experts: no expert 'tc' in .*experts; the run has \['ta', 'tb'\]"):
        _run(run2d, tmp_path, foundation={"run": str(run2d), "experts": ["ta", "tc"]})
    with pytest.raises(ConfigError, match=r"foundation\.run: .*teacher holds no trained foundation model"):
        _run(run2d, tmp_path, foundation={"run": str(tmp_path)})
    vol = write_npz(tmp_path / "vol.npz", (6, 6, 6))
    with pytest.raises(DataError, match=r"vol\.npz\): holds 3D inputs but the foundation model takes 2D"):
        _run(run2d, tmp_path, data={"tasks": [{"name": "vol", "path": str(vol)}]})
    two = write_npz(tmp_path / "two.npz", (12, 12, 3))
    run = _run(run2d, tmp_path)
    run.foundation.channels = 2  # a foundation that takes 2-channel input
    run.cfg.data.tasks[0].path = str(two)
    with pytest.raises(DataError, match=r"two\.npz\): images have 3 channels but the foundation model takes 2"):
        load_downstream(run.cfg, run.foundation)
    with pytest.raises(ConfigError, match=r"student: 'tz' is not one of the experts"):
        _run(run2d, tmp_path, student="tz")
    with pytest.raises(ConfigError, match=r"methods\[0\]: 'distill' is not one of"):
        _run(run2d, tmp_path, methods=["distill"])
    with pytest.raises(ConfigError, match=r"rd\.pairs\[0\]\[1\] \(foundation layer\): no layer named 'layer7'"):
        _run(run2d, tmp_path, rd={"pairs": [["layer4", "layer7"]]})
    with pytest.raises(ConfigError, match=r"rd\.pairs\[0\]: must be \[student_layer, foundation_layer\]"):
        _run(run2d, tmp_path, rd={"pairs": [["layer4"]]})


def test_cli_refuses_the_wrong_recipe(run2d, tmp_path, capsys):
    down = write_npz(tmp_path / "down.npz", (12, 12), seed=3)
    assert run_transfer_cli(tmp_path, {**transfer_cfg(run2d, down), "recipe": "classification"}) == 2
    assert "`lorkd transfer` takes a transfer config" in capsys.readouterr().err
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(transfer_cfg(run2d, down)))
    assert cli.main(["run", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "run it with `lorkd transfer`" in capsys.readouterr().err
    cfg = transfer_cfg(run2d, down, methods=["foundation_lp"])
    del cfg["recipe"]  # `lorkd transfer` reads a config without `recipe` as a transfer config
    assert run_transfer_cli(tmp_path, cfg) == 0
    assert set(json.loads((tmp_path / "out" / "metrics.json").read_text())["methods"]["down"]) == {"foundation_lp"}


def test_startup_summary_and_channel_mapping_are_logged(run2d, tmp_path, caplog):
    rgb = write_npz(tmp_path / "rgb.npz", (12, 12, 3), classes=3, counts=(18, 9, 6), seed=4)
    cfg = transfer_cfg(run2d, rgb, methods=["foundation_lp"], seeds=[3])
    cfg["data"]["tasks"][0]["name"] = "colour"
    with caplog.at_level(logging.INFO, logger="lorkd"):
        assert run_transfer_cli(tmp_path, cfg) == 0
    text = caplog.text
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "colour" in r.getMessage()]
    assert len(warned) == 1 and warned[0].getMessage() == (
        f"transfer: task colour ({rgb}): 3 channels averaged to the 1 (gray) channel the foundation model takes")
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("lorkd: seeds [3]"))
    assert f"world size 1, out {tmp_path / 'out'}" in summary and "device cpu" in summary
    assert f"foundation: lorkd run {run2d} (teacher/ and experts/) (trained on ta, tb; input 1 channel(s), 2D, the images' own size" in summary
    assert (f"task colour: train 18, val 9, test 6 (images; 3 classes; 3 channels averaged to the 1 (gray) channel "
            f"the foundation model takes; {rgb})") in summary
    assert "methods: foundation_lp; 1 epoch(s), batch 8" in summary
    assert text.index("lorkd: seeds [3]") < text.index("transfer: colour / foundation_lp")  # before training
    (tmp_path / "g").mkdir()
    gray = _run(run2d, tmp_path / "g")  # a gray task to a gray foundation: no mapping line
    assert "task down: train 24, val 12, test 12 (images; 2 classes; 1 channel(s), as the foundation model takes" in \
        transfer_startup_summary(gray)


def test_cap_train_is_stratified_and_the_same_every_time(tmp_path):
    task = load_npz_task(write_npz(tmp_path / "t.npz", (4, 4), classes=3, counts=(30, 3, 3)))
    a, b = cap_train(task, 12), cap_train(task, 12)
    assert a.num_samples("train") == 12 and np.array_equal(a.images["train"], b.images["train"])
    assert a.class_counts("train").tolist() == [4, 4, 4] and a.num_samples("test") == 3
    assert cap_train(task, None) is task and cap_train(task, 100) is task


def test_bootstrap_interval():
    assert bootstrap_interval(np.ones((2, 50))) == (1.0, 1.0)
    correct = np.array([[1, 0] * 50, [1, 1] * 50])  # seed means 0.5 and 1.0 -> mean 0.75
    lo, hi = bootstrap_interval(correct, resamples=2000)
    assert lo < 0.75 < hi and hi - lo < 0.2
    assert np.isnan(bootstrap_interval(correct, resamples=0)[0])
    # per-class items with NaN where a class is absent: the statistic is the mean of per-class means
    dice = np.array([[0.5, np.nan], [1.0, 0.2], [0.0, 0.4]])
    assert item_statistic(dice) == pytest.approx((0.5 + 0.3) / 2)
    assert bootstrap_interval(np.stack([np.ones((4, 2))] * 2), resamples=20) == (1.0, 1.0)
    lo, hi = bootstrap_interval(dice[None], resamples=500)
    assert 0.0 <= lo <= item_statistic(dice) <= hi <= 1.0


@pytest.mark.slow
def test_every_method_end_to_end_3d(tmp_path):
    run3d = make_foundation_run(tmp_path / "found3d", (8, 8, 8))
    down = write_npz(tmp_path / "down.npz", (8, 8, 8), seed=7)
    cfg = transfer_cfg(run3d, down, foundation={"run": str(run3d), "experts": ["tb"]})
    assert run_transfer_cli(tmp_path, cfg) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["methods"]["down"]) == {"scratch", "foundation_ft", "foundation_lp", "expert_ft:tb",
                                               "expert_lp:tb", "foundation_lora", "kd", "rd"}
    expert = load_expert(tmp_path / "out" / "down" / "seed0" / "rd" / "model")
    assert expert.card["spatial_dims"] == 3 and any(isinstance(m, torch.nn.Conv3d) for m in expert.modules())


@pytest.mark.slow
def test_segmentation_transfer_end_to_end(tmp_path, capsys):
    """A tiny segmentation foundation run (UNet) on two tasks; transfer to a third one (Dice)."""
    from test_segmentation import tiny_config, write_h5_task

    tasks = [{"name": n, "path": str(write_h5_task(tmp_path / n, classes=c)), "format": "hdf5"}
             for n, c in (("sa", 3), ("sb", 2))]
    found = tiny_config(tasks, [8, 16, 16])
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(found))
    assert cli.main(["run", str(tmp_path / "seg.yaml"), "--out", str(tmp_path / "segrun"), "--no-progress"]) == 0
    down = write_h5_task(tmp_path / "sdown", classes=2, patients=4)
    seg_data = {"tasks": [{"name": "sdown", "path": str(down), "format": "hdf5"}], "patch_size": [8, 16, 16],
                "samples_per_epoch": 8, "split": [0.5, 0.25, 0.25]}
    cfg = {"recipe": "transfer", "foundation": {"run": str(tmp_path / "segrun"), "experts": ["sb"]},
           "data": {"segmentation": seg_data}, "train": {"epochs": 1, "batch_size": 4},
           "methods": ["scratch", "foundation_ft", "foundation_lp", "expert_ft", "foundation_lora", "kd", "rd"],
           "rd": {"pairs": [["model.0", "model.0"]]}, "bootstrap": 20}
    assert run_transfer_cli(tmp_path, cfg) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_kind"] == "segmentation" and metrics["primary_metric"] == "dice"
    table = metrics["methods"]["sdown"]
    assert set(table) == {"scratch", "foundation_ft", "foundation_lp", "expert_ft:sb", "foundation_lora", "kd", "rd"}
    assert all(0 <= m["test_mean"] <= 1 for m in table.values())
    assert (out / "sdown" / "split_sdown.json").is_file() and "| rd |" in (out / "report.md").read_text()
    rd = load_expert(out / "sdown" / "seed0" / "rd" / "model")
    assert rd.card["task_kind"] == "segmentation" and isinstance(rd.head, torch.nn.Conv3d)
    # the exported rd student reproduces the reported test Dice (sliding windows on whole volumes)
    from lorkd.pipelines.recipes.transfer import seg_scores

    run = TransferRun(from_dict(TransferConfig, {k: v for k, v in cfg.items() if k != "recipe"}), out,
                      DistributedContext.from_env(torch.device("cpu")), progress=False)
    data = run.recipe(run.tasks[0], 0)
    assert seg_scores(rd, data.test_set, data.seg)["dice"] == pytest.approx(table["rd"]["test_mean"], nan_ok=True)
    # a classification downstream task for a segmentation foundation is refused
    bad = {**cfg, "data": {"tasks": [{"name": "x", "path": str(tmp_path / "x.npz")}]}}
    (tmp_path / "b").mkdir()
    assert run_transfer_cli(tmp_path / "b", bad) == 2
    assert "is a segmentation run; give the downstream tasks as data.segmentation" in capsys.readouterr().err
