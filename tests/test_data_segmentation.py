"""Tests of lorkd.data.segmentation: patient splits, tasks, preprocessing, patch/volume datasets."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import lorkd.data.segmentation as seg
import lorkd.data.segmentation.cache as seg_cache
from lorkd.data.paths import shared_data_dir
from lorkd.data.segmentation import (
    Case,
    CaseRef,
    PatchDataset,
    Preprocess,
    SegmentationTaskData,
    VolumeCache,
    VolumeDataset,
    apply_split,
    load_segmentation_task,
    load_split,
    normalize_intensity,
    preprocess_case,
    resize_case,
    save_split,
    split_cases,
)
from lorkd.errors import ConfigError, DataError


def write_h5(path: Path, image, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)


def blob_volume(shape=(32, 32, 32), lo=12, hi=20, channels=None, seed=0):
    """Noise image with a foreground cube ``[lo:hi]^n`` of class 1 (and a class-2 corner voxel row)."""
    rng = np.random.default_rng(seed)
    img = rng.random(shape if channels is None else (channels,) + shape, dtype=np.float32) + 1.0
    lab = np.zeros(shape, np.uint8)
    lab[tuple(slice(lo, hi) for _ in shape)] = 1
    return img, lab


def make_task_folder(root: Path, n_patients=5, frames=2, shape=(32, 32, 32), channels=None):
    for p in range(n_patients):
        for f in range(frames):
            img, lab = blob_volume(shape, channels=channels, seed=10 * p + f)
            write_h5(root / "volumes" / f"patient{p:03d}_frame{f + 1:02d}.h5", img, lab)
    return root


def refs(n_patients, frames=2):
    return [CaseRef(f"p{p:02d}_frame{f}", f"p{p:02d}", "x", "x", "hdf5")
            for p in range(n_patients) for f in range(frames)]


# ------------------------------------------------------------------ splits


def test_split_by_patient_deterministic_order_free():
    items = refs(10, frames=3)
    a = split_cases(items, seed=3)
    b = split_cases(list(reversed(items)), seed=3)
    assert list(a) == ["train", "val", "test"]
    assert {k: [r.case_id for r in v] for k, v in a.items()} == {k: [r.case_id for r in v] for k, v in b.items()}
    pats = {k: {r.patient_id for r in v} for k, v in a.items()}
    assert [len(pats[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    assert sum(len(v) for v in a.values()) == 30
    others = [split_cases(items, seed=s) for s in range(4, 9)]
    assert any({r.patient_id for r in o["test"]} != pats["test"] for o in others)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), frames=st.integers(1, 3), seed=st.integers(0, 1000))
def test_split_properties(n, frames, seed):
    items = refs(n, frames)
    out = split_cases(items, (0.7, 0.3), seed=seed)
    assert set(out) == {"train", "test"}
    ids = [r.case_id for v in out.values() for r in v]
    assert sorted(ids) == sorted(r.case_id for r in items)
    assert not ({r.patient_id for r in out["train"]} & {r.patient_id for r in out["test"]})
    if n >= 2:
        assert out["test"] and out["train"]


def test_split_counts_and_errors():
    items = refs(10)
    out = split_cases(items, counts=(5, None, 2), seed=0)
    assert [len({r.patient_id for r in v}) for v in out.values()] == [5, 3, 2]
    out = split_cases(items, counts={"a": 4, "b": 6})
    assert list(out) == ["a", "b"]
    with pytest.raises(ConfigError, match="add up"):
        split_cases(items, counts=(3, 3))
    with pytest.raises(ConfigError, match="add up to 1"):
        split_cases(items, (0.5, 0.2))
    with pytest.raises(ConfigError, match="names"):
        split_cases(items, (0.25,) * 4)
    with pytest.raises(ConfigError, match="non-negative"):
        split_cases(items, (1.5, -0.5))


def test_save_load_apply_split(tmp_path):
    items = refs(6)
    split = split_cases(items, seed=1)
    path = save_split(split, tmp_path / "run" / "split.json")
    loaded = load_split(path)
    assert loaded == {k: [r.case_id for r in v] for k, v in split.items()}
    assert apply_split(items, loaded) == split
    with pytest.raises(DataError, match="unknown case id"):
        apply_split(items, {"train": ["zzz"]})
    (tmp_path / "dup.json").write_text(json.dumps({"train": ["a"], "test": ["a"]}))
    with pytest.raises(DataError, match="'a' is in both"):
        load_split(tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(DataError, match="bad.json"):
        load_split(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path / "none.json")


# ------------------------------------------------------------------ tasks


def test_load_task_hdf5_infers_classes_and_splits(tmp_path):
    root = make_task_folder(tmp_path / "t", n_patients=5)
    task = load_segmentation_task("toy", root, seed=0)
    assert (task.num_classes, task.in_channels, task.spatial_dims) == (2, 1, 3)
    assert [len(task.cases(s)) for s in ("train", "val", "test")] == [6, 2, 2]
    assert all(r.num_classes == 2 for r in task.cases("train"))
    path = task.save_split(tmp_path / "out" / "split.json")
    again = load_segmentation_task("toy", root, num_classes=3, split=path)
    assert again.split_ids() == task.split_ids() and again.num_classes == 3
    counted = load_segmentation_task("toy", root, split=(3, 2))
    assert [len(v) for v in counted.splits.values()] == [6, 4]
    fr = load_segmentation_task("toy", root, split={"train": 0.8, "test": 0.2})
    assert list(fr.splits) == ["train", "test"]
    with pytest.raises(ConfigError, match="format"):
        load_segmentation_task("toy", root, format="dicom")
    with pytest.raises(ConfigError, match="no split 'val'"):
        fr.cases("val")


def test_load_task_msd_and_folder(tmp_path):
    msd = tmp_path / "msd"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    training = []
    for i in range(3):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 3, 2), np.float32), aff), msd / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.uint8), aff), msd / "labelsTr" / f"c{i}.nii.gz")
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a", "2": "b"}, "training": training}))
    task = load_segmentation_task("m", msd, format="msd", split=(0.67, 0.33))
    assert (task.num_classes, task.in_channels, task.spatial_dims) == (3, 2, 3)
    folder = tmp_path / "png"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(4):
        Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(folder / "images" / f"i{i}.png")
        Image.fromarray(np.where(np.arange(48).reshape(6, 8) % 3 == 0, 255, 0).astype(np.uint8)).save(
            folder / "masks" / f"i{i}_mask.png")
    task = load_segmentation_task("p", folder, format="folder")
    assert (task.num_classes, task.in_channels, task.spatial_dims) == (2, 3, 2)


def test_load_task_mixed_channels_error(tmp_path):
    root = tmp_path / "t"
    write_h5(root / "volumes" / "a.h5", np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), np.uint8))
    write_h5(root / "volumes" / "b.h5", np.zeros((2, 4, 4), np.float32), np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="channel count"):
        load_segmentation_task("t", root, num_classes=2)


# ------------------------------------------------------------------ preprocessing


def test_normalize_modes():
    rng = np.random.default_rng(0)
    img = (rng.random((2, 5, 6, 7)) * 10 + 3).astype(np.float32)
    img[1, :2] = 0
    z = normalize_intensity(img, "zscore")
    np.testing.assert_allclose(z.reshape(2, -1).mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(z.reshape(2, -1).std(1), 1, atol=1e-4)
    nz = normalize_intensity(img, "zscore_nonzero")
    assert np.all(nz[1, :2] == 0)
    vals = nz[1][img[1] != 0]
    assert abs(vals.mean()) < 1e-5 and abs(vals.std() - 1) < 1e-4
    mm = normalize_intensity(img, "minmax")
    assert mm.min() == 0 and mm.max() == pytest.approx(1.0)
    const = normalize_intensity(np.full((1, 3, 3), 5.0, np.float32), "zscore")
    assert np.all(const == 0)
    with pytest.raises(ConfigError, match="normalize"):
        Preprocess(normalize="robust")
    with pytest.raises(ConfigError, match="at most one"):
        Preprocess(scale=0.5, target_shape=(4, 4, 4))
    with pytest.raises(ConfigError, match="scale"):
        Preprocess(scale=0)


def _case(shape, spacing=None, affine=None, channels=1):
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, shape).astype(np.int64)
    img = rng.random((channels,) + tuple(shape), dtype=np.float32)
    return Case("c", "p", img, lab, spacing or (1.0,) * len(shape), affine, "src")


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(2, 12), min_size=2, max_size=3), scale=st.sampled_from([0.5, 0.75, 1.0, 2.0]))
def test_resample_shapes_and_labels(shape, scale):
    case = _case(tuple(shape), channels=2)
    out, meta = preprocess_case(case, Preprocess(normalize="none", scale=scale))
    expect = tuple(max(1, round(s * scale)) for s in shape)
    assert out.image.shape == (2,) + expect and out.label.shape == expect
    assert out.image.dtype == np.float32 and out.label.dtype == np.int64
    assert set(np.unique(out.label)) <= set(np.unique(case.label))
    assert meta["original_shape"] == tuple(shape)
    assert out.spacing == pytest.approx(tuple(s / e for s, e in zip(shape, expect)))


def test_resample_round_trip_to_the_original_grid():
    # a linear ramp along each axis, halved then resampled back to the original shape: the centres
    # of both grids line up (align_corners=False), so the interior comes back exactly
    ramp = np.arange(20, dtype=np.float32)
    case = Case("c", "p", np.broadcast_to(ramp, (1, 6, 20))[None, 0].copy(), np.zeros((6, 20), np.int64),
                (2.0, 0.5), None, "src")
    small, meta = preprocess_case(case, Preprocess(normalize="none", scale=(1.0, 0.5)))
    assert small.spacing == (2.0, 1.0) and meta["original_spacing"] == (2.0, 0.5)
    back = seg.resample(torch.from_numpy(small.image), meta["original_shape"]).numpy()
    assert back.shape == (1, 6, 20)
    np.testing.assert_allclose(back[0, :, 1:-1], case.image[0, :, 1:-1], atol=1e-5)
    # class-wise logits of a label halved in plane (nearest) and resampled back (bilinear) give the label
    # again (halving all three axes would lose the cube corners: trilinear weight 0.75**3 < 0.5)
    label = np.zeros((8, 12, 16), np.int64)
    label[2:6, 4:10, 2:8] = 1
    label[2:6, 4:10, 8:14] = 2
    down, meta = preprocess_case(Case("c", "p", np.zeros((1, 8, 12, 16), np.float32), label, (1.0,) * 3, None, "s"),
                                 Preprocess(normalize="none", scale=(1.0, 0.5, 0.5)))
    logits = torch.nn.functional.one_hot(torch.from_numpy(down.label), 3).movedim(-1, 0).float()
    up = seg.resample(logits, meta["original_shape"]).argmax(0).numpy()
    np.testing.assert_array_equal(up, label)
    with pytest.raises(ConfigError, match="4 spatial"):
        seg.resample(torch.zeros(1, 2, 2, 2, 2), (3, 3, 3, 3))


def test_patches_augmented_deterministically_image_and_label_together():
    from lorkd.data.augment import Augment

    task = toy_task("a")
    plain = PatchDataset([task], patch_size=(8, 8, 8), samples_per_epoch=6, preprocess=NONE, seed=3)
    aug = PatchDataset([task], patch_size=(8, 8, 8), samples_per_epoch=6, preprocess=NONE, seed=3,
                       augment=Augment(flip=0.5, affine=1.0, intensity=0.0))
    again = PatchDataset([task], patch_size=(8, 8, 8), samples_per_epoch=6, preprocess=NONE, seed=3,
                         augment=Augment(flip=0.5, affine=1.0, intensity=0.0))
    for ds in (aug, again):
        ds.set_epoch(2)
    changed = 0
    for i in range(6):
        x, y, t = aug[i]
        x2, y2, _ = again[i]
        assert torch.equal(x, x2) and torch.equal(y, y2)  # same (seed, epoch, index): same patch
        assert x.shape == (1, 8, 8, 8) and y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 1}
        plain.set_epoch(2)
        changed += not torch.equal(y, plain[i][1])
    assert changed >= 3
    aug.set_epoch(3)
    assert not all(torch.equal(aug[i][0], again[i][0]) for i in range(6))


def test_target_spacing_shape_and_affine():
    aff = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.0], [0, 0, 0, 1]])
    case = _case((8, 10, 6), spacing=(2.0, 1.5, 3.0), affine=aff)
    out, meta = preprocess_case(case, Preprocess(target_spacing=(4.0, None, 1.5)))
    assert out.label.shape == (4, 10, 12) and out.spacing == pytest.approx((4.0, 1.5, 1.5))
    # the centre of new voxel j sits at old continuous index r*j + (r-1)/2
    r = np.array([8 / 4, 1.0, 6 / 12])
    j = np.array([1.0, 3.0, 5.0])
    old = r * j + (r - 1) / 2
    np.testing.assert_allclose(out.affine @ np.append(j, 1), aff @ np.append(old, 1))
    np.testing.assert_allclose(case.affine, aff)  # input untouched
    assert meta["affine"] is out.affine and meta["original_spacing"] == (2.0, 1.5, 3.0)
    out, _ = preprocess_case(case, Preprocess(target_shape=(None, 5, 3)))
    assert out.label.shape == (8, 5, 3)
    with pytest.raises(ConfigError, match="entries"):
        preprocess_case(case, Preprocess(scale=(0.5, 0.5)))
    assert resize_case(case, (8, 10, 6)) is case


# ------------------------------------------------------------------ datasets


def toy_task(name, shape=(32, 32, 32), n=3, channels=1, num_classes=2, lo=12, hi=20):
    splits = {"train": [], "test": []}
    cases = []
    for i in range(n):
        img, lab = blob_volume(shape, lo, hi, channels=None if channels == 1 else channels, seed=i)
        img = img if channels > 1 else img[None]
        cases.append(Case(f"{name}{i}", f"{name}{i}", img, lab.astype(np.int64), (1.0,) * len(shape), None, "mem"))
    splits["train"], splits["test"] = cases[:-1] or cases, cases[-1:]
    return SegmentationTaskData(name, num_classes, channels, len(shape), splits)


NONE = Preprocess(normalize="none")


def test_patch_shapes_tasks_and_channels():
    a = toy_task("a", channels=1)
    b = toy_task("b", shape=(6, 20, 20), channels=2, lo=2, hi=4)
    ds = PatchDataset([a, b], patch_size=(8, 16, 16), samples_per_epoch=8, preprocess=NONE)
    assert len(ds) == 8 and ds.in_channels == 2
    tids = []
    for i in range(len(ds)):
        x, y, t = ds[i]
        assert x.shape == (2, 8, 16, 16) and x.dtype == torch.float32
        assert y.shape == (8, 16, 16) and y.dtype == torch.int64
        tids.append(t)
        if t == 0:
            assert torch.all(x[1] == 0)  # zero-filled channel
        else:  # volume depth 6 < 8: centred padding, one slice each side
            assert torch.all(x[:, 0] == 0) and torch.all(x[:, 7] == 0) and torch.all(x[:, 1:7] >= 1)
    assert tids == [0, 1] * 4
    rep = PatchDataset([a, b], patch_size=(8, 16, 16), samples_per_epoch=2, preprocess=NONE, channel_fill="repeat")
    x, _, _ = rep[0]
    assert torch.equal(x[0], x[1])
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    xb, yb, tb = next(iter(loader))
    assert xb.shape == (4, 2, 8, 16, 16) and tb.tolist() == [0, 1, 0, 1]
    with pytest.raises(ConfigError, match="patch_size"):
        PatchDataset([a], patch_size=(8,))
    with pytest.raises(ConfigError, match="in_channels"):
        PatchDataset([a, b], patch_size=(8, 8, 8), in_channels=1)
    with pytest.raises(ConfigError, match="no split"):
        PatchDataset([a], patch_size=(8, 8, 8), split="val")


def test_patch_2d_tasks_and_slices():
    flat = toy_task("f", shape=(40, 30), channels=3)
    vol = toy_task("v", shape=(10, 40, 30))
    ds = PatchDataset([flat, vol], patch_size=(16, 16), samples_per_epoch=6, preprocess=NONE)
    for i in range(6):
        x, y, t = ds[i]
        assert x.shape == (3, 16, 16) and y.shape == (16, 16)
    assert ds.slice_mode == [False, True]


def _centre_fg_fraction(ds):
    c = tuple(p // 2 for p in ds.patch_size)
    return np.mean([bool(ds[i][1][c] > 0) for i in range(len(ds))])


def test_foreground_ratio():
    task = toy_task("a", shape=(32, 32, 32))  # fg cube 8^3 in the middle: 1.6 % of voxels
    kw = dict(patch_size=(8, 8, 8), samples_per_epoch=300, preprocess=NONE, cache=VolumeCache())
    assert _centre_fg_fraction(PatchDataset([task], foreground_ratio=1.0, **kw)) == 1.0
    half = _centre_fg_fraction(PatchDataset([task], foreground_ratio=0.5, **kw))
    assert 0.4 < half < 0.62
    assert _centre_fg_fraction(PatchDataset([task], foreground_ratio=0.0, **kw)) < 0.08


def test_patch_sampling_deterministic_per_epoch():
    task = toy_task("a")
    ds = PatchDataset([task], patch_size=(8, 8, 8), samples_per_epoch=4, preprocess=NONE)
    first = [ds[i][0] for i in range(4)]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))
    ds.set_epoch(1)
    assert not all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))


def test_cache_reads_each_case_once(tmp_path, monkeypatch):
    root = make_task_folder(tmp_path / "t", n_patients=3, frames=1, shape=(12, 20, 20))
    task = load_segmentation_task("t", root, num_classes=2, split={"train": 1.0})
    calls = []
    real = seg.load_case
    monkeypatch.setattr(seg_cache, "load_case", lambda ref: calls.append(ref.case_id) or real(ref))
    ds = PatchDataset([task], patch_size=(8, 8, 8), samples_per_epoch=30,
                      preprocess=Preprocess(scale=(1.0, 0.5, 0.5)))
    for epoch in range(2):
        ds.set_epoch(epoch)
        for x, y, t in torch.utils.data.DataLoader(ds, batch_size=10):
            assert x.shape == (10, 1, 8, 8, 8)
    assert sorted(calls) == sorted(r.case_id for r in task.cases("train"))
    assert ds.cache.loads == 3
    vds = VolumeDataset([task], split="train", preprocess=Preprocess(scale=(1.0, 0.5, 0.5)), cache=ds.cache)
    _ = [vds[i] for i in range(len(vds))]
    assert len(calls) == 3


def test_volume_dataset_items(tmp_path):
    root = make_task_folder(tmp_path / "t", n_patients=2, frames=2, shape=(6, 10, 12))
    task = load_segmentation_task("t", root, num_classes=2, split=(1, 1))
    two = toy_task("two", shape=(6, 10, 12), channels=2)
    ds = VolumeDataset([task, two], split="test", preprocess=Preprocess(scale=0.5))
    assert len(ds) == 2 + 1 and ds.in_channels == 2
    items = list(torch.utils.data.DataLoader(ds, batch_size=None))
    image, label, t, case_id, meta = items[0]
    assert image.shape == (2, 3, 5, 6) and label.shape == (3, 5, 6) and label.dtype == torch.int64
    assert t == 0 and case_id in task.split_ids()["test"] and torch.all(image[1] == 0)
    # (DataLoader's default_convert turns tuples into lists)
    assert tuple(meta["original_shape"]) == (6, 10, 12) and tuple(meta["spacing"]) == (2.0, 2.0, 2.0)
    assert meta["affine"] is None and meta["task"] == "t" and meta["patient_id"] == case_id.split("_")[0]
    assert abs(float(image[0].mean())) < 0.1  # z-scored before resampling
    assert items[2][2] == 1 and items[2][3] == "two2"


@pytest.mark.realdata
def test_real_acdc_la_patches():
    data = shared_data_dir()
    if not (data / "acdc_sslmis_h5").is_dir() or not (data / "la2018_h5").is_dir():
        pytest.skip("real data missing")
    acdc = load_segmentation_task("acdc", "acdc_sslmis_h5", num_classes=4, seed=0)
    la = load_segmentation_task("la", "la2018_h5", num_classes=2, seed=0)
    for task in (acdc, la):
        pats = [{r.patient_id for r in task.cases(s)} for s in ("train", "val", "test")]
        assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])
    # one case per task keeps the test fast
    acdc.splits["train"], la.splits["train"] = acdc.splits["train"][:1], la.splits["train"][:1]
    pre = Preprocess(scale=(1.0, 0.5, 0.5))
    ds = PatchDataset([acdc, la], patch_size=(8, 32, 32), samples_per_epoch=6, preprocess=pre,
                      foreground_ratio=1.0)
    labels = {0: set(), 1: set()}
    for i in range(6):
        x, y, t = ds[i]
        assert x.shape == (1, 8, 32, 32) and y.shape == (8, 32, 32)
        labels[t] |= set(torch.unique(y).tolist())
    assert labels[0] <= {0, 1, 2, 3} and labels[1] <= {0, 1} and 1 in labels[1]


def test_load_task_split_specs(tmp_path):
    root = make_task_folder(tmp_path / "t", n_patients=5, frames=1, shape=(4, 4, 4))
    rest = load_segmentation_task("t", root, num_classes=2, split=(1, None, 1))
    assert [len(v) for v in rest.splits.values()] == [1, 3, 1]
    ids = load_segmentation_task("t", root, num_classes=2, split={"a": ["patient000_frame01"]})
    assert ids.split_ids() == {"a": ["patient000_frame01"]}
    with pytest.raises(ConfigError, match="fractions"):
        load_segmentation_task("t", root, num_classes=2, split=("x", "y"))
    with pytest.raises(ConfigError, match="cannot use split"):
        load_segmentation_task("t", root, num_classes=2, split=3)
