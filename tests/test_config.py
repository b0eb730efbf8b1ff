"""Config loading: round trips of the shipped recipes, overrides, and typed validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorkd.cli import load_recipe
from lorkd.config import apply_overrides, write_config
from lorkd.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_recipe(path, [])
    write_config(tmp_path / "c.yaml", cfg)
    assert load_recipe(tmp_path / "c.yaml", []) == cfg


def test_overrides_parse_yaml_values_and_nest():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2.5", "a.c=[1, 2]", "d.e=true", "f=none"])
    assert data == {"a": {"b": 2.5, "c": [1, 2]}, "d": {"e": True}, "f": "none"}
    with pytest.raises(ConfigError, match="a.b is not a mapping"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=1"])


def test_rank_may_be_an_int_or_a_pattern_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {synthetic: {}}\nstudent: {experts: {rank: {'layer4*': 8, '*': 4}}}\n")
    assert load_recipe(path, []).student.experts.rank == {"layer4*": 8, "*": 4}
    with pytest.raises(ConfigError, match="student.experts.rank"):
        load_recipe(path, ["student.experts.rank=four"])


def test_unknown_recipe_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: detection\ndata: {}\n")
    with pytest.raises(ConfigError, match="recipe: 'detection'"):
        load_recipe(path, [])


def test_scientific_notation_is_read_as_numbers_in_files_and_overrides(tmp_path):
    from lorkd.config import load_yaml

    path = tmp_path / "c.yaml"
    path.write_text("a: 1e-3\nb: 1E-4\nc: 5e+2\nd: 2.5e-1\ne: 3\nf: e5\ng: '1e-3'\nh: 1_000\n")
    assert load_yaml(path) == {"a": 0.001, "b": 0.0001, "c": 500.0, "d": 0.25, "e": 3, "f": "e5", "g": "1e-3", "h": 1000}
    assert apply_overrides({}, ["x.lr=1e-3", "y=-2E+1"]) == {"x": {"lr": 0.001}, "y": -20.0}
    path.write_text("data: {synthetic: {}}\nteacher: {train: {optim: {lr: 1e-3, weight_decay: 5E-5}}}\n")
    cfg = load_recipe(path, ["student.train.optim.lr=2e-3"])
    assert cfg.teacher.train.optim.lr == 0.001 and cfg.teacher.train.optim.weight_decay == 5e-5
    assert cfg.student.train.optim.lr == 0.002


def test_config_errors_name_the_yaml_file(tmp_path):
    path = tmp_path / "my_recipe.yaml"
    path.write_text("data: {synthetic: {}}\nstudent: {train: {epochs: ten}}\n")
    with pytest.raises(ConfigError, match=r"my_recipe\.yaml: student\.train\.epochs: expected an integer"):
        load_recipe(path, [])
    path.write_text("data: {synthetic: {}}\n")
    with pytest.raises(ConfigError, match=r"my_recipe\.yaml: seed: expected an integer"):
        load_recipe(path, ["seed=x"])


def test_a_partly_given_section_keeps_its_own_defaults(tmp_path):
    # segmentation trains in batches of 8 patches with AdamW; giving only the epochs keeps those,
    # and a --set of one key keeps the rest of that section (student.net's half width)
    path = tmp_path / "seg.yaml"
    path.write_text("recipe: segmentation\ndata: {tasks: [{name: a, path: x, format: hdf5}]}\n"
                    "teacher: {train: {epochs: 3}, adapt: {epochs: 2}}\n")
    cfg = load_recipe(path, [])
    assert (cfg.teacher.train.epochs, cfg.teacher.train.batch_size, cfg.teacher.train.optim.name) == (3, 8, "adamw")
    assert (cfg.teacher.adapt.epochs, cfg.teacher.adapt.batch_size) == (2, 8)
    path.write_text("data: {synthetic: {}}\n")
    cfg = load_recipe(path, ["student.net.arch=resnet10"])
    assert (cfg.student.net.arch, cfg.student.net.widen) == ("resnet10", 0.5)


def test_data_max_train_caps_every_task_the_same_way_and_is_checked():
    from lorkd.config import from_dict
    from lorkd.pipelines.recipes.classification import load_image_tasks
    from lorkd.pipelines.schema import ClassificationConfig

    data = {"synthetic": {"num_tasks": 2, "size": 8, "n_train": 48, "n_val": 8, "n_test": 8}}
    full = load_image_tasks(from_dict(ClassificationConfig, {"data": data}))
    capped = load_image_tasks(from_dict(ClassificationConfig, {"data": {**data, "max_train": 12}, "seed": 1}))
    again = load_image_tasks(from_dict(ClassificationConfig, {"data": {**data, "max_train": 12}, "seed": 2}))
    for f, a, b in zip(full, capped, again):
        assert a.num_samples("train") == 12 and np.array_equal(a.images["train"], b.images["train"])  # any seed
        share = f.class_counts("train") / f.num_samples("train")
        assert np.abs(a.class_counts("train") / 12 - share).max() <= 1 / 12 + 1e-9  # stratified
        assert a.num_samples("val") == f.num_samples("val") and a.num_samples("test") == f.num_samples("test")
    with pytest.raises(ConfigError, match=r"data\.max_train: must be >= 2, got 1"):
        from_dict(ClassificationConfig, {"data": {**data, "max_train": 1}})
