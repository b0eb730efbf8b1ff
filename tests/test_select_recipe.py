"""data.select in the classification recipe: config errors, the recorded selection, its reuse and
the fingerprint (no training: the recipe is only constructed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet

from lorkd.config import from_dict
from lorkd.data import select as S
from lorkd.engine.distributed import DistributedContext
from lorkd.errors import ConfigError, DataError
from lorkd.pipelines.core.fingerprint import compare, stage_config, write_fingerprint
from lorkd.pipelines.recipes.classification import ClassificationRecipe
from lorkd.pipelines.recipes.selection import SELECTION
from lorkd.pipelines.schema import ClassificationConfig

NET = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "init_features": 8, "growth_rate": 4,
       "block_config": [1, 1], "bn_size": 2}


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fm") / "fm.pt"
    torch.save(DenseNet(**NET).state_dict(), path)
    return path


def config(fm: Path, **select) -> ClassificationConfig:
    return from_dict(ClassificationConfig, {
        "data": {"synthetic": {"num_tasks": 2, "size": 16, "n_train": 40, "n_val": 8, "n_test": 8},
                 "max_train": 10, "select": select},
        "teacher": {"source": {"kind": "state_dict", "path": str(fm), "factory": "monai.networks.nets:DenseNet",
                               "kwargs": NET}, "features": "features.denseblock2",
                    "input": {"channels": "repeat"}}})


def recipe(cfg: ClassificationConfig, out: Path) -> ClassificationRecipe:
    return ClassificationRecipe(cfg, out, DistributedContext(), progress=False)


@pytest.mark.parametrize("select, key", [
    ({"method": "greedy"}, r"data\.select\.method: 'greedy' is not one of"),
    ({"method": "diverse", "batch_size": 0}, r"data\.select\.batch_size: must be >= 1"),
    ({"methd": "diverse"}, r"data\.select.*methd"),
])
def test_config_errors_name_the_key(fm, select, key) -> None:
    with pytest.raises(ConfigError, match=key):
        config(fm, **select)


def test_greedy_selection_needs_max_train_and_a_foundation(fm) -> None:
    data = {"synthetic": {"num_tasks": 2}, "select": {"method": "kcenter"}}
    with pytest.raises(ConfigError, match=r"data\.select\.method: kcenter .* set data\.max_train"):
        from_dict(ClassificationConfig, {"data": data})
    with pytest.raises(ConfigError, match=r"data\.select\.method: kcenter .* needs teacher\.source"):
        from_dict(ClassificationConfig, {"data": {**data, "max_train": 8}})


def test_random_adds_nothing_to_the_fingerprint(fm, tmp_path) -> None:
    run = recipe(config(fm), tmp_path / "run")
    assert run.state.fingerprint_extra == {} and not (tmp_path / "run" / SELECTION).exists()
    assert not any(k.startswith("data.select") for k in stage_config(run.cfg, "student"))


def test_selection_recorded_reused_and_fingerprinted(fm, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    run = recipe(config(fm, method="diverse"), out)
    record = json.loads((out / SELECTION).read_text())
    assert record["method"] == "diverse" and record["max_train"] == 10 and len(record["teacher"]) == 64
    assert record["pool"] == {name: 40 for name in run.names}
    for t, task in enumerate(run.tasks):
        assert task.num_samples("train") == 10
        assert np.array_equal(task.labels["train"], run.load_tasks()[t].labels["train"][record["indices"][task.name]])
    digest = run.state.fingerprint_extra["data.selection"]
    write_fingerprint(out / "student", "student", run.cfg, run.state.fingerprint_extra)

    monkeypatch.setattr(S, "subset_indices", lambda *a, **k: pytest.fail("the recorded selection was not reused"))
    again = recipe(config(fm, method="diverse"), out)
    assert again.state.fingerprint_extra["data.selection"] == digest
    assert compare(out / "student", "student", again.cfg, again.state.fingerprint_extra) == []
    monkeypatch.undo()

    other = recipe(config(fm, method="kcenter"), out)
    assert json.loads((out / SELECTION).read_text())["method"] == "kcenter"
    diffs = compare(out / "student", "student", other.cfg, other.state.fingerprint_extra)
    assert len(diffs) == 1 and diffs[0].startswith("data.selection:")


def test_a_shared_file_serves_another_run(fm, tmp_path, monkeypatch) -> None:
    shared = tmp_path / "shared" / "selection.json"
    first = recipe(config(fm, method="kcenter", file=str(shared)), tmp_path / "seed0")
    monkeypatch.setattr(S, "subset_indices", lambda *a, **k: pytest.fail("the shared selection was not reused"))
    second = recipe(config(fm, method="kcenter", file=str(shared)), tmp_path / "seed1")
    assert (tmp_path / "seed1" / SELECTION).read_text() == shared.read_text()
    assert second.state.fingerprint_extra == first.state.fingerprint_extra


def test_a_pool_smaller_than_max_train_names_the_task(fm, tmp_path) -> None:
    cfg = config(fm, method="diverse")
    cfg.data.max_train = 41
    with pytest.raises(DataError, match=r"data\.max_train: 41 .*'synth_\w+'.* only 40"):
        recipe(cfg, tmp_path / "run")


def test_a_lorkd_teacher_folder_selects_on_its_features(fm, tmp_path) -> None:
    from lorkd.pipelines.core.netio import save_network

    base = recipe(config(fm), tmp_path / "base")
    net = from_dict(type(base.cfg.teacher.net), {"arch": "resnet10", "widen": 0.125}, "teacher.net")
    model = base.network(net, base.num_classes)
    save_network(model, tmp_path / "teacher", base.meta(model, "teacher"))
    cfg = config(fm, method="kcenter")
    cfg.teacher.source = from_dict(type(cfg.teacher.source), {"kind": "lorkd", "path": str(tmp_path / "teacher")},
                                   "teacher.source")
    cfg.teacher.features = None
    run = recipe(cfg, tmp_path / "run")
    assert [t.num_samples("train") for t in run.tasks] == [10, 10]
    assert json.loads((tmp_path / "run" / SELECTION).read_text())["method"] == "kcenter"
