"""The teacher of a run built from ``teacher.source``, and the adapt stage that fits it to the tasks.

Both recipes call :func:`load_source_teacher` from their teacher stage
(:func:`lorkd.pipelines.stages.teacher.stage_teacher`). A loaded foundation model becomes a
:class:`~lorkd.models.teacher.Foundation`; tasks without an output of their own (``teacher.heads``)
get a head on ``teacher.features``, fitted by the **adapt** stage (``teacher.adapt.mode``):
``heads`` trains the task heads on the frozen model (a linear probe: its weights stay
bit-identical), ``finetune`` trains everything. The stage writes ``teacher/`` like every stage
(``checkpoints/``, ``history.csv``, ``model.safetensors``, ``model.json``) and resumes from
``checkpoints/latest.pt``. ``model.json`` records where the teacher came from, what was adapted
and for how long (``teacher_info``), which the report states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...config import from_dict, to_dict
from ...data.multitask import TaskBatch, collate_task_batch
from ...engine.metrics import count_parameters
from ...errors import ConfigError
from ...experts import build_architecture
from ...fileio import read_json
from ...models.ensemble import build_ensemble
from ...models.foundation import load_foundation
from ...models.teacher import Foundation, InputAdapter, first_conv_channels
from ..core.fingerprint import write_fingerprint
from ..core.objective import TaskRemap
from ..core.netio import has_network, save_network
from ..core.recipe import DecompositionRecipe
from ..core.runfolder import record_stage, reuse_stage, start_training, train_or_reuse
from ..core.runtime import timed
from ..schema import Distill, TeacherSection, TeacherSource

__all__ = ["build_foundation", "load_source_teacher", "sample_batch", "teacher_description"]


def sample_batch(run: DecompositionRecipe, per_task: int = 2) -> TaskBatch:
    """A :class:`~lorkd.data.multitask.TaskBatch` of the first ``per_task`` training samples of each task."""
    items, start = [], 0
    for size in run.train_set.task_sizes:
        items += [run.train_set[start + j] for j in range(min(per_task, size))]
        start += size
    return collate_task_batch(items)


def task_heads(tcfg: TeacherSection, names: list[str]) -> dict[int, Any]:
    """``teacher.heads`` by task id.

    Raises:
        ConfigError: a task name that is not one of the run's tasks.
    """
    for name in tcfg.heads:
        if name not in names:
            raise ConfigError(f"teacher.heads.{name}: no task named {name!r}; the run's tasks are {names}")
    return {names.index(name): spec for name, spec in tcfg.heads.items()}


def build_foundation(run: DecompositionRecipe, tcfg: TeacherSection | None = None) -> Foundation:
    """The run's teacher from ``tcfg`` (default ``run.cfg.teacher``), loaded and wrapped, not adapted.

    Raises:
        ConfigError: anything :func:`~lorkd.models.foundation.load_foundation` or
            :class:`~lorkd.models.teacher.Foundation` raises (bad source, layers, heads, input).
    """
    tcfg = tcfg or run.cfg.teacher
    src, inp = tcfg.source, tcfg.input
    in_channels = inp.in_channels if inp is not None else None
    build = None
    if src.kind == "state_dict" and not src.factory:
        spec = run.spec(tcfg.net)
        for key in ("n_input_channels", "in_channels"):
            if in_channels and key in spec["kwargs"]:
                spec["kwargs"][key] = in_channels
        build = lambda: build_architecture(spec)  # noqa: E731
    module = load_foundation(src.kind, src.path, build=build, factory=src.factory, kwargs=src.kwargs, name=src.name,
                             strip_prefix=src.key_map.strip_prefix, rename=src.key_map.rename, strict=src.strict,
                             network_key=src.network_key, key="teacher.source")
    batch = sample_batch(run)
    adapter = None
    if inp is not None:
        data = run.cfg.data
        adapter = InputAdapter(batch.images.ndim - 2, inp.size, inp.channels, in_channels or first_conv_channels(module),
                               inp.mean, inp.std, getattr(data, "mean", None), getattr(data, "std", None))
    return Foundation(module, run.num_classes, batch.images, heads=task_heads(tcfg, run.names), features=tcfg.features,
                      dense=run.dense, input_adapter=adapter, task_names=run.names)


def adapt_mode(tcfg: TeacherSection, model: Foundation, names: list[str]) -> str:
    """``teacher.adapt.mode``, its default resolved.

    Raises:
        ConfigError: ``none`` while some task would have an untrained head, or ``heads`` while
            every task is mapped to an output (nothing to fit).
    """
    fitted = [names[t] for t in model.fitted_tasks]
    mode = tcfg.adapt.mode or ("heads" if fitted else "none")
    if mode == "none" and fitted:
        raise ConfigError(f"teacher.adapt.mode: none, but tasks {fitted} have no output in teacher.heads, so their "
                          "heads would stay untrained; map them in teacher.heads or set adapt.mode: heads or finetune")
    if mode == "heads" and not fitted:
        raise ConfigError("teacher.adapt.mode: heads, but every task is mapped to an output in teacher.heads: "
                          "there is no head to fit; set mode: none or finetune")
    return mode


def source_text(src: TeacherSource) -> str:
    """One line naming a ``teacher.source``."""
    extra = src.factory or src.name or ("teacher.net" if src.kind == "state_dict" else "")
    return f"{src.kind} {src.path}" + (f" ({extra})" if extra else "")


def _distilled(tcfg: TeacherSection, model: Foundation, names: list[str]) -> dict[str, str]:
    layer = f"layer {tcfg.features!r}" if tcfg.features else "the model's output"
    return {names[t]: (f"its output {model.mapped[t]!r}" if t in model.mapped else f"a fitted head on {layer}")
            for t in range(len(names))}


def teacher_description(info: dict[str, Any]) -> str:
    """The sentence the report uses for the teacher, from a ``teacher_info`` record."""
    src, ad = info.get("source", {}), info.get("adapt", {})
    how = f"{ad.get('epochs', 0)} epoch(s)" + (f", {ad['seconds']:.1f} s" if "seconds" in ad else "")
    if src.get("kind") == "ensemble":  # recorded when it was made (stages/ensemble.py)
        return info.get("description") or "an ensemble of teachers"
    if src.get("kind") == "trained":
        return f"foundation model trained by lorkd on all tasks of the run ({src.get('net')}, {how})"
    if src.get("kind") == "lorkd":
        inner = info.get("reused")
        tuned = f", fine-tuned whole on this run's tasks ({how})" if ad.get("mode") == "finetune" else ""
        return f"teacher reused from {src.get('path')}{tuned}" + (f": {teacher_description(inner)}" if inner else
                                                                 " (a lorkd teacher folder)")
    mode = ad.get("mode")
    adapted = {"none": "not adapted (its own outputs)",
               "heads": f"adapted: task heads fitted on the frozen model (linear probe), {how}",
               "finetune": f"adapted: fine-tuned whole (heads and model), {how}"}.get(mode, f"adapt mode {mode}")
    per_task = "; ".join(f"{task}: {what}" for task, what in (info.get("distilled") or {}).items())
    return f"foundation model loaded from {src.get('text', src.get('path'))}; {adapted}; logits per task: {per_task}"


def load_source_teacher(run: DecompositionRecipe, folder: Path, tcfg: TeacherSection | None = None) -> nn.Module:
    """The teacher of a run with ``teacher.source`` (or of ``tcfg``: one member of an ensemble): a lorkd
    folder reused, or a loaded foundation model adapted to the tasks (writes ``folder``). Sets
    ``run.state.teacher_info``."""
    tcfg = tcfg or run.cfg.teacher
    if tcfg.source.kind == "lorkd":
        source = Path(tcfg.source.path).expanduser()
        if not has_network(source):
            raise ConfigError(f"teacher.source.path: {source} is not a lorkd teacher folder (no model.safetensors "
                              "+ model.json there)")
        if tcfg.adapt.mode == "finetune":
            return finetune_lorkd_teacher(run, source, folder, tcfg)
        model = run.reuse_teacher(source, build=lambda meta: build_from_meta(run, meta))
        record_stage(run, "teacher", "loaded", source)
        run.state.teacher_info = {"source": {"kind": "lorkd", "path": str(source)},
                            "reused": read_json(source / "model.json").get("teacher_info")}
        return model
    if has_network(folder):  # this run's adapted teacher, finished earlier
        model = reuse_stage(run, "teacher", folder, lambda: run.reuse_network(folder, build=lambda m: build_from_meta(run, m)))
        run.state.teacher_info = read_json(folder / "model.json").get("teacher_info") or {}
        return model
    model = build_foundation(run, tcfg)
    mode = adapt_mode(tcfg, model, run.names)
    seconds = 0.0
    if mode == "none":
        if run.ctx.is_main:
            write_fingerprint(folder, "teacher", run.cfg, run.state.fingerprint_extra)
        record_stage(run, "teacher", "loaded", folder)
    else:
        start_training(run, "teacher", folder)
        timing: dict[str, float] = {}
        with timed(timing, "adapt"):
            model.freeze_backbone(mode == "heads")
            model = run.fit(model, tcfg.adapt, folder, run.objective(Distill(kd_weight=0.0), stage=tcfg.adapt))
        seconds = timing["adapt"]
        run.state.timing["teacher"] = run.state.timing.get("teacher", 0.0) + seconds
    model.freeze_backbone(True)
    info = {"source": {"kind": tcfg.source.kind, "path": tcfg.source.path, "text": source_text(tcfg.source)},
            "parameters": count_parameters(model.feature_root), "distilled": _distilled(tcfg, model, run.names),
            "adapt": {"mode": mode, "epochs": tcfg.adapt.epochs if mode != "none" else 0, "seconds": seconds}}
    info["description"] = teacher_description(info)
    run.state.teacher_info = info
    if run.ctx.is_main:
        meta = {"kind": "teacher", "tasks": list(run.names), "num_classes": list(run.num_classes),
                "foundation": to_dict(tcfg), "teacher_info": info}
        save_network(model, folder, meta)
    return model.to(run.ctx.device)


def finetune_lorkd_teacher(run: DecompositionRecipe, source: Path, folder: Path, tcfg: TeacherSection) -> nn.Module:
    """A lorkd teacher folder (``source``, possibly trained on more tasks than the run) fine-tuned
    whole on this run's tasks (``teacher.adapt``), selected on their validation score. ``folder``
    receives the network as ``source`` describes it (all its heads; the run's tasks picked by name
    again on reuse) and a ``teacher_info`` saying what was fine-tuned and for how long."""
    build = lambda meta: build_from_meta(run, meta)  # noqa: E731
    train = lambda: run.fit(run.reuse_teacher(source, build=build), tcfg.adapt, folder,  # noqa: E731
                            run.objective(Distill(kd_weight=0.0), stage=tcfg.adapt))
    saved = read_json(source / "model.json")

    def meta(model: nn.Module, seconds: float) -> dict[str, Any]:
        info = {"source": {"kind": "lorkd", "path": str(source)}, "reused": saved.get("teacher_info"),
                "adapt": {"mode": "finetune", "epochs": tcfg.adapt.epochs, "seconds": seconds}}
        return {**saved, "teacher_info": {**info, "description": teacher_description(info)}}

    model, made = train_or_reuse(run, "teacher", folder, train, meta, reuse=lambda: run.reuse_teacher(folder, build=build),
                                 timing="teacher", saves=lambda m: getattr(m, "teacher", m))
    run.state.teacher_info = (made or read_json(folder / "model.json")).get("teacher_info") or {}
    return model


def build_from_meta(run: DecompositionRecipe, meta: dict[str, Any]) -> nn.Module:
    """Rebuild a saved teacher: a loaded foundation model (``meta["foundation"]``: the teacher
    section it was made with; the source must still be there), an ensemble of them (``meta["ensemble"]``)
    or the recipe's own network; with ``meta["remap"]`` (an ensemble member trained on more tasks than
    the run), that network seen through the run's tasks (:class:`~lorkd.pipelines.core.objective.TaskRemap`)."""
    if "remap" in meta:
        inner = build_from_meta(run, {k: v for k, v in meta.items() if k != "remap"})
        return TaskRemap(inner, list(meta["remap"]))
    if "ensemble" in meta:
        return build_ensemble(meta["ensemble"], lambda member: build_from_meta(run, member))
    if "foundation" not in meta:
        return run.build(meta)
    tcfg = from_dict(type(run.cfg.teacher), meta["foundation"], "teacher")
    model = build_foundation(run, tcfg)
    return model.freeze_backbone(True)
