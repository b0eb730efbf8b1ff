"""Config loading: round trips of the shipped recipes, overrides, and typed validation."""

from __future__ import annotations

from pathlib import Path

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
