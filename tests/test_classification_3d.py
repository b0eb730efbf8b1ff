"""3D classification: MedMNIST 3D volumes detected by shape (or ``spatial_dims``), 3D networks,
ambiguous shapes and 2D/3D mixes refused with errors that name the file and the way out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from lorkd import cli
from lorkd.config import from_dict
from lorkd.data.medmnist import load_npz_task
from lorkd.data.multitask import MultiTaskDataset, collate_task_batch
from lorkd.data.paths import shared_data_dir
from lorkd.errors import ConfigError, DataError
from lorkd.models.classifier import MultiTaskClassifier
from lorkd.pipelines.recipes.classification import load_image_tasks
from lorkd.pipelines.schema import ClassificationConfig
from lorkd.models.backbones import backbone_spec


def write_npz(path, shape, classes=2, counts=(24, 8, 8), seed=0):
    """A MedMNIST-layout file whose images are ``[n, *shape]``; class c is brighter (learnable)."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in zip(("train", "val", "test"), counts):
        labels = np.arange(n) % classes
        images = rng.integers(0, 120, (n, *shape)) + (labels * 100).reshape(-1, *([1] * len(shape)))
        data[f"{split}_images"] = images.astype(np.uint8)
        data[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
    np.savez(path, **data)
    return path


def test_cube_is_read_as_volumes(tmp_path):
    task = load_npz_task(write_npz(tmp_path / "vol.npz", (8, 8, 8)))
    assert task.spatial_dims == 3 and task.channels == 1 and task.image_size == (8, 8, 8)
    task = load_npz_task(write_npz(tmp_path / "vol5.npz", (6, 8, 8, 2)))
    assert task.spatial_dims == 3 and task.channels == 2 and task.image_size == (6, 8, 8)


def test_colour_images_stay_2d(tmp_path):
    task = load_npz_task(write_npz(tmp_path / "rgb.npz", (12, 12, 3)))
    assert task.spatial_dims == 2 and task.channels == 3 and task.image_size == (12, 12)


@pytest.mark.parametrize("shape", [(4, 8, 8), (8, 8, 6), (3, 16, 16)])
def test_ambiguous_shape_is_refused_and_spatial_dims_resolves_it(tmp_path, shape):
    path = write_npz(tmp_path / "amb.npz", shape)
    with pytest.raises(DataError, match=r"amb\.npz key 'train_images'.*ambiguous.*spatial_dims"):
        load_npz_task(path)
    assert load_npz_task(path, spatial_dims=3).image_size == shape
    two = load_npz_task(path, spatial_dims=2)
    assert two.image_size == shape[:2] and two.channels == shape[2]


def test_spatial_dims_that_does_not_fit_the_shape(tmp_path):
    with pytest.raises(DataError, match=r"flat\.npz.*spatial_dims=3 needs images \[N, D, H, W\]"):
        load_npz_task(write_npz(tmp_path / "flat.npz", (8, 8)), spatial_dims=3)
    with pytest.raises(ConfigError, match=r"data\.tasks\[0\]\.spatial_dims: must be 2 or 3"):
        from_dict(ClassificationConfig, {"data": {"tasks": [{"name": "a", "path": "a.npz", "spatial_dims": 4}]}})


def test_volume_dataset_items_resize_and_augment(tmp_path):
    task = load_npz_task(write_npz(tmp_path / "vol.npz", (8, 8, 8)))
    plain = MultiTaskDataset([task], "train")
    x, y, t = plain[3]
    assert x.shape == (1, 8, 8, 8) and plain.spatial_dims == 3 and (y, t) == (1, 0)
    resized = MultiTaskDataset([task], "train", size=6, channels=3)
    assert resized[3][0].shape == (3, 6, 6, 6)
    aug = MultiTaskDataset([task], "train", augment=True, seed=1)
    a = aug[3][0]
    assert a.shape == (1, 8, 8, 8) and not torch.equal(a, x) and torch.equal(a, aug[3][0])
    batch = collate_task_batch([aug[i] for i in range(4)])
    assert batch.images.shape == (4, 1, 8, 8, 8)


def test_mixing_2d_and_3d_is_refused(tmp_path):
    vol = load_npz_task(write_npz(tmp_path / "vol.npz", (8, 8, 8)))
    img = load_npz_task(write_npz(tmp_path / "img.npz", (8, 8)))
    with pytest.raises(DataError, match="mix 2D images and 3D volumes"):
        MultiTaskDataset([vol, img], "train")
    cfg = from_dict(ClassificationConfig, {"data": {"tasks": [{"name": "vol", "path": str(tmp_path / "vol.npz")},
                                                              {"name": "img", "path": str(tmp_path / "img.npz")}]}})
    with pytest.raises(ConfigError, match=r"data\.tasks: the tasks mix 2D images and 3D volumes.*vol \(3D.*img \(2D"):
        load_image_tasks(cfg)


@pytest.mark.slow
def test_3d_run_end_to_end_builds_3d_networks(tmp_path, capsys):
    for name, seed in (("vola", 0), ("volb", 1)):
        write_npz(tmp_path / f"{name}.npz", (8, 8, 8), seed=seed)
    stage = {"epochs": 1, "batch_size": 8}
    cfg = {"data": {"tasks": [{"name": n, "path": str(tmp_path / f"{n}.npz")} for n in ("vola", "volb")]},
           "teacher": {"net": {"arch": "resnet10", "widen": 0.125}, "train": stage},
           "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": stage},
           "baselines": {"run": ["stl"]}, "evaluate": {"latency_repeats": 2, "latency_batch": 2}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert cli.main(["run", str(tmp_path / "cfg.yaml"), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [d["spatial_dims"] for d in metrics["data"]] == [3, 3] and metrics["data"][0]["channels"] == 1
    card = json.loads((out / "experts" / "vola" / "card.json").read_text())
    assert card["spatial_dims"] == 3 and card["architecture"]["kwargs"]["backbone"]["kwargs"]["spatial_dims"] == 3
    assert set(metrics["tasks"]["vola"]) == {"teacher", "student", "expert", "stl"}
    from lorkd import load_expert

    capsys.readouterr()
    expert = load_expert(out / "experts" / "vola")
    assert any(isinstance(m, torch.nn.Conv3d) for m in expert.modules())
    assert cli.main(["predict", str(out / "experts" / "vola"), str(tmp_path / "vola.npz")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("input,prediction") and len(rows) == 1 + 8


@pytest.mark.realdata
@pytest.mark.parametrize("rel, counts", [("adrenalmnist3d/adrenalmnist3d.npz", (1188, 98, 298)),
                                         ("vesselmnist3d/vesselmnist3d.npz", (1335, 191, 382))])
def test_real_medmnist_3d_files_train_a_3d_resnet_step(rel, counts):
    task = load_npz_task(shared_data_dir() / rel)
    assert task.spatial_dims == 3 and task.channels == 1 and task.image_size == (28, 28, 28)
    assert tuple(task.num_samples(s) for s in ("train", "val", "test")) == counts and task.num_classes == 2
    data = MultiTaskDataset([task], "train", augment=True)
    batch = collate_task_batch([data[i] for i in range(4)])
    torch.manual_seed(0)
    model = MultiTaskClassifier(backbone_spec("resnet10", 3, 1, widen=0.125), [2])
    loss = torch.nn.functional.cross_entropy(model(batch.images, batch.task_ids).logits[0], batch.labels)
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.conv1.weight.grad.abs().sum() > 0
    assert isinstance(model.backbone.conv1, torch.nn.Conv3d)
