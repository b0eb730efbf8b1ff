"""Routing of extra inputs and of outputs: per-sample tensors follow the sort, others do not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorkd

from test_experts_layers import double_precision, randomise_experts  # noqa: F401  (autouse fixture)


class Scaled(nn.Module):
    """``fc(x) * scale + shift``: ``scale`` positional, ``shift`` keyword, both per-sample ``[B, 1]``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.table = nn.Parameter(torch.randn(5, 2))  # 5 rows, like the batch, but not per-sample

    def forward(self, x, scale, shift=None, *, table=False):
        y = self.fc(x) * scale
        y = y if shift is None else y + shift
        return (y, self.table) if table else y


def per_row(student, x, ids, fn):
    return torch.stack([fn(student.extract(int(t)), i) for i, t in enumerate(ids)])


def test_extra_positional_and_keyword_inputs_are_sorted_with_x():
    torch.manual_seed(0)
    student = randomise_experts(lorkd.add_experts(Scaled(), 2))
    x, ids = torch.randn(5, 3), torch.tensor([1, 0, 1, 0, 0])
    scale, shift = torch.arange(1.0, 6.0)[:, None], torch.randn(5, 1)
    out = student(x, ids, scale, shift=shift)
    want = per_row(student, x, ids, lambda m, i: m.fc(x[i]) * scale[i] + shift[i])
    torch.testing.assert_close(out, want)


def test_model_parameters_with_batch_rows_are_returned_as_they_are():
    student = randomise_experts(lorkd.add_experts(Scaled(), 2))
    x, ids = torch.randn(5, 3), torch.tensor([1, 0, 1, 0, 0])
    _, table = student(x, ids, torch.ones(5, 1), table=True)
    assert table is student.model.table  # 5 rows like the batch, but not per-sample: not permuted


class WithPrototypes(nn.Module):
    """Returns logits (per-sample) and normalised prototypes computed from a parameter (not per-sample)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.proto = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return {"logits": self.fc(x), "prototypes": nn.functional.normalize(self.proto, dim=1)}


def test_outputs_that_are_not_per_sample_come_back_as_computed():
    """Rows are never reordered, so an output with B rows that is not per-sample (prototypes from a
    parameter) is returned as the model computed it, with no option to set."""
    torch.manual_seed(0)
    model = WithPrototypes()
    student = randomise_experts(lorkd.add_experts(model, 2))
    x, ids = torch.randn(4, 3), torch.tensor([1, 0, 0, 1])  # 4 rows, like the prototypes
    out = student(x, ids)
    torch.testing.assert_close(out["prototypes"], nn.functional.normalize(model.proto, dim=1))
    torch.testing.assert_close(out["logits"], per_row(student, x, ids, lambda m, i: m.fc(x[i])))
