"""Routing a segmentation student without a task id (``student.router``, MoLA-Router).

A case belongs to one region, so it is routed once: the router sees the whole case as read (its
channels fitted to the run's, each z-scored, resized to ``student.router.input_size``:
:func:`~lorkd.models.router.router_view`; no task's preprocessing, since the task is what is asked),
its argmax is the case's task, and that task's expert segments the case by sliding windows.

* **Training**: the experts train on patches with the true task id (LoRKD's gradient separation;
  with top-1 routing per case a wrong route only sends a case to an expert of other structures);
  beside them the router learns from TwD + cross-entropy on whole training cases, one of the row's
  task per row of each batch (:meth:`CaseViews.training_rows`). Epochs are selected on the routed
  validation Dice.
* **Scoring**: a case routed to its own task gets the Dice of the student with the true task id
  (the same network, task and sliding windows); a case routed elsewhere gets Dice 0 on every
  foreground class (the other task's classes are other structures: a wrong route is a wrong answer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...data.segmentation import CANONICAL_ORIENTATION, CaseRef, SegmentationTaskData, fit_channels, load_case
from ...errors import ConfigError
from ...models.router import router_view
from ..core.recipe import DecompositionRecipe
from ..core.scoring import summarize

# ``run`` below is a SegmentationRecipe (typed by its protocol: segmentation imports this module)
INFERENCE = ("each whole case is routed once: the router sees it z-scored and resized to router_input.size, and its "
             "largest logit (top-1) picks the task whose expert segments the case by sliding windows; a case routed "
             "to another task counts Dice 0 on every foreground class")


class CaseViews:
    """The router's input of each case (:func:`~lorkd.models.router.router_view` of the case as read,
    channels fitted to ``channels`` with ``fill``), computed once per case and kept.

    Args:
        tasks: the run's tasks (their ``train`` cases feed :meth:`training_rows`).
        size: the router's input size, one entry per axis of the cases.
        channels, fill: the run's input channels and ``data.channel_fill``.
        seed: the run's seed (which training case each row of a step sees).
    """

    def __init__(self, tasks: list[SegmentationTaskData], size: list[int], channels: int, fill: str,
                 seed: int) -> None:
        self.tasks, self.size, self.channels, self.fill, self.seed = tasks, list(size), channels, fill, seed
        self._store: dict[CaseRef, Tensor] = {}

    def view(self, ref: CaseRef) -> Tensor:
        """``[channels, *size]`` float32 of one case."""
        v = self._store.get(ref)
        if v is None:
            image = fit_channels(load_case(ref).image, self.channels, self.fill)
            v = self._store[ref] = router_view(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), self.size)
        return v

    def training_rows(self, task_ids: Tensor, step: int) -> Tensor:
        """``[B, channels, *size]``: for each row, a training case of its task drawn with
        ``(seed, step)`` (the same rows on a resumed run)."""
        rng = np.random.default_rng([self.seed, int(step), 2])
        rows = []
        for t in task_ids.tolist():
            refs = self.tasks[t].cases("train")
            rows.append(self.view(refs[int(rng.integers(len(refs)))]))
        return torch.stack(rows)


def case_views(run: DecompositionRecipe) -> CaseViews:
    """The :class:`CaseViews` of a run with ``student.router``.

    Raises:
        ConfigError: the tasks' cases differ in dimensions (2D images and 3D volumes), or
            ``student.router.input_size`` has the wrong length, or is missing where the cases have
            more axes than the patches (2D networks on 3D volumes); names the key.
    """
    dims = sorted({t.spatial_dims for t in run.tasks})
    if len(dims) > 1:
        kinds = ", ".join(f"{t.name} ({t.spatial_dims}D)" for t in run.tasks)
        raise ConfigError(f"student.router: one router takes one kind of case, but the tasks mix {kinds}")
    size = run.cfg.student.router.input_size
    if size is None and len(run.patch) != dims[0]:
        raise ConfigError(f"student.router.input_size: the cases are {dims[0]}D and the patches {len(run.patch)}D; "
                          f"give {dims[0]} sizes (each whole case is resized to them for the router)")
    size = list(size or run.patch)
    if len(size) != dims[0]:
        raise ConfigError(f"student.router.input_size: {size} needs {dims[0]} sizes, one per axis of the cases")
    return CaseViews(run.tasks, size, run.channels, run.cfg.data.channel_fill, run.cfg.seed)


@torch.no_grad()
def route_cases(router: nn.Module, views: CaseViews, dataset: Any, device: torch.device) -> dict[int, np.ndarray]:
    """Per task ``t`` of ``dataset`` (a ``VolumeDataset``), ``[n]`` the routed task of each of its
    cases in dataset order (as :func:`~lorkd.pipelines.recipes.segmentation.score_volumes` keeps
    them); ``router`` (``x -> .logits``) is put in eval mode and restored."""
    was_training = router.training
    router.eval()
    routes: dict[int, list[int]] = {}
    try:
        for t, ref in dataset.items:
            logits = router(views.view(ref)[None].to(device)).logits
            routes.setdefault(t, []).append(int(logits.argmax(dim=1)))
    finally:
        router.train(was_training)
    return {t: np.asarray(r, dtype=np.int64) for t, r in routes.items()}


def case_dice(dice: np.ndarray) -> np.ndarray:
    """``[n]`` each case's mean foreground Dice from per-class ``[n, C-1]``."""
    return np.nanmean(np.asarray(dice, dtype=np.float64), axis=1)


