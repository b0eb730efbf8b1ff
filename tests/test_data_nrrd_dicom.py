"""NRRD files and DICOM series read as volumes (:mod:`lorkd.data.segmentation.volume_files`): the same
arrays, spacing, affine and orientation as the same data written as NIfTI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lorkd.data.segmentation.cases import CaseRef
from lorkd.data.segmentation.folders import read_msd_folder
from lorkd.data.segmentation.formats import load_case, probe_case, probe_spacing
from lorkd.errors import DataError

# axis 0 -> patient left (0.8 mm), axis 1 -> superior (2.5 mm), axis 2 -> anterior (0.9 mm): "LSA", far from SPL
AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, 0, 0.9, -20.0], [0, 2.5, 0, 30.0], [0, 0, 0, 1]])
SHAPE = (5, 6, 4)
LPS = np.diag([-1.0, -1.0, 1.0])
SLOPE, INTERCEPT = 0.5, -100.0


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 1000, SHAPE).astype(np.uint16)
    return raw, rng.integers(0, 3, SHAPE).astype(np.uint8)


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


def _nrrd(path: Path, array: np.ndarray, channel_first: bool = False) -> Path:
    lps = LPS @ AFFINE[:3]
    directions = lps[:, :3].T
    if channel_first:
        directions = np.vstack([np.full(3, np.nan), directions])
    nrrd.write(str(path), array, {"space": "left-posterior-superior", "space directions": directions,
                                  "space origin": lps[:, 3]}, index_order="F")
    return path


def _dicom_series(folder: Path, raw: np.ndarray, names: list[str], order: list[int], series: str | None = None) -> Path:
    """One file per slice ``raw[:, :, k]`` (columns x rows), written in ``order`` under ``names``, with
    InstanceNumber reversed so that only the positions give the slice order."""
    folder.mkdir(exist_ok=True)
    lps = LPS @ AFFINE[:3]
    col_sp, row_sp = np.linalg.norm(lps[:, 0]), np.linalg.norm(lps[:, 1])
    cosines = [*(lps[:, 0] / col_sp), *(lps[:, 1] / row_sp)]
    series = series or generate_uid()
    for name, k in zip(names, order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, series
        ds.Modality, ds.InstanceNumber = "CT", raw.shape[2] - k
        ds.ImagePositionPatient = [round(float(v), 4) for v in lps[:, 3] + k * lps[:, 2]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in cosines]
        ds.PixelSpacing = [float(row_sp), float(col_sp)]
        ds.Rows, ds.Columns = raw.shape[1], raw.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.PixelData = np.ascontiguousarray(raw[:, :, k].T).astype("<u2").tobytes()
        ds.save_as(str(folder / name), enforce_file_format=True)
    return folder


def _ref(image: Path, label: Path, cid: str = "c0") -> CaseRef:
    return CaseRef(cid, cid, str(image), str(label), "nifti", num_classes=3)


def _assert_same_case(got, want) -> None:
    np.testing.assert_array_equal(got.image, want.image)
    np.testing.assert_array_equal(got.label, want.label)
    np.testing.assert_allclose(got.spacing, want.spacing, atol=1e-6)
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)
    assert got.orientation == want.orientation == "LSA"


def test_nrrd_case_equals_the_nifti_case(tmp_path):
    raw, label = _data()
    image = raw.astype(np.float32) * SLOPE + INTERCEPT
    want_ref = _ref(_nifti(tmp_path / "i.nii.gz", image), _nifti(tmp_path / "l.nii.gz", label))
    got_ref = _ref(_nrrd(tmp_path / "i.nrrd", image), _nrrd(tmp_path / "l.nrrd", label))
    want, got = load_case(want_ref), load_case(got_ref)
    _assert_same_case(got, want)
    assert got.image.shape == (1, 6, 4, 5) and want.spacing == pytest.approx((2.5, 0.9, 0.8))
    assert probe_case(got_ref) == probe_case(want_ref) == (1, (6, 4, 5))
    assert probe_spacing(got_ref) == pytest.approx(probe_spacing(want_ref))


def test_nrrd_channel_axis_becomes_the_image_channels_like_a_4d_nifti(tmp_path):
    raw, label = _data()
    image = np.stack([raw, raw[::-1]], axis=-1).astype(np.float32)  # [X, Y, Z, 2]
    want_ref = _ref(_nifti(tmp_path / "i.nii.gz", image), _nifti(tmp_path / "l.nii.gz", label))
    got_ref = _ref(_nrrd(tmp_path / "i.nrrd", np.moveaxis(image, -1, 0), channel_first=True),
                   _nifti(tmp_path / "l2.nii.gz", label))
    got = load_case(got_ref)
    _assert_same_case(got, load_case(want_ref))
    assert got.image.shape[0] == 2 and probe_case(got_ref) == probe_case(want_ref) == (2, (6, 4, 5))


def test_dicom_series_in_shuffled_files_equals_the_nifti_case(tmp_path):
    raw, label = _data(1)
    series = _dicom_series(tmp_path / "ct", raw, ["b_slice.dcm", "IM0009", "a10.dcm", "zz"], [2, 0, 3, 1])
    want_ref = _ref(_nifti(tmp_path / "i.nii.gz", raw.astype(np.float32) * SLOPE + INTERCEPT),
                    _nifti(tmp_path / "l.nii.gz", label))
    got_ref = _ref(series, _nrrd(tmp_path / "l.nrrd", label))  # a DICOM image with an NRRD label
    got = load_case(got_ref)
    _assert_same_case(got, load_case(want_ref))
    assert probe_case(got_ref) == probe_case(want_ref) and probe_spacing(got_ref) == pytest.approx(probe_spacing(want_ref))


def test_msd_folder_lists_nrrd_files_and_dicom_series_folders(tmp_path):
    raw, label = _data(2)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    _dicom_series(tmp_path / "imagesTr" / "p1", raw, [f"{i}.dcm" for i in range(4)], [0, 1, 2, 3])
    _nrrd(tmp_path / "imagesTr" / "p2.nrrd", raw.astype(np.float32))
    for cid in ("p1", "p2"):
        _nrrd(tmp_path / "labelsTr" / f"{cid}.nrrd", label)
    training = [{"image": "./imagesTr/p1", "label": "./labelsTr/p1.nrrd"},
                {"image": "./imagesTr/p2.nrrd", "label": "./labelsTr/p2.nrrd"}]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": training, "labels": {"0": "bg", "1": "a", "2": "b"}}))
    cases = read_msd_folder(tmp_path, lazy=False)
    assert [c.case_id for c in cases] == ["p1", "p2"]
    np.testing.assert_array_equal(cases[0].image, (cases[1].image * SLOPE + INTERCEPT))
    np.testing.assert_array_equal(cases[0].label, cases[1].label)
    np.testing.assert_allclose(cases[0].spacing, cases[1].spacing, atol=1e-6)


@pytest.mark.parametrize("module, kind", [("nrrd", "nrrd"), ("pydicom", "dicom")])
def test_a_missing_package_names_the_file_and_the_install(tmp_path, monkeypatch, module, kind):
    raw, label = _data()
    image = _nrrd(tmp_path / "i.nrrd", raw) if kind == "nrrd" else _dicom_series(tmp_path / "s", raw, list("abcd"),
                                                                                   [0, 1, 2, 3])
    monkeypatch.setitem(sys.modules, module, None)  # import nrrd / import pydicom now raises ImportError
    with pytest.raises(DataError, match=r"pip install lorkd\[volumes\]") as err:
        load_case(_ref(image, _nifti(tmp_path / "l.nii.gz", label)))
    assert str(image) in str(err.value)


def test_a_corrupt_nrrd_or_dicom_file_is_named(tmp_path):
    raw, label = _data()
    lab = _nifti(tmp_path / "l.nii.gz", label)
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: what\n\x00\x01garbage")
    with pytest.raises(DataError, match="bad.nrrd.*cannot read NRRD"):
        load_case(_ref(bad, lab))
    truncated = tmp_path / "short.nrrd"
    _nrrd(truncated, raw)
    truncated.write_bytes(truncated.read_bytes()[:-50])
    with pytest.raises(DataError, match="short.nrrd"):
        load_case(_ref(truncated, lab))
    series = _dicom_series(tmp_path / "s", raw, ["1", "2", "3", "4"], [0, 1, 2, 3])
    (series / "3").write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match=r"s/3: cannot read DICOM slice"):
        load_case(_ref(series, lab))


def test_dicom_series_refuses_mixed_series_and_uneven_gaps(tmp_path):
    raw, label = _data()
    lab = _nifti(tmp_path / "l.nii.gz", label)
    mixed = _dicom_series(tmp_path / "m", raw, ["1", "2"], [0, 1])
    _dicom_series(mixed, raw, ["3", "4"], [2, 3])  # another SeriesInstanceUID
    with pytest.raises(DataError, match="2 series"):
        load_case(_ref(mixed, lab))
    gaps = _dicom_series(tmp_path / "g", raw[:, :, :3], ["1", "2", "3"], [0, 1, 2])
    import pydicom

    ds = pydicom.dcmread(str(gaps / "3"))
    ds.ImagePositionPatient = [float(v) + (3.0 if i == 1 else 0) for i, v in enumerate(ds.ImagePositionPatient)]
    ds.save_as(str(gaps / "3"))  # slice 3 moved 3 mm along the normal: gaps 1.2 and 0.9 mm
    with pytest.raises(DataError, match="not uniform"):
        load_case(_ref(gaps, _nifti(tmp_path / "l3.nii.gz", label[:, :, :3])))


def test_predict_reads_nrrd_and_dicom_series_like_nifti(tmp_path, monkeypatch, capsys):
    """Issue 31: ``lorkd predict`` reads every volume format training reads (through
    lorkd.data.segmentation's readers): the same volume as NIfTI, NRRD and a DICOM series gives the same
    mask, written as NIfTI in the input's geometry; a folder of series folders gives one mask per series."""
    from lorkd.data.segmentation import read_input_image
    from lorkd.experts import save_expert
    from lorkd.models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec
    from lorkd.pipelines import predict as P
    from lorkd.pipelines.predict import predict_files

    raw, _ = _data(3)
    image = raw.astype(np.float32) * SLOPE + INTERCEPT
    nifti = _nifti(tmp_path / "vol_nifti.nii.gz", image)
    nrrd_file = _nrrd(tmp_path / "vol_nrrd.nrrd", image)
    (tmp_path / "series").mkdir()
    series = _dicom_series(tmp_path / "series" / "vol_dicom", raw, ["IM1", "IM0", "IM3", "IM2"], [1, 0, 3, 2])
    items = [read_input_image(p) for p in (nifti, nrrd_file, series)]
    assert [i.kind for i in items] == ["nifti", "nrrd", "dicom"]
    for item in items:
        np.testing.assert_array_equal(item.image, image[None])
        np.testing.assert_allclose(item.affine, AFFINE, atol=1e-4)
        assert item.spacing == pytest.approx((0.8, 2.5, 0.9), abs=1e-4)
    import torch

    torch.manual_seed(0)
    plain, spec = MultiTaskSegmenter(segmentation_backbone_spec("unet", 3, 1, [4, 8], 4), [2]).export_task(0)
    card = {"task_kind": "segmentation", "classes": 2, "spatial_dims": 3, "in_channels": 1, "orientation": "SPL",
            "preprocessing": {"normalize": "zscore", "scale": None, "target_spacing": None, "target_shape": None},
            "inference": {"roi_size": [4, 4, 4], "overlap": 0.25, "sw_batch_size": 4, "mode": "constant"}}
    expert = save_expert(plain.eval(), tmp_path / "expert", spec, card)
    logits = []  # a random network's mask is one class: move the class-1 bias to the median logit gap
    real = P.sliding_window_logits
    monkeypatch.setattr(P, "sliding_window_logits", lambda *a: logits.append(real(*a)) or logits[-1])
    predict_files(expert, [nifti], output=tmp_path / "probe")
    monkeypatch.undo()
    with torch.no_grad():
        plain.head.bias[1] -= float((logits[0][1] - logits[0][0]).median()) + 1e-4
    expert = save_expert(plain.eval(), tmp_path / "expert", spec, card)
    rows = predict_files(expert, [nifti, nrrd_file, series], output=tmp_path / "masks")
    masks = [nib.load(str(tmp_path / "masks" / f"vol_{k}_mask.nii.gz")) for k in ("nifti", "nrrd", "dicom")]
    assert [r["shape"] for r in rows] == ["5x6x4"] * 3
    for m in masks:
        np.testing.assert_array_equal(np.asarray(m.dataobj), np.asarray(masks[0].dataobj))
        np.testing.assert_allclose(m.affine, AFFINE, atol=1e-4)
    assert len({r["voxels_1"] for r in rows}) == 1 and 0 < rows[0]["voxels_1"] < 120  # a mask, not a constant
    by_folder = predict_files(expert, [tmp_path / "series"], output=tmp_path / "masks2")  # a folder of series
    assert [r["input"] for r in by_folder] == [str(series)] and by_folder[0]["voxels_1"] == rows[0]["voxels_1"]
    capsys.readouterr()
