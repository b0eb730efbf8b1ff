"""Tests of lorkd.data.segmentation's readers: HDF5, MSD (NIfTI) and 2D image/mask readers and their errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from lorkd.data.paths import shared_data_dir
from lorkd.data.segmentation import (
    Case,
    CaseRef,
    default_patient_rule,
    load_case,
    load_label,
    probe_case,
    probe_spacing,
    read_hdf5_folder,
    read_image_mask_folder,
    load_segmentation_task,
    read_msd_folder,
    reorient,
)
from lorkd.errors import ConfigError, DataError

# ------------------------------------------------------------------ writers


def write_h5(path: Path, image: np.ndarray, label: np.ndarray, image_key="image", label_key="label"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if image is not None:
            f.create_dataset(image_key, data=image)
        if label is not None:
            f.create_dataset(label_key, data=label)


def toy_volume(shape=(4, 6, 5), seed=0, classes=4):
    rng = np.random.default_rng(seed)
    return rng.random(shape, dtype=np.float32), rng.integers(0, classes, shape).astype(np.uint8)


def make_h5_folder(root: Path, patients=("patient001", "patient002"), frames=("01", "02")):
    for i, p in enumerate(patients):
        for j, fr in enumerate(frames):
            img, lab = toy_volume(seed=10 * i + j)
            write_h5(root / "volumes" / f"{p}_frame{fr}.h5", img, lab)
    return root


AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.0], [0, 0, 0, 1]])


def make_msd(root: Path, n=3, channels=1, shape=(5, 6, 4), modality=None):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    rng = np.random.default_rng(0)
    for i in range(n):
        ishape = shape if channels == 1 else shape + (channels,)
        img = rng.random(ishape).astype(np.float32)
        lab = rng.integers(0, 3, shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(img, AFFINE), root / "imagesTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, AFFINE), root / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    meta = {
        "name": "toy",
        "modality": modality or {str(c): f"MR{c}" for c in range(channels)},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_png_folder(root: Path, n=3, rgb=False, size=(7, 9), mask_ext=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    h, w = size
    for i in range(n):
        arr = rng.integers(0, 256, (h, w, 3) if rgb else (h, w)).astype(np.uint8)
        Image.fromarray(arr).save(root / "images" / f"img{i}.png")
        mask = np.where(rng.random((h, w)) > 0.5, 255, 0).astype(np.uint8)
        Image.fromarray(mask).save(root / "masks" / f"img{i}_mask{mask_ext}")
    return root


def truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------ HDF5


def test_hdf5_reader_ids_patients_shapes(tmp_path):
    root = make_h5_folder(tmp_path)
    refs = read_hdf5_folder(root)
    assert [r.case_id for r in refs] == [
        "patient001_frame01", "patient001_frame02", "patient002_frame01", "patient002_frame02"]
    assert [r.patient_id for r in refs] == ["patient001"] * 2 + ["patient002"] * 2
    assert all(isinstance(r, CaseRef) for r in refs)
    case = load_case(refs[0])
    img, lab = toy_volume(seed=0)
    assert case.image.dtype == np.float32 and case.image.shape == (1, 4, 6, 5)
    assert case.label.dtype == np.int64 and case.label.shape == (4, 6, 5)
    np.testing.assert_array_equal(case.image[0], img)
    np.testing.assert_array_equal(case.label, lab)
    assert case.spacing == (1.0, 1.0, 1.0) and case.affine is None
    assert case.source.endswith("patient001_frame01.h5")
    assert probe_case(refs[0]) == (1, (4, 6, 5))
    eager = read_hdf5_folder(root, lazy=False)
    assert all(isinstance(c, Case) for c in eager) and eager[3].patient_id == "patient002"
    np.testing.assert_array_equal(load_label(refs[1]), eager[1].label)


def test_hdf5_channels_first_and_keys_and_rules(tmp_path):
    rng = np.random.default_rng(0)
    write_h5(tmp_path / "vols" / "A-x.h5", rng.random((2, 3, 4), dtype=np.float32),
             np.zeros((3, 4), np.uint8), image_key="img", label_key="seg")
    refs = read_hdf5_folder(tmp_path, volumes_subdir="vols", image_key="img", label_key="seg",
                            patient_rule=r"^(\w+)-")
    assert refs[0].patient_id == "A"
    case = load_case(refs[0])
    assert case.image.shape == (2, 3, 4) and case.label.shape == (3, 4) and case.spatial_dims == 2
    assert probe_case(refs[0]) == (2, (3, 4))
    refs = read_hdf5_folder(tmp_path, volumes_subdir="vols", patient_rule=lambda s: s.lower())
    assert refs[0].patient_id == "a-x"
    assert default_patient_rule("patient007_frame12") == "patient007"
    assert default_patient_rule("ULHWPW") == "ULHWPW"


def test_hdf5_missing_folder_and_no_cases(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_hdf5_folder(tmp_path / "nope")
    (tmp_path / "volumes").mkdir()
    (tmp_path / "volumes" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no cases"):
        read_hdf5_folder(tmp_path)


def test_hdf5_truncated_file(tmp_path):
    img, lab = toy_volume(shape=(8, 32, 32))
    write_h5(tmp_path / "volumes" / "p1.h5", img, lab)
    truncate(tmp_path / "volumes" / "p1.h5")
    refs = read_hdf5_folder(tmp_path)
    with pytest.raises(DataError, match=r"p1\.h5.*(corrupt|truncated)"):
        load_case(refs[0])
    with pytest.raises(DataError, match=r"p1\.h5"):
        read_hdf5_folder(tmp_path, lazy=False)


@pytest.mark.parametrize(
    "image,label,match",
    [
        (None, np.zeros((2, 3), np.uint8), "missing key 'image'"),
        (np.zeros((2, 3), np.float32), None, "missing key 'label'"),
        (np.zeros((2, 3), np.float32), np.zeros((2, 4), np.uint8), "shape"),
        (np.zeros((2, 3, 4, 5), np.float32), np.zeros((2, 3), np.uint8), "shape"),
        (np.zeros((2, 3), np.float32), np.full((2, 3), 0.5, np.float32), "non-integer"),
        (np.zeros((2, 3), np.float32), np.full((2, 3), -1, np.int16), "negative"),
        (np.full((2, 3), np.nan, np.float32), np.zeros((2, 3), np.uint8), "NaN"),
    ],
)
def test_hdf5_bad_fields(tmp_path, image, label, match):
    write_h5(tmp_path / "volumes" / "bad.h5", image, label)
    ref = read_hdf5_folder(tmp_path)[0]
    with pytest.raises(DataError, match=match) as info:
        load_case(ref)
    assert "bad.h5" in str(info.value)


def test_hdf5_label_above_num_classes(tmp_path):
    write_h5(tmp_path / "volumes" / "p.h5", np.zeros((2, 3), np.float32), np.full((2, 3), 4, np.uint8))
    ref = read_hdf5_folder(tmp_path, num_classes=4)[0]
    with pytest.raises(DataError, match=r"p\.h5.*'label'.*4 >= num_classes=4"):
        load_case(ref)
    with pytest.raises(DataError, match="num_classes"):
        load_label(ref)
    assert load_case(read_hdf5_folder(tmp_path, num_classes=5)[0]).label.max() == 4


def test_float_labels_with_integer_values_accepted(tmp_path):
    write_h5(tmp_path / "volumes" / "p.h5", np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32))
    assert load_case(read_hdf5_folder(tmp_path)[0]).label.dtype == np.int64


# ------------------------------------------------------------------ MSD


def test_msd_reader_reorients_to_spl_with_affine_and_spacing(tmp_path):
    # AFFINE: file axis 0 runs Anterior (2 mm), axis 1 to the Left (1.5 mm), axis 2 Superior (3 mm)
    root = make_msd(tmp_path / "Task01")
    refs = read_msd_folder(root)
    assert [r.case_id for r in refs] == ["case_000", "case_001", "case_002"]
    assert refs[0].num_classes == 3
    case = load_case(refs[1])
    assert case.orientation == "ALS"
    # S P L: the old axis 2, the old axis 0 flipped (A -> P), the old axis 1
    assert case.image.shape == (1, 4, 5, 6) and case.label.shape == (4, 5, 6)
    raw = np.asarray(nib.load(root / "labelsTr" / "case_001.nii.gz").dataobj)
    np.testing.assert_array_equal(case.label, raw.transpose(2, 0, 1)[:, ::-1, :])
    assert nib.aff2axcodes(case.affine) == ("S", "P", "L")
    assert case.spacing == pytest.approx((3.0, 2.0, 1.5))
    # every voxel keeps its world position
    i, j, k = 2, 3, 1
    np.testing.assert_allclose(case.affine @ [i, j, k, 1], AFFINE @ [4 - j, k, i, 1])
    assert case.label.dtype == np.int64 and set(np.unique(case.label)) <= {0, 1, 2}
    assert probe_case(refs[1]) == (1, (4, 5, 6))
    assert probe_spacing(refs[1]) == pytest.approx((3.0, 2.0, 1.5))


def test_msd_4d_image_becomes_channels(tmp_path):
    root = make_msd(tmp_path / "T", n=2, channels=2)
    case = read_msd_folder(root, lazy=False)[0]
    assert case.image.shape == (2, 4, 5, 6)
    raw = np.asarray(nib.load(root / "imagesTr" / "case_000.nii.gz").dataobj)
    np.testing.assert_allclose(case.image[1], reorient(raw[..., 1], AFFINE)[0])
    assert probe_case(read_msd_folder(root)[0]) == (2, (4, 5, 6))


@pytest.mark.parametrize("codes", ["LPS", "PIR", "RAS", "SPL"])
def test_orientation_round_trip_gives_the_file_geometry_back(tmp_path, codes):
    # a volume stored in `codes` order with anisotropic voxels comes back (array and affine) exactly
    from nibabel import orientations as nio

    base = np.diag([0.7, 0.9, 2.5, 1.0])
    base[:3, 3] = [-30.0, 12.0, 4.0]
    shape = (7, 6, 5)
    transform = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(codes)))
    affine = base @ nio.inv_ornt_aff(transform, shape)
    label = np.random.default_rng(3).integers(0, 3, shape).astype(np.uint8)
    stored = nio.apply_orientation(label, transform)
    assert "".join(nib.aff2axcodes(affine)) == codes
    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(stored.astype(np.float32), affine), root / "imagesTr" / "c.nii.gz")
    nib.save(nib.Nifti1Image(stored, affine), root / "labelsTr" / "c.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "b", "1": "x", "2": "y"},
                                                   "training": [{"image": "./imagesTr/c.nii.gz",
                                                                 "label": "./labelsTr/c.nii.gz"}]}))
    case = read_msd_folder(root, lazy=False)[0]
    assert case.orientation == codes
    assert nib.aff2axcodes(case.affine) == ("S", "P", "L")
    canonical, canonical_affine, was = reorient(label, base, "SPL")  # the RAS volume it was made from, as SPL
    assert was == "RAS"
    np.testing.assert_array_equal(case.label, canonical)
    np.testing.assert_allclose(case.affine, canonical_affine)
    assert case.spacing == pytest.approx((2.5, 0.9, 0.7))
    back, back_affine, now = reorient(case.label, case.affine, case.orientation)
    assert now == "SPL"
    np.testing.assert_array_equal(back, stored)
    np.testing.assert_allclose(back_affine, affine)
    with pytest.raises(DataError, match="3D"):
        reorient(label[0], affine)


def test_msd_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_msd_folder(tmp_path / "none")
    root = make_msd(tmp_path / "T", n=2)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text("{bad json")
    with pytest.raises(DataError, match="dataset.json"):
        read_msd_folder(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {}}))
    with pytest.raises(DataError, match="'training'"):
        read_msd_folder(root)
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/case_000.nii.gz"}]}))
    with pytest.raises(DataError, match=r"training\[0\]\.label"):
        read_msd_folder(root)
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/x.nii.gz", "label": "./l.nii.gz"}]}))
    with pytest.raises(DataError, match="x.nii.gz"):
        read_msd_folder(root)
    (root / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="no cases"):
        read_msd_folder(root)
    meta["modality"] = {"0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="modality"):
        read_msd_folder(root, lazy=False)
    meta["modality"] = {"0": "T1"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"case_000.*num_classes=2"):
        read_msd_folder(root, num_classes=2, lazy=False)
    truncate(root / "imagesTr" / "case_001.nii.gz")
    refs = read_msd_folder(root)
    with pytest.raises(DataError, match=r"case_001\.nii\.gz"):
        load_case(refs[1])


# ------------------------------------------------------------------ 2D image/mask folders


def test_png_reader_gray_and_mapping(tmp_path):
    root = make_png_folder(tmp_path)
    refs = read_image_mask_folder(root)
    assert [r.case_id for r in refs] == ["img0", "img1", "img2"]
    assert refs[0].label_values == (0, 255) and refs[0].num_classes == 2
    case = load_case(refs[0])
    raw = np.asarray(Image.open(root / "masks" / "img0_mask.png"))
    assert case.image.shape == (1, 7, 9) and case.image.dtype == np.float32
    np.testing.assert_array_equal(case.label, (raw == 255).astype(np.int64))
    assert case.spacing == (1.0, 1.0) and case.affine is None
    assert probe_case(refs[0]) == (1, (7, 9))


def test_png_reader_rgb_and_explicit_values(tmp_path):
    root = make_png_folder(tmp_path, rgb=True, mask_ext=".gif")
    refs = read_image_mask_folder(root, label_values=[0, 128, 255])
    case = load_case(refs[1])
    assert case.image.shape == (3, 7, 9)
    assert set(np.unique(case.label)) <= {0, 2} and refs[1].num_classes == 3
    refs = read_image_mask_folder(root, label_values={255: 1, 0: 0})
    assert refs[0].label_values == (0, 255)
    with pytest.raises(DataError, match=r"img0_mask\.gif.*\[255\]"):
        load_case(read_image_mask_folder(root, label_values=[0])[0])


def test_png_reader_mask_rule_as_regex_replacement(tmp_path):
    root = make_png_folder(tmp_path, mask_ext=".gif")  # DRIVE-like: images/21_training.png, masks/21_manual1.gif
    for i in range(3):
        (root / "images" / f"img{i}.png").rename(root / "images" / f"{21 + i}_training.png")
        (root / "masks" / f"img{i}_mask.gif").rename(root / "masks" / f"{21 + i}_manual1.gif")
    refs = read_image_mask_folder(root, mask_rule=["_training$", "_manual1"])
    assert [Path(r.label_path).name for r in refs] == ["21_manual1.gif", "22_manual1.gif", "23_manual1.gif"]
    with pytest.raises(ConfigError, match=r"reader\.mask_rule: '\{id\}_manual1' may use only \{stem\}"):
        read_image_mask_folder(root, mask_rule="{id}_manual1")
    with pytest.raises(ConfigError, match=r"reader\.mask_rule: \['\(', 'x'\] is not a valid \[regex, replacement\]"):
        read_image_mask_folder(root, mask_rule=["(", "x"])
    with pytest.raises(ConfigError, match=r"reader\.mask_rule: give a format string"):
        read_image_mask_folder(root, mask_rule=["a"])


def _patient_tree(root: Path) -> None:
    """images/<patient>/img0.png (equal names in two folders), one top-level image, masks mirrored."""
    for sub, value in (("p1", 40), ("p2/visit2", 80), ("", 120)):
        for kind in ("images", "masks"):
            (root / kind / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8), value, np.uint8)).save(root / "images" / sub / "img0.png")
        mask = np.zeros((6, 8), np.uint8)
        mask[: value // 40] = 255
        Image.fromarray(mask).save(root / "masks" / sub / "img0_mask.png")


def test_png_reader_recursive_finds_patient_folders_with_distinct_ids(tmp_path):
    _patient_tree(tmp_path)
    assert [r.case_id for r in read_image_mask_folder(tmp_path)] == ["img0"]  # not recursive: top level only
    refs = read_image_mask_folder(tmp_path, recursive=True)
    assert [r.case_id for r in refs] == ["img0", "p1/img0", "p2/visit2/img0"]
    assert [r.patient_id for r in refs] == ["img0", "p1", "p2"]  # default: the first folder is the patient
    cases = [load_case(r) for r in refs]
    assert [c.image[0, 0, 0] for c in cases] == [120, 40, 80]  # each image with the mask of its own folder
    assert [int(c.label.sum()) for c in cases] == [3 * 8, 8, 2 * 8]
    by_rule = read_image_mask_folder(tmp_path, recursive=True, patient_rule=r"/(visit\d)/")
    assert [r.patient_id for r in by_rule] == ["img0", "p1/img0", "visit2"]  # the rule sees the relative path


def test_png_reader_recursive_needs_the_mask_in_the_same_subfolder(tmp_path):
    _patient_tree(tmp_path)
    (tmp_path / "masks" / "p1" / "img0_mask.png").rename(tmp_path / "masks" / "img1_mask.png")
    with pytest.raises(DataError, match=r"p1/img0.png: no mask named 'img0_mask'.*masks/p1"):
        read_image_mask_folder(tmp_path, recursive=True)


def test_png_reader_warns_about_a_stray_mask_value(tmp_path, caplog):
    root = make_png_folder(tmp_path, size=(64, 64))
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        assert read_image_mask_folder(root)[0].num_classes == 2
    assert not caplog.records
    mask = np.asarray(Image.open(root / "masks" / "img1_mask.png")).copy()
    mask[0, 0] = 254
    Image.fromarray(mask).save(root / "masks" / "img1_mask.png")
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        assert read_image_mask_folder(root)[0].num_classes == 3
    assert f"mask value 254 is on only 1 of 12288 pixels ({root / 'masks' / 'img1_mask.png'})" in caplog.text
    assert "3 classes from values [0, 254, 255]" in caplog.text


def test_png_reader_warns_about_a_value_in_one_mask_naming_it(tmp_path, caplog):
    """Issue 31: a 20x20 block of 7 in one 0/255 mask (2.4% of its pixels: not rare by pixels) and one
    mask's foreground stored as 128 each make a class; both are warned about, naming the mask."""
    root = make_png_folder(tmp_path, n=5, size=(64, 64))
    block = root / "masks" / "img1_mask.png"
    mask = np.asarray(Image.open(block)).copy()
    mask[10:30, 10:30] = 7
    Image.fromarray(mask).save(block)
    other = root / "masks" / "img3_mask.png"
    Image.fromarray(np.where(np.asarray(Image.open(other)) > 0, 128, 0).astype(np.uint8)).save(other)
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        assert read_image_mask_folder(root)[0].num_classes == 4
    assert f"mask value 7 is in only 1 of 5 masks ({block})" in caplog.text
    assert f"mask value 128 is in only 1 of 5 masks ({other})" in caplog.text
    assert "4 classes from values [0, 7, 128, 255]" in caplog.text
    assert "mask value 255" not in caplog.text and "mask value 0 " not in caplog.text


