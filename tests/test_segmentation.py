"""The segmentation recipe: models, task-block sampling, evaluation, sliding windows, CLI end to end."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import json
import logging
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lorkd import cli
from lorkd.config import from_dict
from lorkd.data.multitask import TaskBatchSampler, collate_task_batch
from lorkd.data.paths import shared_data_dir
from lorkd.data.segmentation import PatchDataset, load_segmentation_task, reader_options
from lorkd.engine.distributed import DistributedContext
from lorkd.engine.inference import sliding_window_logits
from lorkd.errors import ConfigError, DataError
from lorkd.models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec
from lorkd.pipelines.recipes import segmentation as S
from lorkd.pipelines.schema import Distill
from lorkd.pipelines.predict import predict_masks
from lorkd.pipelines.schema import SegmentationConfig


# ------------------------------------------------------------------ tiny data written by the tests
def blob_case(shape, classes, seed):
    """Image = label-dependent intensity + noise, so a tiny net can learn it; every class present."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    n = len(shape)
    for c in range(1, classes):
        lo = [int(rng.integers(0, s // 2)) for s in shape]
        label[tuple(slice(a, a + max(2, s // 3)) for a, s in zip(lo, shape))] = c
    image = label.astype(np.float32) * 2.0 + rng.normal(0, 0.3, shape).astype(np.float32)
    assert label.ndim == n
    return image, label


def write_h5_task(root: Path, shape=(8, 24, 24), classes=3, patients=4, frames=2) -> Path:
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    for p in range(patients):
        for f in range(frames):
            image, label = blob_case(shape, classes, 10 * p + f)
            with h5py.File(root / "volumes" / f"patient{p:03d}_frame{f + 1:02d}.h5", "w") as h:
                h.create_dataset("image", data=image)
                h.create_dataset("label", data=label)
    return root


def write_png_task(root: Path, n=6, size=(24, 24)) -> Path:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label = blob_case(size, 2, i)
        Image.fromarray(np.clip(image * 60 + 40, 0, 255).astype(np.uint8)).save(root / "images" / f"case{i}.png")
        Image.fromarray((label * 255).astype(np.uint8)).save(root / "masks" / f"case{i}_mask.png")
    return root


def tiny_config(tasks: list[dict], patch: list[int], **extra) -> dict:
    net = {"arch": "unet", "channels": [4, 8], "features": 4}
    stage = {"epochs": 1, "batch_size": 4, "optim": {"name": "adamw", "lr": 0.01}}
    cfg = {"recipe": "segmentation",
           "data": {"tasks": tasks, "patch_size": patch, "samples_per_epoch": 8, "split": [0.5, 0.25, 0.25]},
           "teacher": {"net": net, "train": stage},
           "student": {"net": net, "train": stage, "experts": {"rank": {"*.2.conv": 4, "*": 2}}},
           "evaluate": {"latency_repeats": 1}}
    cfg.update(extra)
    return cfg


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


# ------------------------------------------------------------------ model
@pytest.mark.parametrize("arch", ["unet", "dynunet", "segresnet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_segmenter_shapes_and_export_match(arch, dims):
    torch.manual_seed(0)
    shape = (16, 16) if dims == 2 else (8, 16, 16)
    spec = segmentation_backbone_spec(arch, dims, 1, [4, 8, 8], 4)
    model = MultiTaskSegmenter(spec, [3, 2], {"rank": 2, "alpha": 4, "norm": "per_task"})
    x, ids = torch.randn(3, 1, *shape), torch.tensor([1, 0, 1])
    out = model(x, ids)
    assert out.features.shape == (3, 4, *shape)
    assert out.logits[0].shape == (1, 3, *shape) and out.logits[1].shape == (2, 2, *shape)
    model.eval()
    plain, spec_t = model.export_task(1)
    assert spec_t["factory"].endswith("plain_segmenter") and list(dict(plain.named_children())) == ["backbone", "head"]
    assert not any("lorkd" in type(m).__module__ for m in plain.modules())
    torch.testing.assert_close(plain.eval()(x), model(x, torch.ones(3, dtype=torch.long)).logits[1], rtol=1e-4, atol=1e-4)


def test_bad_segmentation_network_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown segmentation network"):
        segmentation_backbone_spec("vnet", 3, 1, [4, 8], 4)
    with pytest.raises(ConfigError, match="data.patch_size"):
        from_dict(SegmentationConfig, {"data": {"tasks": [{"name": "a", "path": "x"}], "patch_size": [8]}})


def test_a_misspelled_reader_key_is_an_unknown_key_error():
    """Issue 31: a misspelled key under ``reader`` is named at load time with the closest key, like
    every other section (it was a TypeError from inside the reader)."""
    task = {"name": "a", "path": "x", "format": "folder", "reader": {"mask_rules": "{stem}_seg"}}
    with pytest.raises(ConfigError, match=r"^data\.tasks\[0\]\.reader\.mask_rules: unknown key \(did you mean 'mask_rule'\?\)"):
        from_dict(SegmentationConfig, {"data": {"tasks": [task]}})
    with pytest.raises(ConfigError, match=r"data\.tasks\[0\]\.reader\.spacing: unknown key"):
        from_dict(SegmentationConfig, {"data": {"tasks": [{**task, "reader": {"spacing": 1.0}}]}})  # HDF5's, not folder's
    ok = from_dict(SegmentationConfig, {"data": {"tasks": [{**task, "reader": {"mask_rule": "{stem}_seg"}}]}})
    assert ok.data.tasks[0].reader == {"mask_rule": "{stem}_seg"}
    assert "spacing" in reader_options("hdf5") and "mask_rule" in reader_options("folder")


def test_task_errors_keep_the_task_key_and_name_the_file(tmp_path):
    """Issue 31: an error of a task's data (DataError or ConfigError) starts with data.tasks[i] (name)."""
    root = write_png_task(tmp_path / "p", n=4)
    base = {k: v for k, v in tiny_config([{"name": "vessels", "path": str(root), "format": "folder",
                                           "reader": {"mask_rule": "{id}_mask"}}], [8, 8]).items() if k != "recipe"}
    with pytest.raises(ConfigError, match=r"^data\.tasks\[0\] \(vessels\): reader\.mask_rule: '\{id\}_mask'"):
        S.load_volume_tasks(from_dict(SegmentationConfig, base))
    base["data"]["tasks"][0].update(reader={}, num_classes=2)
    Image.fromarray(np.full((24, 24), 128, np.uint8)).save(root / "masks" / "case2_mask.png")
    with pytest.raises(DataError, match=r"^data\.tasks\[0\] \(vessels\): .*case2_mask\.png"):
        S.load_volume_tasks(from_dict(SegmentationConfig, base))


# ------------------------------------------------------------------ data path of the recipe
def test_task_blocks_agree_with_the_task_batch_sampler(tmp_path):
    a = load_segmentation_task("a", write_h5_task(tmp_path / "a", classes=3), split=[0.5, 0.25, 0.25])
    b = load_segmentation_task("b", write_h5_task(tmp_path / "b", shape=(6, 20, 20), classes=2), split=[0.5, 0.25, 0.25])
    ds = PatchDataset([a, b], (4, 8, 8), samples_per_epoch=10, task_blocks=True)
    assert ds.task_sizes == [5, 5]
    sampler = TaskBatchSampler(ds, batch_size=4, seed=0)
    batches = list(sampler)
    for batch in batches:
        collated = collate_task_batch([ds[i] for i in batch])
        assert collated.images.shape == (len(batch), 1, 4, 8, 8) and collated.labels.shape == (len(batch), 4, 8, 8)
        expected = [0 if i < 5 else 1 for i in batch]
        assert collated.task_ids.tolist() == expected  # sampler's view of the task == the patch's task
        assert int(collated.labels[collated.task_ids == 1].max()) <= 1
    assert any(len(set(int(i >= 5) for i in b)) == 2 for b in batches)  # batches mix tasks
    weighted = PatchDataset([a, b], (4, 8, 8), samples_per_epoch=10, task_weights=[3, 1], task_blocks=True)
    assert weighted.task_sizes == [8, 2] and {weighted[i][2] for i in range(8)} == {0}


def test_recipe_writes_and_reuses_the_split(tmp_path):
    root = write_h5_task(tmp_path / "t")
    cfg = from_dict(SegmentationConfig, {k: v for k, v in tiny_config(
        [{"name": "t", "path": str(root), "num_classes": 3}], [4, 8, 8]).items() if k != "recipe"})
    out = tmp_path / "run"
    tasks = S.load_volume_tasks(cfg, out)
    saved = json.loads((out / "split_t.json").read_text())
    assert saved == tasks[0].split_ids()
    pats = [{c.split("_")[0] for c in saved[s]} for s in ("train", "val", "test")]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])
    cfg.data.seed = 7  # a different seed would give another split; the saved one wins
    assert S.load_volume_tasks(cfg, out)[0].split_ids() == saved


def test_data_max_train_keeps_the_same_training_cases_and_the_full_split_file(tmp_path):
    root = write_h5_task(tmp_path / "t", patients=6)
    base = {k: v for k, v in tiny_config([{"name": "t", "path": str(root), "num_classes": 3}], [4, 8, 8]).items()
            if k != "recipe"}
    full = S.load_volume_tasks(from_dict(SegmentationConfig, base))[0].split_ids()
    capped = from_dict(SegmentationConfig, {**base, "data": {**base["data"], "max_train": 2}})
    a = S.load_volume_tasks(capped, tmp_path / "run")[0].split_ids()
    b = S.load_volume_tasks(capped, tmp_path / "run")[0].split_ids()
    assert a == b and len(a["train"]) == 2 and set(a["train"]) < set(full["train"])
    assert a["val"] == full["val"] and a["test"] == full["test"]
    assert json.loads((tmp_path / "run" / "split_t.json").read_text()) == full  # the split file holds every case
    used = json.loads((tmp_path / "run" / "train_cases_t.json").read_text())  # issue 31: the cases used, recorded
    assert used == {"max_train": 2, "cap_seed": 0, "of": len(full["train"]), "train": a["train"]}
    with pytest.raises(ConfigError, match=r"data\.max_train: must be >= 1, got 0"):
        from_dict(SegmentationConfig, {**base, "data": {**base["data"], "max_train": 0}})


@pytest.mark.realdata
def test_real_acdc_two_volumes_through_the_recipe_data_path(tmp_path):
    data = shared_data_dir() / "acdc_sslmis_h5"
    if not data.is_dir():
        pytest.skip("real data missing")
    cfg = from_dict(SegmentationConfig, {"data": {
        "tasks": [{"name": "acdc", "path": "acdc_sslmis_h5", "num_classes": 4}], "patch_size": [64, 64],
        "preprocess": {"scale": [1.0, 0.5, 0.5]}, "samples_per_epoch": 4, "foreground_ratio": 1.0}})
    run = S.SegmentationRecipe(cfg, tmp_path, DistributedContext.from_env(torch.device("cpu")))
    task = run.tasks[0]
    assert (tmp_path / "split_acdc.json").is_file()
    pats = [{r.patient_id for r in task.cases(s)} for s in ("train", "val", "test")]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])
    task.splits["train"] = task.splits["train"][:2]  # 2 volumes keep it fast
    run.train_set = run.patches(None)
    for i in range(4):
        x, y, t = run.train_set[i]
        assert x.shape == (1, 64, 64) and y.shape == (64, 64) and t == 0
        assert set(torch.unique(y).tolist()) <= {0, 1, 2, 3} and y.max() > 0
    assert run.cache.loads <= 2


# ------------------------------------------------------------------ evaluation
class _Oracle(torch.nn.Module):
    """A 'network' whose logits are the one-hot labels it was given (a perfect predictor)."""

    def __init__(self, volumes, classes):
        super().__init__()
        self.volumes, self.classes = volumes, classes

    def forward(self, x):  # x: windows of the image, whose channel 0 *is* the label map
        return torch.nn.functional.one_hot(x[:, 0].round().long(), self.classes).movedim(-1, 1).float() * 10


def test_evaluation_of_a_perfect_predictor_gives_dice_one(tmp_path):
    root = write_h5_task(tmp_path / "t", shape=(6, 20, 20), classes=3)
    # images hold the labels themselves, so the oracle reads them off its input
    for f in (root / "volumes").iterdir():
        with h5py.File(f, "r+") as h:
            lab = h["label"][()]
            del h["image"]
            h.create_dataset("image", data=lab.astype(np.float32))
    cfg = from_dict(SegmentationConfig, {"data": {"tasks": [{"name": "t", "path": str(root)}], "patch_size": [4, 8, 8],
                                                  "preprocess": {"normalize": "none"}}})
    run = S.SegmentationRecipe(cfg, tmp_path / "run", DistributedContext.from_env(torch.device("cpu")))
    result = S.score_volumes(_Oracle(None, 3), run.test_set, run, tasks=[0], hd95=True)[0]
    assert result["dice"] == pytest.approx(1.0) and result["dice_1"] == 1.0 and result["dice_2"] == 1.0
    assert result["hd95"] == pytest.approx(0.0)


def _block_task(root: Path, spacing) -> Path:
    """Binary volumes (6, 20, 20) whose foreground block starts and ends on even in-plane indices,
    so halving H and W (bilinear, align_corners=False) keeps it exactly; images are the labels."""
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    for p in range(4):
        label = np.zeros((6, 20, 20), np.uint8)
        label[1:5, 2 + 2 * p : 10 + 2 * p, 4:14] = 1
        with h5py.File(root / "volumes" / f"patient{p:03d}.h5", "w") as h:
            h.create_dataset("image", data=label.astype(np.float32))
            h.create_dataset("label", data=label)
            h["image"].attrs["spacing"] = spacing
    return root


class _Empty(torch.nn.Module):
    """A 'network' that predicts background everywhere (every structure missed)."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        out[:, 0] = 1.0
        return out


def test_evaluation_on_the_original_grid_in_mm_with_misses_counted(tmp_path):
    spacing = [4.0, 0.75, 0.75]
    root = _block_task(tmp_path / "t", spacing)
    cfg = from_dict(SegmentationConfig, {"data": {"tasks": [{"name": "t", "path": str(root), "num_classes": 2}],
                                                  "patch_size": [4, 8, 8], "split": [0.5, 0.25, 0.25],
                                                  "preprocess": {"normalize": "none", "scale": [1.0, 0.5, 0.5]}}})
    run = S.SegmentationRecipe(cfg, tmp_path / "run", DistributedContext.from_env(torch.device("cpu")))
    image, label, _, _, meta = run.test_set[0]
    assert tuple(label.shape) == (6, 10, 10) and tuple(meta["original_shape"]) == (6, 20, 20)
    assert tuple(meta["original_spacing"]) == tuple(spacing)
    assert run.test_set.original_label(0).shape == (6, 20, 20)
    # the oracle predicts on the halved grid; its logits resampled back give the original label exactly
    result = S.score_volumes(_Oracle(None, 2), run.test_set, run, hd95=True)[0]
    assert result["dice"] == 1.0 and result["hd95"] == 0.0
    assert result["missed"] == 0 and result["spurious"] == 0 and result["cases"] == 1
    pred = S.predict_case(_Oracle(None, 2), image, 0, run, (6, 20, 20))
    np.testing.assert_array_equal(pred, run.test_set.original_label(0))
    # a network that finds nothing: the structure is missed in the one test case, Dice 0 and HD95
    # the original image's diagonal in mm (not dropped, not in voxels of the halved grid)
    empty = S.score_volumes(_Empty(), run.test_set, run, hd95=True)[0]
    assert empty["missed"] == empty["missed_1"] == 1 and empty["spurious"] == 0
    assert empty["dice"] == 0.0
    assert empty["hd95"] == pytest.approx(np.sqrt((6 * 4.0) ** 2 + 2 * (20 * 0.75) ** 2), rel=1e-6)


class _Background(torch.nn.Module):
    """Predicts background everywhere, with ``classes`` output channels."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.classes, *x.shape[2:])
        out[:, 0] = 1.0
        return out


def test_a_class_absent_from_every_case_does_not_count_as_a_perfect_dice(tmp_path):
    """Issue 31: a class no test case holds and no prediction makes is left out of the mean
    (MONAI's DiceMetric(ignore_empty=True)), not counted as Dice 1 lifting it."""
    root = _block_task(tmp_path / "t", [1.0, 1.0, 1.0])  # labels hold 0 and 1 only
    cfg = from_dict(SegmentationConfig, {"data": {"tasks": [{"name": "t", "path": str(root), "num_classes": 3}],
                                                  "patch_size": [4, 8, 8], "split": [0.5, 0.25, 0.25],
                                                  "preprocess": {"normalize": "none"}}})
    run = S.SegmentationRecipe(cfg, tmp_path / "run", DistributedContext.from_env(torch.device("cpu")))
    keep = {}
    result = S.score_volumes(_Background(3), run.test_set, run, keep=keep)[0]
    assert result["dice_1"] == 0.0 and np.isnan(result["dice_2"])  # class 2: in no label, in no prediction
    assert result["dice"] == 0.0  # not (0 + 1) / 2
    assert np.isnan(keep[0]["dice"][:, 1]).all()
    perfect = S.score_volumes(_Oracle(None, 3), run.test_set, run)[0]
    assert perfect["dice"] == 1.0 and np.isnan(perfect["dice_2"])
    pre = S.expert_card(run, 0)["preprocessing"]  # the card says exactly what normalisation is applied
    assert pre["normalize"] == "none" and pre["normalize_per"] == "channel" and "no intensity" in pre["normalize_detail"]


def test_card_geometry_of_a_nifti_task_sliced_in_2d(tmp_path):
    # an MSD task stored LPS with 3 mm slices on its last axis: read as SPL, sliced along axis 0 (axial)
    root = tmp_path / "msd"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    affine = np.diag([-0.8, -0.8, 3.0, 1.0])  # L, P, S
    training = []
    for i in range(4):
        image, label = blob_case((12, 10, 6), 2, i)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"c{i}.nii.gz")
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x"}, "training": training}))
    cfg = from_dict(SegmentationConfig, {"data": {"tasks": [{"name": "n", "path": str(root), "format": "msd"}],
                                                  "patch_size": [8, 6], "split": [0.5, 0.25, 0.25]}})
    run = S.SegmentationRecipe(cfg, tmp_path / "run", DistributedContext.from_env(torch.device("cpu")))
    card = S.expert_card(run, 0)
    assert card["orientation"] == "SPL" and card["axis_order"] == ["S", "P", "L"]
    assert card["slice_axis"] == 0 and card["slice_mode"] is True
    assert card["spacing"] == pytest.approx([3.0, 0.8, 0.8])
    _, label, _, _, meta = run.test_set[0]
    assert tuple(label.shape) == (6, 10, 12) and tuple(meta["original_spacing"]) == pytest.approx((3.0, 0.8, 0.8))


class _Stop(Exception):
    pass


def test_augmented_training_resumes_exactly(tmp_path):
    root = write_h5_task(tmp_path / "t", shape=(6, 16, 16), classes=2, patients=4, frames=1)
    net = {"arch": "unet", "channels": [4, 8], "features": 4}
    stage = {"epochs": 2, "batch_size": 4, "checkpoint_every": 1, "optim": {"name": "adamw", "lr": 0.01}}
    cfg = from_dict(SegmentationConfig, {
        "data": {"tasks": [{"name": "t", "path": str(root)}], "patch_size": [4, 8, 8], "samples_per_epoch": 8,
                 "split": [0.5, 0.25, 0.25], "augment": {"intensity": 1.0, "affine": 1.0}},
        "teacher": {"net": net, "train": stage}})
    assert cfg.data.augment.enabled  # on by default; the test makes every kind fire
    ctx = DistributedContext.from_env(torch.device("cpu"))

    def train(out: Path, resume: bool = False, stop_after: int = 0) -> dict:
        run = S.SegmentationRecipe(cfg, out, ctx, resume=resume, progress=False)
        assert run.train_set.augment is not None
        model = run.network(cfg.teacher.net, run.num_classes)
        objective = run.objective(Distill(kd_weight=0.0))
        calls = {"n": 0}

        def stopping(*args):
            calls["n"] += 1
            if stop_after and calls["n"] > stop_after:
                raise _Stop
            return objective(*args)

        run.fit(model, cfg.teacher.train, out / "teacher", stopping)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    whole = train(tmp_path / "a")
    with pytest.raises(_Stop):  # 2 steps per epoch: dies in epoch 1 after 3 steps (latest.pt at step 3)
        train(tmp_path / "b", stop_after=3)
    resumed = train(tmp_path / "b", resume=True)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_sliding_window_shapes_3d_2d_and_slices():
    model = lambda x: torch.cat([x, -x], 1)  # noqa: E731  [n, 1, *roi] -> [n, 2, *roi]
    vol = torch.randn(1, 7, 13, 11)
    out = sliding_window_logits(model, vol, (4, 8, 8), overlap=0.25)
    assert out.shape == (2, 7, 13, 11)
    torch.testing.assert_close(out[0], vol[0])
    out = sliding_window_logits(model, vol, (8, 8))  # slices along the first axis through a 2D "net"
    assert out.shape == (2, 7, 13, 11)
    torch.testing.assert_close(out[1], -vol[0])
    with pytest.raises(ValueError, match="does not fit"):
        sliding_window_logits(model, torch.randn(1, 5), (4, 4))


# ------------------------------------------------------------------ CLI end to end
def test_cli_run_3d_then_predict_nifti_and_h5(tmp_path, capsys):
    a = write_h5_task(tmp_path / "a", shape=(8, 24, 24), classes=3)
    b = write_h5_task(tmp_path / "b", shape=(8, 20, 20), classes=2)
    cfg_data = tiny_config([{"name": "a", "path": str(a), "num_classes": 3}, {"name": "b", "path": str(b)}], [4, 8, 8],
                           baselines={"run": ["stl"]})
    cfg_data["student"]["distill"] = {"feat_weight": 1.0}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(cfg_data))
    out = tmp_path / "run"
    assert run_cli("run", cfg, "--out", out, "--no-progress") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_kind"] == "segmentation" and metrics["primary_metric"] == "dice"
    assert metrics["metric_keys"] == ["dice", "hd95"]
    assert set(metrics["tasks"]["a"]) == {"teacher", "student", "expert", "stl"}
    a_m = metrics["tasks"]["a"]
    assert {"dice", "dice_1", "dice_2", "hd95", "missed", "spurious", "missed_2", "cases"} <= set(a_m["expert"])
    assert a_m["expert"]["dice"] == pytest.approx(a_m["student"]["dice"], abs=1e-6)
    assert (out / "split_a.json").is_file() and (out / "report.md").is_file()
    assert "Missed / spurious structures" in (out / "report.md").read_text()
    diffs = metrics["statistics"]["differences"]["a"]  # per-case Dice bootstrapped
    assert diffs["expert - best baseline"]["baseline"] == "stl" and (out / "predictions_test.npz").is_file()
    card = json.loads((out / "experts" / "a" / "card.json").read_text())
    assert card["task_kind"] == "segmentation" and card["classes"] == 3 and card["patch_size"] == [4, 8, 8]
    assert card["orientation"] is None and card["axis_order"] == ["axis0", "axis1", "axis2"]
    assert card["slice_axis"] is None and card["spacing"] == [1.0, 1.0, 1.0]
    capsys.readouterr()

    # a NIfTI volume with a non-trivial affine, and an HDF5 volume
    image, _ = blob_case((9, 22, 21), 3, 99)
    affine = np.diag([1.5, 0.8, 0.8, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "vol.nii.gz"))
    with h5py.File(tmp_path / "other.h5", "w") as h:
        h.create_dataset("image", data=image)
    masks = tmp_path / "masks"
    assert run_cli("predict", out / "experts" / "a", tmp_path / "vol.nii.gz", tmp_path / "other.h5", "--output", masks) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["input"] for r in rows] == [str(tmp_path / "vol.nii.gz"), str(tmp_path / "other.h5")]
    written = nib.load(str(masks / "vol_mask.nii.gz"))
    assert written.shape == image.shape and np.allclose(written.affine, affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    assert written.get_data_dtype() == np.uint8 and written.header.get_zooms()[:3] == (1.5, 0.8, 0.8)
    from_h5 = nib.load(str(masks / "other_mask.nii.gz"))
    assert from_h5.shape == image.shape and np.allclose(from_h5.affine, np.eye(4))


@pytest.fixture(scope="module")
def png_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(data folder, run folder)`` of a tiny 2D run on a folder task of 0/255 PNG masks."""
    tmp = tmp_path_factory.mktemp("png_run")
    root = write_png_task(tmp / "pngs", n=8)
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config([{"name": "polyp", "path": str(root), "format": "folder"}], [16, 16],
                                              evaluate={"latency_repeats": 1, "hd95": False})))
    assert run_cli("run", cfg, "--out", tmp / "run", "--no-progress") == 0
    return root, tmp / "run"


def test_cli_run_2d_folder_then_predict_png(png_run, tmp_path, capsys):
    root, out = png_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric_keys"] == ["dice"] and 0.0 <= metrics["tasks"]["polyp"]["expert"]["dice"] <= 1.0
    capsys.readouterr()
    rows = predict_masks(out / "experts" / "polyp", [root / "images" / "case0.png"], tmp_path / "m", class_indices=True)
    mask = np.asarray(Image.open(tmp_path / "m" / "case0_mask.png"))
    assert mask.shape == (24, 24) and set(np.unique(mask)) <= {0, 1} and rows[0]["shape"] == "24x24"


def test_predicted_masks_of_a_0_255_folder_task_hold_0_and_255(png_run, tmp_path, capsys):
    root, out = png_run
    expert = out / "experts" / "polyp"
    card = json.loads((expert / "card.json").read_text())
    assert card["label_values"] == [0, 255]  # class k was the mask value label_values[k]
    images = [root / "images" / f"case{i}.png" for i in range(8)]
    predict_masks(expert, images, tmp_path / "values")
    predict_masks(expert, images, tmp_path / "indices", class_indices=True)
    capsys.readouterr()
    for i in range(8):
        values = np.asarray(Image.open(tmp_path / "values" / f"case{i}_mask.png"))
        indices = np.asarray(Image.open(tmp_path / "indices" / f"case{i}_mask.png"))
        assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 255}
        assert np.array_equal(values, np.array([0, 255], np.uint8)[indices])


def test_card_label_values_of_an_hdf5_task_and_of_masks_with_too_few_values(tmp_path, caplog):
    root = write_h5_task(tmp_path / "h", shape=(4, 12, 12), classes=3, patients=4, frames=1)
    cfg = from_dict(SegmentationConfig, {"data": {"tasks": [{"name": "h", "path": str(root)}], "patch_size": [4, 8, 8],
                                                  "split": [0.5, 0.25, 0.25]}})
    run = S.SegmentationRecipe(cfg, tmp_path / "run", DistributedContext.from_env(torch.device("cpu")))
    assert S.expert_card(run, 0)["label_values"] == [0, 1, 2]
    pngs = write_png_task(tmp_path / "p", n=4)  # 0/255 masks read as 3 classes: no value for class 2
    cfg = from_dict(SegmentationConfig, {"data": {"tasks": [{"name": "p", "path": str(pngs), "format": "folder",
                                                             "num_classes": 3}],
                                                  "patch_size": [8, 8], "split": [0.5, 0.25, 0.25]}})
    run = S.SegmentationRecipe(cfg, tmp_path / "run2", DistributedContext.from_env(torch.device("cpu")))
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        assert S.expert_card(run, 0)["label_values"] is None
    assert "task p: its masks hold 2 values [0, 255] for 3 classes; lorkd predict writes its masks as class " \
           "indices 0..2" in caplog.text


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_run_3d_under_torchrun_with_two_processes(tmp_path):
    a = write_h5_task(tmp_path / "a", shape=(8, 24, 24), classes=3)
    b = write_h5_task(tmp_path / "b", shape=(8, 20, 20), classes=2)
    cfg_data = tiny_config([{"name": "a", "path": str(a), "num_classes": 3}, {"name": "b", "path": str(b)}], [4, 8, 8],
                           baselines={"run": ["stl"]})
    cfg_data["data"]["samples_per_epoch"] = 16  # 2 steps of 4 on each of 2 ranks
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(cfg_data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "lorkd.cli", "run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["tasks"]["b"]) == {"teacher", "student", "expert", "stl"}
