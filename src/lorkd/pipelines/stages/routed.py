"""The routed student (``student.router``, MoLA-Router): training it with its router, the router's
folder ``student/router/``, and the ``routed/`` export (router + every expert as plain models).

``routed/`` holds ``routed.json`` (task names, classes and class names per task, the input the
models take, which folder holds what and how to use them without lorkd), ``router/`` and
``experts/<task>/``, each a :func:`lorkd.save_expert` folder (``expert.safetensors`` + ``card.json``
and the ``export`` formats, each checked against PyTorch). :func:`lorkd.models.router.load_routed`
loads it; ``lorkd predict RUN/routed IMAGES...`` prints task, class and probabilities. A
segmentation run's router takes whole cases (the recipe's :meth:`router_input_shape`,
``routed.json`` ``router_input``) and its experts export with dynamic spatial axes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...experts import save_expert
from ...fileio import write_json
from ...models.router import ROUTED_CARD, TaskRouter
from ..core.export_formats import write_formats
from ..core.netio import save_network
from ..core.recipe import DecompositionRecipe
from ..core.routing import RouterTraining
from ..core.training import make_sampler
from ..schema import Distill

ROUTER = "router"  # the router's folder under the student's


def new_router(run: DecompositionRecipe) -> TaskRouter:
    """A fresh router for the run's input and tasks (``student.router.net``), seeded with ``seed``."""
    net = run.cfg.student.router.net
    shape = run.router_input_shape()
    torch.manual_seed(run.cfg.seed)
    return TaskRouter(shape[0], len(run.names), len(shape) - 1, net.channels, net.projection_dim)


def build_router(meta: dict[str, Any]) -> TaskRouter:
    """Rebuild a router from its ``model.json`` (:func:`router_meta`)."""
    return TaskRouter(meta["in_channels"], meta["num_tasks"], meta["spatial_dims"], meta["channels"],
                      meta["projection_dim"])


def router_meta(run: DecompositionRecipe, router: TaskRouter) -> dict[str, Any]:
    """What ``student/router/model.json`` records: the router's shape and the run's tasks."""
    return {"kind": "router", "in_channels": router.in_channels, "num_tasks": router.num_tasks,
            "spatial_dims": router.spatial_dims, "channels": list(router.channels),
            "projection_dim": router.projection_dim, "tasks": list(run.names), "num_classes": list(run.num_classes)}


def load_router(run: DecompositionRecipe) -> TaskRouter:
    """The trained router of ``student/router/``, after checking its tasks and classes.

    Raises:
        DataError: it is missing (a student trained without ``student.router``: names the folder),
            or was trained on other tasks or classes.
    """
    return run.reuse_network(run.out / "student" / ROUTER, build=build_router).eval()


def train_routed(run: DecompositionRecipe, model: nn.Module, folder: Path, distill: Distill,
                 teacher: nn.Module | None) -> nn.Module:
    """Train ``model`` (the student) with a new router (:mod:`lorkd.pipelines.core.routing`); the
    router of the best validation epoch is saved to ``folder/router/`` (rank 0)."""
    sc = run.cfg.student
    steps = len(make_sampler(run.train_data(), sc.train, run.ctx, run.seed, run.sampler_mode))
    forced = math.ceil(sc.router.teacher_forcing * steps) if run.route_in_training else None
    router = RouterTraining(new_router(run), sc.router, forced, run.router_views())
    model = run.distill_fit(model, sc.train, folder, distill, teacher, router=router)
    if run.ctx.is_main:
        save_network(router.router, folder / ROUTER, router_meta(run, router.router))
    return model


def stage_export_routed(run: DecompositionRecipe, student: nn.Module, router: TaskRouter) -> Path:
    """Write ``routed/`` (see the module): the router as a plain model, every task's expert and
    ``routed.json``; the ``export`` formats of each are written and checked as for the experts."""
    out, ex = run.out / "routed", run.cfg.export
    plain, spec = router.plain()
    files = write_formats(plain, out / ROUTER, run.router_input_shape(), onnx=ex.onnx, torchscript=ex.torchscript,
                          opset=ex.opset)
    save_expert(plain, out / ROUTER, architecture=spec,
                card={"kind": "router", "tasks": list(run.names), "output": "logits [B, T]; argmax = task id",
                      "files": files})
    experts, cards = {}, {}
    for t, name in enumerate(run.names):
        expert, expert_spec = student.export_task(t)
        card = run.expert_card(t)
        card["files"] = write_formats(expert, out / "experts" / name, run.export_input_shape(t), onnx=ex.onnx,
                                      torchscript=ex.torchscript, opset=ex.opset, dynamic_spatial=run.dense)
        save_expert(expert, out / "experts" / name, architecture=expert_spec, card=card)
        experts[name], cards[name] = f"experts/{name}", card
    first = cards[run.names[0]]
    write_json(out / ROUTED_CARD, {
        "kind": "routed", "tasks": list(run.names), "router": ROUTER, "experts": experts,
        "classes": {n: c["classes"] for n, c in cards.items()},
        "class_names": {n: c.get("class_names") for n, c in cards.items()},
        **{k: first[k] for k in ("input_channels", "input_size", "spatial_dims", "normalisation") if k in first},
        "inference": "task = argmax of router(x) (logits [B, T], tasks in the order of 'tasks'); class "
                     "probabilities = softmax(expert_of_that_task(x)); every model takes the same input x",
        "without_lorkd": "each folder is an expert folder: build its card's architecture (factory + kwargs) and "
                         "load expert.safetensors with load_state_dict(strict=True); or run expert.onnx",
        **run.routed_card(),  # the recipe's keys (segmentation: router_input, its own inference)
    })
    return out