def test_hdf5_label_scan_warns_about_a_class_in_one_volume(tmp_path, caplog):
    """A class index found in one label volume only (num_classes from the scan) is warned about too."""
    root = make_h5_folder(tmp_path)
    files = sorted((root / "volumes").iterdir())
    with h5py.File(files[2], "r+") as h:
        label = h["label"][()]
        label[0, :2, :2] = 5
        del h["label"]
        h.create_dataset("label", data=label)
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        task = load_segmentation_task("t", root, format="hdf5")
    assert task.num_classes == 6
    assert f"mask value 5 is in only 1 of 4 masks ({files[2]})" in caplog.text
    assert "mask value 1 " not in caplog.text


def test_png_reader_errors(tmp_path):
    with pytest.raises(DataError, match="images folder not found"):
        read_image_mask_folder(tmp_path)
    root = make_png_folder(tmp_path / "a")
    with pytest.raises(DataError, match="no mask named 'img0_seg'"):
        read_image_mask_folder(root, mask_rule="{stem}_seg")
    with pytest.raises(DataError, match="num_classes=1"):
        read_image_mask_folder(root, num_classes=1)
    with pytest.raises(DataError, match="no images"):
        read_image_mask_folder(root, exts=(".bmp",))
    # size mismatch between image and mask
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "img1_mask.png")
    with pytest.raises(DataError, match=r"img1\.png.*spatial shape"):
        load_case(read_image_mask_folder(root)[1])


