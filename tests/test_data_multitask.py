"""Tests for lorkd.data.multitask: multi-task dataset, TaskBatch collation and the task-mixing sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorkd.data.medmnist import ClassificationTask
from lorkd.data.multitask import MultiTaskDataset, TaskBatch, TaskBatchSampler, collate_task_batch
from lorkd.errors import ConfigError, DataError


def make_task(name, n, channels=1, hw=8, num_classes=2, value=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, hw, hw) if channels == 1 else (n, hw, hw, channels)
    imgs = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int64)
    return ClassificationTask(name, {"train": imgs, "val": imgs[:2]}, {"train": labels, "val": labels[:2]},
                              num_classes, channels, "synthetic")


@pytest.fixture
def tasks():
    return [make_task("a", 5), make_task("b", 3, channels=3, num_classes=3, seed=1), make_task("c", 4, seed=2)]


# ---- TaskBatch / collate -------------------------------------------------------------------
def test_collate_and_taskbatch(tasks):
    ds = MultiTaskDataset(tasks, "train")
    batch = collate_task_batch([ds[i] for i in (0, 5, 11)])
    assert isinstance(batch, TaskBatch) and len(batch) == 3
    assert batch.images.shape == (3, 3, 8, 8) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and batch.task_ids.tolist() == [0, 1, 2]
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.images, batch.images)
    with pytest.raises(DataError, match="empty"):
        collate_task_batch([])


# ---- MultiTaskDataset ----------------------------------------------------------------------
def test_dataset_bookkeeping(tasks):
    ds = MultiTaskDataset(tasks, "train")
    assert len(ds) == 12 and ds.task_names == ["a", "b", "c"] and ds.num_classes == [2, 3, 2]
    assert ds.task_sizes == [5, 3, 4] and ds.task_offsets == [0, 5, 8, 12]
    assert list(ds.task_indices(1)) == [5, 6, 7]
    assert ds.task_ids.tolist() == [0] * 5 + [1] * 3 + [2] * 4
    assert ds.labels.tolist() == [0, 1, 0, 1, 0, 0, 1, 2, 0, 1, 0, 1]
    for i in range(len(ds)):
        _, label, t = ds[i]
        assert (label, t) == (ds.labels[i].item(), ds.task_ids[i].item())
    assert ds[-1][2] == 2
    with pytest.raises(IndexError):
        ds[12]
    with pytest.raises(IndexError):
        ds.task_indices(3)


def test_channels_repeat_and_average():
    gray, rgb = make_task("g", 2, value=51), make_task("c", 2, channels=3, seed=1)
    ds3 = MultiTaskDataset([gray, rgb], "train", mean=0.0, std=1.0)
    assert ds3.channels == 3
    x, _, _ = ds3[0]
    assert torch.allclose(x, torch.full((3, 8, 8), 51 / 255))
    ds1 = MultiTaskDataset([gray, rgb], "train", channels=1, mean=0.0, std=1.0)
    y, _, _ = ds1[2]
    expected = torch.from_numpy(rgb.images["train"][0]).float().div(255).mean(-1)
    assert y.shape == (1, 8, 8) and torch.allclose(y[0], expected, atol=1e-6)


def test_normalisation_range():
    ds = MultiTaskDataset([make_task("k", 1, value=0), make_task("w", 1, value=255)], "train")
    assert torch.allclose(ds[0][0], torch.full((1, 8, 8), -1.0))
    assert torch.allclose(ds[1][0], torch.full((1, 8, 8), 1.0))


def test_resize_mixed_sizes():
    small, big = make_task("s", 2, hw=8, value=100), make_task("b", 2, hw=12, value=100)
    with pytest.raises(DataError, match="differ in image size.*size="):
        MultiTaskDataset([small, big], "train")
    ds = MultiTaskDataset([small, big], "train", size=16, mean=0.0, std=1.0)
    for i in range(4):
        x = ds[i][0]
        assert x.shape == (1, 16, 16)
        assert torch.allclose(x, torch.full_like(x, 100 / 255), atol=1e-5)  # constant stays constant


def test_augment_is_seeded_and_varies(tasks):
    ds = MultiTaskDataset(tasks, "train", augment=True, seed=1)
    plain = MultiTaskDataset(tasks, "train")
    first = [ds[i][0] for i in range(len(ds))]
    assert all(a.shape == b[0].shape for a, b in zip(first, plain))
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # same (seed, epoch, index)
    assert any(not torch.allclose(a, b[0]) for a, b in zip(first, plain))  # it does change images
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # new epoch, new draws


def test_dataset_errors(tasks):
    with pytest.raises(DataError, match="empty"):
        MultiTaskDataset([], "train")
    with pytest.raises(DataError, match="task 'a'.*no split 'test'"):
        MultiTaskDataset(tasks, "test")
    with pytest.raises(DataError, match="'b' has 3 channels.*channels=2"):
        MultiTaskDataset(tasks, "train", channels=2)
    with pytest.raises(DataError, match="std"):
        MultiTaskDataset(tasks, "train", std=0)


def test_dataloader_integration(tasks):
    ds = MultiTaskDataset(tasks, "train")
    sampler = TaskBatchSampler(ds, batch_size=4, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_task_batch)
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 4]
    ids = torch.cat([b.task_ids for b in batches])
    assert ids.bincount().tolist() == [5, 3, 4]
    assert any(len(b.task_ids.unique()) > 1 for b in batches)  # batches mix tasks


# ---- TaskBatchSampler ----------------------------------------------------------------------
task_sizes = st.lists(st.integers(1, 40), min_size=1, max_size=4)
FAST = settings(max_examples=60, deadline=None)


def all_ranks(sizes, batch_size, replicas, **kw):
    return [list(TaskBatchSampler(sizes, batch_size, num_replicas=replicas, rank=r, **kw)) for r in range(replicas)]


@FAST
@given(sizes=task_sizes, batch_size=st.integers(1, 16), seed=st.integers(0, 5), shuffle=st.booleans())
def test_proportional_single_process_is_a_permutation(sizes, batch_size, seed, shuffle):
    sampler = TaskBatchSampler(sizes, batch_size, seed=seed, shuffle=shuffle)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(sum(sizes)))
    assert len(batches) == len(sampler) == -(-sum(sizes) // batch_size)
    assert all(len(b) == batch_size for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch_size
    if not shuffle:
        assert flat == list(range(sum(sizes)))


@FAST
@given(sizes=task_sizes, batch_size=st.integers(1, 8), replicas=st.integers(1, 4), seed=st.integers(0, 3))
def test_distributed_covers_every_index_once(sizes, batch_size, replicas, seed):
    per_rank = all_ranks(sizes, batch_size, replicas, seed=seed)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(sum(sizes)))  # no padding, no repeats, nothing lost
    assert all(0 < len(b) <= batch_size for batches in per_rank for b in batches)
    lengths = [len(batches) for batches in per_rank]
    assert max(lengths) - min(lengths) <= 1
    for r, batches in enumerate(per_rank):
        assert len(TaskBatchSampler(sizes, batch_size, num_replicas=replicas, rank=r, seed=seed)) == len(batches)


@FAST
@given(sizes=task_sizes, batch_size=st.integers(1, 8), replicas=st.integers(1, 4), seed=st.integers(0, 3),
       mode=st.sampled_from(["proportional", "balanced"]), drop_last=st.booleans(), epoch=st.integers(0, 2))
def test_rank_union_equals_single_process(sizes, batch_size, replicas, seed, mode, drop_last, epoch):
    kw = dict(seed=seed, mode=mode, drop_last=drop_last)
    single = TaskBatchSampler(sizes, batch_size * replicas, **kw)
    single.set_epoch(epoch)
    samplers = [TaskBatchSampler(sizes, batch_size, num_replicas=replicas, rank=r, **kw) for r in range(replicas)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    for step, expected in enumerate(single):
        union = [i for batches in per_rank if step < len(batches) for i in batches[step]]
        assert union == expected  # rank order concatenated == the single-process batch
    assert max(len(b) for b in per_rank) == len(single)


@FAST
@given(sizes=task_sizes, batch_size=st.integers(1, 8), replicas=st.integers(1, 3), seed=st.integers(0, 3),
       shuffle=st.booleans())
def test_balanced_gives_equal_task_counts(sizes, batch_size, replicas, seed, shuffle):
    offsets = np.cumsum([0] + sizes)
    flat = [i for batches in all_ranks(sizes, batch_size, replicas, mode="balanced", seed=seed, shuffle=shuffle)
            for b in batches for i in b]
    task_of = np.searchsorted(offsets, flat, side="right") - 1
    counts = np.bincount(task_of, minlength=len(sizes))
    assert counts.tolist() == [max(sizes)] * len(sizes)
    for t, n in enumerate(sizes):  # oversampling spreads draws evenly over a task's samples
        per_sample = np.bincount(np.asarray(flat)[task_of == t] - offsets[t], minlength=n)
        assert per_sample.max() - per_sample.min() <= 1


@FAST
@given(sizes=task_sizes, batch_size=st.integers(1, 8), replicas=st.integers(1, 3),
       mode=st.sampled_from(["proportional", "balanced"]))
def test_drop_last_keeps_full_batches_only(sizes, batch_size, replicas, mode):
    total = sum(sizes) if mode == "proportional" else max(sizes) * len(sizes)
    for batches in all_ranks(sizes, batch_size, replicas, mode=mode, drop_last=True):
        assert len(batches) == total // (batch_size * replicas)
        assert all(len(b) == batch_size for b in batches)


@FAST
@given(sizes=task_sizes, batch_size=st.integers(1, 8), replicas=st.integers(1, 3), data=st.data(),
       mode=st.sampled_from(["proportional", "balanced"]), epoch=st.integers(0, 3))
def test_resume_yields_identical_remaining_batches(sizes, batch_size, replicas, data, mode, epoch):
    rank = data.draw(st.integers(0, replicas - 1))
    kw = dict(mode=mode, seed=7, num_replicas=replicas, rank=rank)
    run = TaskBatchSampler(sizes, batch_size, **kw)
    run.set_epoch(epoch)
    full = list(run)
    consumed = data.draw(st.integers(0, len(full)))
    for _ in zip(range(consumed), run):  # the training loop consumes `consumed` batches
        run.advance()
    state = run.state_dict()
    resumed = TaskBatchSampler(sizes, batch_size, **kw)
    resumed.load_state_dict(state)
    assert list(resumed) == full[consumed:]
    resumed.set_epoch(epoch + 1)  # the next epoch starts from its first batch again
    nxt = TaskBatchSampler(sizes, batch_size, **kw)
    nxt.set_epoch(epoch + 1)
    assert list(resumed) == list(nxt)


def test_epochs_reshuffle_and_repeat_for_same_epoch():
    sampler = TaskBatchSampler([30, 20], 8, seed=0)
    e0 = list(sampler)
    assert list(sampler) == e0
    sampler.set_epoch(1)
    assert list(sampler) != e0
    assert list(TaskBatchSampler([30, 20], 8, seed=1)) == list(sampler)  # seed + epoch


def test_sampler_accepts_dataset(tasks):
    ds = MultiTaskDataset(tasks, "train")
    assert TaskBatchSampler(ds, 5).task_sizes == [5, 3, 4]


def test_sampler_config_errors():
    with pytest.raises(ConfigError, match="mode"):
        TaskBatchSampler([3], 2, mode="uniform")
    with pytest.raises(ConfigError, match="batch_size"):
        TaskBatchSampler([3], 0)
    with pytest.raises(ConfigError, match="rank"):
        TaskBatchSampler([3], 2, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="num_replicas"):
        TaskBatchSampler([3], 2, num_replicas=0)
    with pytest.raises(ConfigError, match="task sizes"):
        TaskBatchSampler([3, 0], 2)
    sampler = TaskBatchSampler([3], 2)
    with pytest.raises(ConfigError, match="exceeds"):
        sampler.advance(3)
    state = TaskBatchSampler([3], 2, seed=1).state_dict()
    with pytest.raises(ConfigError, match="seed=1"):
        sampler.load_state_dict(state)
    del state["epoch"]
    with pytest.raises(ConfigError, match="missing key 'epoch'"):
        sampler.load_state_dict(state)