def routed_dice(routes: dict[int, np.ndarray], true_id: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per task, ``[n]`` each case's Dice routed without a task id: its Dice with the true task id
    (``true_id[t]``) when routed to ``t``, else 0."""
    return {t: np.where(r == t, true_id[t], 0.0) for t, r in routes.items()}


def routed_val_metrics(run: DecompositionRecipe, model: nn.Module, router: nn.Module) -> dict[str, float]:
    """``dice`` (the mean over tasks of the routed validation Dice: selects the epoch), ``route_acc``
    (mean over tasks) and ``dice_<task>``."""
    kept: dict[int, dict[str, np.ndarray]] = {}
    run.score(model, run.val_set, keep=kept)
    routes = route_cases(router, run.views, run.val_set, run.ctx.device)
    routed = routed_dice(routes, {t: case_dice(k["dice"]) for t, k in kept.items()})
    out = {"dice": run.average([float(np.mean(v)) for v in routed.values()]),
           "route_acc": float(np.mean([(r == t).mean() for t, r in routes.items()]))}
    out.update({f"dice_{run.names[t]}": float(np.mean(v)) for t, v in routed.items()})
    return out


def routing_summary(run: DecompositionRecipe, router: nn.Module,
                    outputs: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """``metrics.json`` ``routing`` on test (:func:`~lorkd.pipelines.core.scoring.summarize`,
    metric ``dice`` per case), from the student's per-case test Dice with the true task id
    (``outputs[task]["student"]["dice"]``) and the router's route of each test case."""
    routes = route_cases(router, run.views, run.test_set, run.ctx.device)
    true_id = {t: case_dice(outputs[run.names[t]]["student"]["dice"]) for t in routes}
    summary = summarize(routes, routed_dice(routes, true_id), {"true_id": true_id}, run.names, metric="dice",
                        unit="cases", inference=INFERENCE)
    summary["router_input"] = routed_card(run)["router_input"]
    return summary


def routed_card(run: DecompositionRecipe) -> dict[str, Any]:
    """What ``routed.json`` adds for segmentation: ``task_kind`` and ``router_input`` (how a case
    becomes the router's input; ``orientation``: the axis codes a 3D NIfTI is turned to first, as
    the training volumes were, or ``null``) and the routed ``inference``."""
    v = run.views
    nifti = any(t.spatial_dims == 3 and any(getattr(r, "kind", None) == "nifti" for r in t.cases("train"))
                for t in run.tasks)
    return {"task_kind": "segmentation", "inference": INFERENCE,
            "router_input": {"size": list(v.size), "channels": v.channels, "channel_fill": v.fill,
                             "spatial_dims": len(v.size), "orientation": CANONICAL_ORIENTATION if nifti else None,
                             "normalize": "each channel z-scored over the whole case (as read)",
                             "resize": "linear/bilinear/trilinear, align_corners=False"}}

