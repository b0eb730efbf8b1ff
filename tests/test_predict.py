"""``lorkd predict`` on classification experts: files, folders, globs, 16-bit and float images,
warnings on conversions, class names from the card, clear errors on bad input."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lorkd import cli
from lorkd.errors import DataError
from lorkd.pipelines.predict import predict_files, to_unit_range

NAMES = ["cyst", "solid", "mixed"]


@pytest.fixture(scope="module")
def expert(tmp_path_factory) -> Path:
    """A gray 16 px, 3-class expert from a tiny run on a .npz task whose config names the classes."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 24), ("val", 9), ("test", 9)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 16, 16), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(-1, 1).astype(np.uint8)
    np.savez(root / "task.npz", **arrays)
    cfg = {"data": {"tasks": [{"name": "lesion", "path": str(root / "task.npz"), "class_names": NAMES}]},
           "teacher": {"net": {"arch": "resnet10", "widen": 0.125}, "train": {"epochs": 1, "batch_size": 12}},
           "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": {"epochs": 1, "batch_size": 12}}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["pretrain", str(root / "cfg.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    assert cli.main(["export", str(root / "cfg.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run" / "experts" / "lesion"


def _gray(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)


def _probs(rows: list[dict]) -> np.ndarray:
    """``[rows, classes]`` of the ``p0, p1, ...`` columns."""
    return np.array([[v for k, v in r.items() if k[0] == "p" and k[1:].isdigit()] for r in rows])


def test_card_names_the_classes_and_rows_carry_them(expert, tmp_path, capsys):
    assert json.loads((expert / "card.json").read_text())["class_names"] == NAMES
    Image.fromarray(_gray(1)).save(tmp_path / "a.png")
    assert cli.main(["predict", str(expert), str(tmp_path / "a.png"), "--device", "cpu"]) == 0
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["class_name"] == NAMES[int(row["prediction"])]
    assert abs(sum(float(row[f"p{c}"]) for c in range(3)) - 1) < 1e-5


def test_folder_and_glob_inputs(expert, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_gray(i)).save(folder / f"s{i}.png")
    (folder / "notes.txt").write_text("not an image")
    by_folder = predict_files(expert, [folder])
    assert [r["input"] for r in by_folder] == [str(folder / f"s{i}.png") for i in range(3)]  # paths, not basenames
    by_glob = predict_files(expert, [str(folder / "s[12].png")])  # a quoted pattern, expanded by lorkd
    assert [r["input"] for r in by_glob] == [str(folder / "s1.png"), str(folder / "s2.png")]
    (tmp_path / "other").mkdir()
    Image.fromarray(_gray(9)).save(tmp_path / "other" / "s0.png")  # the same name in another folder
    rows = predict_files(expert, [folder / "s0.png", tmp_path / "other" / "s0.png"])
    assert [r["input"] for r in rows] == [str(folder / "s0.png"), str(tmp_path / "other" / "s0.png")]
    assert np.allclose(_probs(by_glob), _probs(by_folder[1:]), atol=1e-6)
    with pytest.raises(DataError, match=r"nothing\*.png: pattern matches no input files"):
        predict_files(expert, [str(folder / "nothing*.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: folder holds no input files"):
        predict_files(expert, [tmp_path / "empty"])
    capsys.readouterr()


def test_16_bit_float_and_npy_images_are_scaled_by_type_not_clipped(expert, tmp_path, caplog):
    image = _gray(7)
    Image.fromarray(image).save(tmp_path / "u8.png")
    Image.fromarray(image.astype(np.uint16) * 257).save(tmp_path / "u16.png")  # the same picture, 16 bits
    Image.fromarray(image.astype(np.float32) / 255.0).save(tmp_path / "f32.tif")  # float32 TIFF in [0, 1]
    np.save(tmp_path / "f64.npy", image.astype(np.float64) / 255.0)
    assert Image.open(tmp_path / "u16.png").mode == "I;16" and Image.open(tmp_path / "f32.tif").mode == "F"
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        rows = predict_files(expert, [tmp_path / n for n in ("u8.png", "u16.png", "f32.tif", "f64.npy")],
                             output=tmp_path / "p.json")
    assert not caplog.records  # the right size and channels: nothing to warn about
    probs = _probs(rows)
    assert np.abs(probs - probs[0]).max() < 1e-5, probs
    white = _probs(predict_files(expert, [_save(tmp_path / "white.png", np.full((16, 16), 255, np.uint8))]))
    assert np.abs(probs[1] - white[0]).max() > 1e-4  # 16-bit is not clipped to white
    assert json.loads((tmp_path / "p.json").read_text())[1]["input"] == str(tmp_path / "u16.png")


def test_12_bit_data_in_16_bit_pngs_is_warned_and_read_with_bits(expert, tmp_path, caplog):
    image = _gray(8)
    _save(tmp_path / "u8.png", image)
    for i in range(2):
        Image.fromarray((image.astype(np.uint32) * 4095 // 255).astype(np.uint16)).save(tmp_path / f"scan{i}.png")  # 12-bit values
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        dark = predict_files(expert, [tmp_path / "scan0.png", tmp_path / "scan1.png"], output=tmp_path / "p.csv")
    assert len(caplog.records) == 1 and "2 16-bit input(s) hold values that fit 12 bits" in caplog.text
    assert "pass --bits 12" in caplog.text and f"{tmp_path / 'scan0.png'}, {tmp_path / 'scan1.png'}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        rows = predict_files(expert, [tmp_path / "u8.png", tmp_path / "scan0.png"], output=tmp_path / "q.csv", bits=12)
    assert not caplog.records and np.abs(_probs(rows)[0] - _probs(rows)[1]).max() < 1e-3
    assert np.abs(_probs(rows)[1] - _probs(dark)[0]).max() > 1e-4  # / 65535 differs: the warning is not idle
    Image.fromarray(np.full((16, 16), 5000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match=r"deep.png: integer image of dtype uint16 with values in \[5000, 5000\], "
                                        r"beyond --bits 12 \(max 4095\)"):
        predict_files(expert, [tmp_path / "deep.png"], bits=12)
    with pytest.raises(DataError, match="--bits must be in 9..16"):
        predict_files(expert, [tmp_path / "u8.png"], bits=8)


def test_resizing_and_channel_conversion_are_warned(expert, tmp_path, caplog):
    rgb = np.stack([_gray(3)] * 3, -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(_gray(4)).resize((24, 24)).save(tmp_path / "big.png")
    Image.fromarray(_gray(5)).convert("P").save(tmp_path / "pal.png")
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        predict_files(expert, [tmp_path / "rgb.png", tmp_path / "big.png", tmp_path / "pal.png"], output=tmp_path / "o.csv")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{tmp_path / 'pal.png'}: converted image mode P to RGB" in text
    assert f"2 input(s) converted to 1 channel(s) as the expert expects: {tmp_path / 'rgb.png'}, {tmp_path / 'pal.png'}" in text
    assert f"1 input(s) resized to 16x16 as the expert expects: {tmp_path / 'big.png'}" in text


def test_bad_inputs_are_named(expert, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"broken.png: cannot read the image"):
        predict_files(expert, [tmp_path / "broken.png"])
    with pytest.raises(DataError, match=r"missing.png: file not found"):
        predict_files(expert, [tmp_path / "missing.png"])
    np.save(tmp_path / "hot.npy", np.full((16, 16), 1.5, np.float32))
    with pytest.raises(DataError, match=r"hot.npy: float image with values in \[1.5, 1.5\].*nothing is clipped"):
        predict_files(expert, [tmp_path / "hot.npy"])
    np.save(tmp_path / "cube.npy", np.zeros((4, 16, 16, 16), np.float32))
    with pytest.raises(DataError, match=r"cube.npy: array of shape \[4, 16, 16, 16\]; this 2D expert"):
        predict_files(expert, [tmp_path / "cube.npy"])
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match=r"x.txt: unsupported input type '.txt'"):
        predict_files(expert, [tmp_path / "x.txt"])
    assert cli.main(["predict", str(expert), str(tmp_path / "missing.png")]) == 2
    with pytest.raises(DataError, match="--device 'gpu': not a device"):
        predict_files(expert, [_save(tmp_path / "ok.png", _gray(0))], device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="--device 'cuda:0': CUDA is not available here"):
            predict_files(expert, [tmp_path / "ok.png"], device="cuda:0")


def test_an_npy_stack_gives_one_row_per_image(expert, tmp_path):
    stack = np.stack([_gray(i) for i in range(3)])  # [N, H, W]
    np.save(tmp_path / "stack.npy", stack)
    np.save(tmp_path / "rgb_stack.npy", np.repeat(stack[..., None], 3, -1))  # [N, H, W, C]
    singles = predict_files(expert, [_save(tmp_path / f"s{i}.png", stack[i]) for i in range(3)])
    rows = predict_files(expert, [tmp_path / "stack.npy", tmp_path / "rgb_stack.npy"])
    assert [r["input"] for r in rows[:3]] == [f"{tmp_path / 'stack.npy'}[{i}]" for i in range(3)]
    assert np.abs(_probs(rows) - np.concatenate([_probs(singles)] * 2)).max() < 1e-5


def test_to_unit_range_by_dtype():
    assert to_unit_range(np.array([0, 255], np.uint8), "x").tolist() == [0.0, 1.0]
    assert to_unit_range(np.array([0, 65535], np.uint16), "x").tolist() == [0.0, 1.0]
    assert to_unit_range(np.array([0.25], np.float64), "x").tolist() == [0.25]
    with pytest.raises(DataError, match=r"x: integer image of dtype int32 with values in \[-1, 3\]"):
        to_unit_range(np.array([-1, 3], np.int32), "x")
    with pytest.raises(DataError, match="NaN"):
        to_unit_range(np.array([np.nan], np.float32), "x")


def _save(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


# ------------------------------------------------------------------ segmentation experts
SEG_CARD = {"task_kind": "segmentation", "classes": 2, "spatial_dims": 2, "in_channels": 1,
            "preprocessing": {"normalize": "none", "scale": None, "target_spacing": None, "target_shape": None},
            "inference": {"roi_size": [16, 16], "overlap": 0.25, "sw_batch_size": 4, "mode": "constant"}}


def test_segmentation_predict_turns_nifti_to_the_card_orientation_and_back(tmp_path, monkeypatch, capsys):
    import nibabel as nib

    from lorkd.experts import save_expert
    from lorkd.models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec
    from lorkd.pipelines import predict as P

    plain, spec = MultiTaskSegmenter(segmentation_backbone_spec("unet", 3, 1, [4, 8], 4), [2]).export_task(0)
    card = {**SEG_CARD, "spatial_dims": 3, "in_channels": 1, "orientation": "SPL"}
    expert = save_expert(plain, tmp_path / "expert", spec, card)
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    image = nib.Nifti1Image(data, np.diag([-1.5, 0.8, 2.0, 1.0]))  # axes L, A, S
    (tmp_path / "scans").mkdir()
    nib.save(image, str(tmp_path / "scans" / "vol.nii.gz"))
    seen = {}

    def voxelwise(model, array, spacing, card, device, name):  # orientation-equivariant: the round trip must be exact
        seen.update(array=array, spacing=spacing)
        return (array[0] > 0).astype(np.uint8)

    monkeypatch.setattr(P, "segment", voxelwise)
    rows = predict_files(expert, [tmp_path / "scans"], output=tmp_path / "masks")  # a folder of volumes
    assert np.array_equal(seen["array"][0], np.transpose(data, (2, 1, 0))[:, ::-1, :])  # S, P, L
    assert seen["spacing"] == pytest.approx((2.0, 0.8, 1.5))
    written = nib.load(str(tmp_path / "masks" / "vol_mask.nii.gz"))
    assert np.array_equal(np.asarray(written.dataobj), (data > 0).astype(np.uint8))
    assert np.allclose(written.affine, image.affine) and rows[0]["shape"] == "5x6x7"
    capsys.readouterr()


def test_a_3d_classification_expert_takes_npy_volumes(tmp_path, caplog):
    from lorkd.experts import save_expert
    from lorkd.models.backbones import backbone_spec
    from lorkd.models.classifier import MultiTaskClassifier

    plain, spec = MultiTaskClassifier(backbone_spec("resnet10", 3, 1, widen=0.125), [2]).eval().export_task(0)
    card = {"classes": 2, "input_channels": 1, "input_size": [8, 8, 8], "normalisation": {"mean": 0.5, "std": 0.5}}
    expert = save_expert(plain, tmp_path / "expert", spec, card)
    volume = np.random.default_rng(0).integers(0, 256, (8, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "v8.npy", volume)
    np.save(tmp_path / "v16.npy", volume.astype(np.uint16) * 257)
    np.save(tmp_path / "big.npy", np.zeros((10, 8, 8), np.float32))
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        rows = predict_files(expert, [str(tmp_path / "*.npy")], output=tmp_path / "p.csv")
    assert [r["input"] for r in rows] == [str(tmp_path / n) for n in ("big.npy", "v16.npy", "v8.npy")]
    assert "class_name" not in rows[0]
    assert np.abs(_probs(rows[1:2]) - _probs(rows[2:3])).max() < 1e-5
    assert f"1 input(s) resized to 8x8x8 as the expert expects: {tmp_path / 'big.npy'}" in caplog.text



def _segmentation_expert(folder: Path, in_channels: int, task_channels: int) -> Path:
    """A 2D UNet expert of ``in_channels`` whose task had ``task_channels`` (zero-filled up in training)."""
    from lorkd.experts import save_expert
    from lorkd.models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec

    plain, spec = MultiTaskSegmenter(segmentation_backbone_spec("unet", 2, in_channels, [4, 8], 4), [2]).export_task(0)
    card = {**SEG_CARD, "in_channels": in_channels, "task_channels": task_channels, "channel_fill": "zeros"}
    return save_expert(plain.eval(), folder, spec, card)


def test_segmentation_predict_repeats_gray_for_a_colour_expert_and_warns(tmp_path, monkeypatch, caplog, capsys):
    from lorkd.pipelines import predict

    seen = []
    real = predict.sliding_window_logits
    monkeypatch.setattr(predict, "sliding_window_logits", lambda m, x, *a: seen.append(x) or real(m, x, *a))
    gray = _save(tmp_path / "gray.png", _gray(1))
    colour = _segmentation_expert(tmp_path / "rgb", 3, 3)
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        predict_files(colour, [gray], output=tmp_path / "m1")
    assert f"{gray}: 1 channel repeated to the 3 channels" in caplog.text
    assert torch.equal(seen[0][0], seen[0][1]) and torch.equal(seen[0][0], seen[0][2]) and seen[0][0].abs().sum() > 0
    caplog.clear()
    mixed = _segmentation_expert(tmp_path / "mixed", 3, 1)  # a gray task of a run with an RGB task: zeros, as trained
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        predict_files(mixed, [gray], output=tmp_path / "m2")
    assert "repeated" not in caplog.text and seen[1][1:].abs().sum() == 0 and seen[1][0].abs().sum() > 0
    capsys.readouterr()


def test_segmentation_predict_refuses_channels_it_cannot_fit(tmp_path):
    from lorkd.experts import load_expert
    from lorkd.pipelines.predict import segment

    model = load_expert(_segmentation_expert(tmp_path / "rgb", 3, 3)).eval()
    with pytest.raises(DataError, match="scan.h5: image has 2 channels, the expert was trained on 3"):
        segment(model, np.zeros((2, 16, 16), np.float32), (1.0, 1.0), model.card, name="scan.h5")
    for sub in ("a", "b"):  # the same name in two folders: one mask file would overwrite the other
        (tmp_path / sub).mkdir()
        _save(tmp_path / sub / "img0.png", _gray(0))
    with pytest.raises(DataError, match=rf"{tmp_path / 'a' / 'img0.png'} and {tmp_path / 'b' / 'img0.png'} would both "
                                        r"write the mask img0_mask"):
        predict_files(tmp_path / "rgb", [tmp_path / "a", tmp_path / "b"], output=tmp_path / "m")


def test_an_expert_saved_with_save_expert_and_no_card_predicts_with_a_warning(tmp_path, caplog, capsys):
    import lorkd
    from lorkd.models.backbones import backbone_spec
    from lorkd.models.classifier import MultiTaskClassifier

    plain, spec = MultiTaskClassifier(backbone_spec("resnet10", 2, 1, widen=0.125), [2]).eval().export_task(0)
    folder = lorkd.save_expert(plain, tmp_path / "expert1", spec)  # as the quick start: no card
    Image.fromarray(_gray(1)).resize((20, 20)).save(tmp_path / "big.png")
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        rows = predict_files(folder, [_save(tmp_path / "a.png", _gray(0)), tmp_path / "big.png"], output=tmp_path / "p.csv")
    assert len(rows) == 2 and _probs(rows).shape == (2, 2)
    assert f"{folder / 'card.json'} has no input_channels, input_size, normalisation" in caplog.text
    assert "input_channels=1, input_size=None, normalisation={'mean': 0.0, 'std': 1.0}" in caplog.text
    with torch.no_grad():  # each input at its own size, [0, 1], not normalised
        direct = torch.softmax(plain(torch.from_numpy(_gray(0)).float()[None, None] / 255), 1)[0].numpy()
    assert np.abs(_probs(rows)[0] - direct).max() < 1e-5
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "architecture": None}))
    with pytest.raises(DataError, match=r"expert1/card.json: no 'architecture' to build the model from"):
        predict_files(folder, [tmp_path / "a.png"])
    (folder / "card.json").write_text(json.dumps({**card, "task_kind": "segmentation"}))
    with pytest.raises(DataError, match=r"expert1/card.json: a segmentation card needs classes, in_channels, "
                                        r"spatial_dims, preprocessing, inference"):
        predict_files(folder, [tmp_path / "a.png"])


def test_segmentation_masks_are_written_in_the_card_label_values(tmp_path, monkeypatch, caplog, capsys):
    import nibabel as nib

    from lorkd.pipelines import predict as P

    expert = _segmentation_expert(tmp_path / "expert", 1, 1)
    card = json.loads((expert / "card.json").read_text())
    half = lambda model, image, spacing, card, device, name: (np.arange(image[0].size).reshape(image.shape[1:])  # noqa: E731
                                                              % 2).astype(np.uint8)  # both classes, as segment gives
    monkeypatch.setattr(P, "segment", half)
    png = _save(tmp_path / "scan.png", _gray(0))
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), str(tmp_path / "vol.nii.gz"))

    def masks(values, **kwargs):
        (expert / "card.json").write_text(json.dumps({**card, "label_values": values} if values != "absent" else card))
        out = tmp_path / f"m{len(list(tmp_path.glob('m*')))}"
        predict_files(expert, [png, tmp_path / "vol.nii.gz"], output=out, **kwargs)
        return np.asarray(Image.open(out / "scan_mask.png")), nib.load(str(out / "vol_mask.nii.gz"))

    png_mask, vol = masks([0, 255])
    assert png_mask.dtype == np.uint8 and set(np.unique(png_mask)) == {0, 255}
    assert set(np.unique(np.asarray(vol.dataobj))) == {0, 255} and vol.get_data_dtype() == np.uint8
    png_mask, vol = masks([0, 1000])  # 16-bit values: a 16-bit PNG, a uint16 NIfTI
    assert set(np.unique(png_mask)) == {0, 1000} and vol.get_data_dtype() == np.uint16
    png_mask, _ = masks([0, 255], class_indices=True)
    assert set(np.unique(png_mask)) == {0, 1}
    with caplog.at_level(logging.WARNING, logger="lorkd"):
        png_mask, _ = masks("absent")  # an old card: class indices, and a note naming the card
    assert set(np.unique(png_mask)) == {0, 1}
    assert f"predict: {expert / 'card.json'} has no label_values (exported before lorkd recorded them): masks " \
           "hold class indices 0..1" in caplog.text
    png_mask, _ = masks(None)  # label_values: null (the mapping did not cover every class)
    assert set(np.unique(png_mask)) == {0, 1}
    with pytest.raises(DataError, match=r"expert/card.json: label_values must list 2 distinct integers .* got \[0, 0\]"):
        masks([0, 0])
    with pytest.raises(DataError, match=r"scan_mask.png: mask values -1..70000 do not fit a PNG"):
        masks([-1, 70000])
    capsys.readouterr()