def test_png_truncated(tmp_path):
    root = make_png_folder(tmp_path, size=(64, 64))
    truncate(root / "images" / "img2.png", keep=0.6)
    refs = read_image_mask_folder(root)
    with pytest.raises(DataError, match=r"img2\.png.*(corrupt|truncated)"):
        load_case(refs[2])
    truncate(root / "masks" / "img0_mask.png", keep=0.3)
    with pytest.raises(DataError, match=r"img0_mask\.png"):
        read_image_mask_folder(root)


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_acdc_two_frames():
    root = shared_data_dir() / "acdc_sslmis_h5"
    if not root.is_dir():
        pytest.skip(f"{root} missing")
    refs = read_hdf5_folder(root, num_classes=4)
    assert len(refs) == 60 and len({r.patient_id for r in refs}) == 30
    for ref in refs[:2]:
        assert ref.patient_id == "patient001"
        case = load_case(ref)
        d, h, w = case.label.shape
        assert case.image.shape == (1, d, h, w) and 6 <= d <= 17 and 154 <= h <= 288 and 154 <= w <= 288
        assert set(np.unique(case.label).tolist()) == {0, 1, 2, 3}
        assert 0.0 <= case.image.min() and case.image.max() <= 1.0


@pytest.mark.realdata
def test_real_la_one_case():
    root = shared_data_dir() / "la2018_h5"
    if not root.is_dir():
        pytest.skip(f"{root} missing")
    refs = read_hdf5_folder(root, num_classes=2)
    assert len(refs) == 20 and refs[0].patient_id == refs[0].case_id
    case = load_case(refs[0])
    x, y, z = case.label.shape
    assert case.image.shape == (1, x, y, z) and 168 <= x <= 232 and 132 <= y <= 154 and z == 88
    assert set(np.unique(case.label).tolist()) == {0, 1}


