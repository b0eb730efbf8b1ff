"""Subset selection (lorkd.data.select): random as before, DiSF's greedy, k-centre, per task."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lorkd.data.medmnist import cap_train
from lorkd.data.select import diversity_cost, select, select_for_task, subset_indices, task_features
from lorkd.data.synthetic import make_synthetic_tasks
from lorkd.errors import ConfigError, DataError


def _old_cap_indices(labels: np.ndarray, max_train: int, seed: int) -> np.ndarray:
    """cap_train's draw as it was before selection strategies existed (copied verbatim)."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[:max(1, int(round(max_train * len(idx) / n)))])
    keep = np.concatenate(keep)
    if len(keep) > max_train:
        keep = rng.choice(keep, max_train, replace=False)
    return np.sort(keep)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("n", [2, 5, 33, 150])
def test_random_keeps_todays_subsets(seed: int, n: int) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = rng.choice(4, size=300, p=[0.6, 0.25, 0.1, 0.05])
    want = _old_cap_indices(labels, n, seed)
    assert np.array_equal(subset_indices(labels, n, "random", seed=seed), want)
    task = make_synthetic_tasks(1, 8, 120, 10, 10, seed=seed)[0]
    capped = cap_train(task, 30, seed)
    assert np.array_equal(capped.labels["train"], task.labels["train"][_old_cap_indices(task.labels["train"], 30, seed)])


def _pool_with_duplicates(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """200 spread-out rows and 100 near-copies of one row; returns (features, is_duplicate)."""
    g = np.random.default_rng(seed)
    spread = g.normal(size=(200, 16))
    dup = spread[0] + 0.01 * g.normal(size=(100, 16))
    return np.concatenate([spread, dup]), np.r_[np.zeros(200, bool), np.ones(100, bool)]


def test_greedy_methods_pick_fewer_duplicates_than_random() -> None:
    x, dup = _pool_with_duplicates()
    random_dups = np.mean([dup[select(x, 40, "random", seed=s)].sum() for s in range(10)])  # ~13 expected
    for method in ("diverse", "kcenter"):
        picked = select(x, 40, method, seed=0)
        assert len(set(picked.tolist())) == 40
        assert dup[picked].sum() <= 2 < random_dups, method


def test_diversity_cost_is_the_sum_of_squared_eigenvalues() -> None:
    x = np.random.default_rng(0).normal(size=(12, 5))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(xn.T @ xn)
    assert diversity_cost(x) == pytest.approx(float((eig ** 2).sum()), rel=1e-6)
    assert eig.sum() == pytest.approx(12)  # the trace is fixed: a smaller cost means more uniform eigenvalues


@pytest.mark.parametrize("seed", range(6))
def test_diverse_greedy_near_the_brute_force_optimum(seed: int) -> None:
    """Within the greedy's bound on the maximisation form g(S) = |S|^2 - cost(S) >= 0 (all rows
    alike: 0): g(greedy) >= (1 - 1/e) g(best), here for every first pick the greedy may make."""
    x = np.random.default_rng(seed).normal(size=(10, 3))
    n = 4
    best = min(diversity_cost(x[list(s)]) for s in itertools.combinations(range(10), n))
    for first in range(3):
        got = diversity_cost(x[select(x, n, "diverse", seed=first)])
        assert got >= best - 1e-9
        assert n * n - got >= (1 - 1 / math.e) * (n * n - best)


def test_greedy_steps_are_the_marginal_costs() -> None:
    """Each pick is the candidate of least cost increase, computed from scratch."""
    x = np.random.default_rng(3).normal(size=(30, 6))
    picked = select(x, 8, "diverse", seed=2).tolist()
    for k in range(1, 8):
        costs = {c: diversity_cost(x[picked[:k] + [c]]) for c in range(30) if c not in picked[:k]}
        assert costs[picked[k]] == pytest.approx(min(costs.values()), rel=1e-6)


@pytest.mark.parametrize("method", ["random", "diverse", "kcenter"])
def test_deterministic_per_seed(method: str) -> None:
    x, _ = _pool_with_duplicates(1)
    a, b = select(x, 25, method, seed=4), select(torch.as_tensor(x), 25, method, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, select(x, 25, method, seed=5))
    labels = np.random.default_rng(0).integers(0, 3, len(x))
    assert np.array_equal(subset_indices(labels, 25, method, x, seed=4), subset_indices(labels, 25, method, x, seed=4))


def test_select_errors() -> None:
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="cannot select 6 of 5"):
        select(x, 6)
    with pytest.raises(ValueError, match="method"):
        select(x, 2, "greedy")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        select(np.zeros(5), 2)


@pytest.mark.parametrize("method", ["diverse", "kcenter"])
def test_stratified_greedy_keeps_class_shares(method: str) -> None:
    x, _ = _pool_with_duplicates(2)
    labels = np.r_[np.zeros(210, int), np.ones(90, int)]
    keep = subset_indices(labels, 50, method, x, seed=0)
    assert len(keep) == len(set(keep)) == 50 and np.all(np.diff(keep) > 0)
    assert np.bincount(labels[keep]).tolist() == [35, 15]
    three = np.random.default_rng(0).choice(3, 300, p=[0.34, 0.33, 0.33])
    assert len(subset_indices(three, 10, method, x, seed=0)) == 10
    assert len(subset_indices(three, 2, method, x, seed=0)) == 2  # more classes than images: some get none


def test_pool_smaller_than_n_names_the_task() -> None:
    labels = np.zeros(8, int)
    with pytest.raises(DataError, match="breastmnist.*9.*only 8"):
        subset_indices(labels, 9, "diverse", np.ones((8, 2)), name="breastmnist")
    task = make_synthetic_tasks(1, 8, 20, 4, 4)[0]
    with pytest.raises(DataError, match=f"{task.name}.*only 20"):
        select_for_task(nn.Flatten(), task, 21, "kcenter")
    assert len(subset_indices(labels, 9, "random")) == 8  # random stays a cap, as before


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_task_features_and_select_for_task() -> None:
    task = make_synthetic_tasks(1, 8, 60, 4, 4)[0]
    model = _Tiny().train()
    feats = task_features(model, task, "conv", batch_size=16, channels=1)
    assert feats.shape == (60, 4) and model.training
    assert torch.allclose(task_features(model, task, None, batch_size=7, channels=1),
                          model.eval()(torch.stack([_img(task, i) for i in range(60)])), atol=1e-5)
    keep = select_for_task(model, task, 12, "diverse", layer="conv", batch_size=16, channels=1)
    assert np.array_equal(keep, subset_indices(task.labels["train"], 12, "diverse", feats, 0, task.name))
    with pytest.raises(ConfigError, match="data.select.features.*'conv'"):
        task_features(model, task, "cnv", channels=1)


def _img(task, i: int) -> torch.Tensor:
    from lorkd.data.multitask import MultiTaskDataset

    return MultiTaskDataset([task], "train", channels=1)[i][0]


def test_the_package_entry_points() -> None:
    import lorkd

    x, dup = _pool_with_duplicates()
    assert np.array_equal(lorkd.select(x, 30), select(x, 30, "diverse"))
    assert lorkd.select_for_task is select_for_task and "select" in lorkd.__all__


def test_the_benchmark_runs_small(tmp_path, capsys) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "selection.py"
    spec = importlib.util.spec_from_file_location("selection_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--pool", "300", "--dim", "8", "--select", "20", "--out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "torch threads" in out and "300 x 8" in out and "diverse" in out
    assert {r["method"] for r in __import__("json").loads((tmp_path / "s.json").read_text())["results"]} == {
        "diverse", "kcenter"}