def test_hdf5_spacing_default_file_attribute_and_reader(tmp_path):
    write_h5(tmp_path / "volumes" / "a.h5", np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.uint8))
    write_h5(tmp_path / "volumes" / "b.h5", np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.uint8))
    with h5py.File(tmp_path / "volumes" / "b.h5", "r+") as f:
        f["image"].attrs["spacing"] = [5.0, 1.25, 1.25]
    a, b = read_hdf5_folder(tmp_path, lazy=False)
    assert a.spacing == (1.0, 1.0, 1.0)  # HDF5 has no header: 1 mm by default
    assert b.spacing == (5.0, 1.25, 1.25)
    a, b = read_hdf5_folder(tmp_path, lazy=False, spacing=[2.0, 0.5, 0.5])  # reader.spacing wins
    assert a.spacing == b.spacing == (2.0, 0.5, 0.5)
    assert read_hdf5_folder(tmp_path, lazy=False, spacing=0.8)[0].spacing == (0.8, 0.8, 0.8)
    assert probe_spacing(read_hdf5_folder(tmp_path)[1]) == (5.0, 1.25, 1.25)
    with pytest.raises(DataError, match="reader.spacing"):
        read_hdf5_folder(tmp_path, lazy=False, spacing=[1.0, 2.0])
    with pytest.raises(DataError, match="reader spacing"):
        read_hdf5_folder(tmp_path, spacing="thin")
