"""The teacher of a run whose ``teacher.source`` is a list: an ensemble of teachers
(:class:`~lorkd.models.ensemble.EnsembleTeacher`).

Each member is loaded and adapted exactly as a single source is (:func:`.adapt.load_source_teacher`),
into ``teacher/members/<i>/`` (a ``kind: lorkd`` member is read from its own folder, as a single
``kind: lorkd`` source is). A member's ``heads``, ``features`` and ``input`` replace the section's for
it; ``teacher.adapt`` is shared. Every member that still has to be adapted is loaded once before any
member trains, so a member that cannot load stops the run before training, with an error naming
``teacher.source[i]``. The logits are combined per task by ``teacher.ensemble.weights``: ``mean``, or
``val_accuracy`` (each member's validation metric per task, normalised to sum to 1). ``teacher/``
then holds the whole ensemble (``model.safetensors``: every member's weights and the weights of the
combination; ``model.json``: how to rebuild it, ``ensemble``, and ``teacher_info``), so a later
command reuses it like any teacher folder, and another run reads it with ``kind: lorkd``.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ...config import to_dict
from ...engine.metrics import count_parameters
from ...errors import ConfigError, DataError
from ...fileio import read_json
from ...models.ensemble import EnsembleTeacher, mean_weights, metric_weights
from ..core.fingerprint import write_fingerprint
from ..core.netio import META, has_network, save_network
from ..core.recipe import DecompositionRecipe
from ..core.runfolder import reuse_stage
from ..schema import EnsembleMember, TeacherSection, TeacherSource, ensemble_member, member_labels
from .adapt import adapt_mode, build_foundation, build_from_meta, load_source_teacher, teacher_description

__all__ = ["load_ensemble_teacher", "member_folder", "member_section"]

_OWN = ("heads", "features", "input")  # what a member may give for itself


def member_folder(folder: Path, index: int) -> Path:
    """Where member ``index`` of the ensemble teacher in ``folder`` is adapted."""
    return folder / "members" / str(index)


def member_section(tcfg: TeacherSection, member: EnsembleMember) -> TeacherSection:
    """The teacher section that loads ``member`` alone (its own ``heads``/``features``/``input`` when
    given, else the section's; none of them for a ``lorkd`` member)."""
    source = TeacherSource(**{f.name: getattr(member, f.name) for f in dataclasses.fields(TeacherSource)})
    if member.kind == "lorkd":
        return dataclasses.replace(tcfg, source=source, heads={}, features=None, input=None, ensemble=None,
                                   adapt=dataclasses.replace(tcfg.adapt, mode=None))
    own = {name: getattr(member, name) for name in _OWN if getattr(member, name) is not None}
    return dataclasses.replace(tcfg, source=source, ensemble=None, **own)


@contextmanager
def member_errors(index: int, label: str, member: EnsembleMember) -> Iterator[None]:
    """Errors of member ``index`` re-raised naming it: ``teacher.source.path`` -> ``teacher.source[i].path``
    (and its own ``heads``/``features``/``input``); other keys get ``teacher.source[i] (member label):`` first."""
    key = f"teacher.source[{index}]"
    try:
        yield
    except (ConfigError, DataError) as err:
        text = str(err).replace("teacher.source", key)
        for name in _OWN:
            if getattr(member, name) is not None:
                text = text.replace(f"teacher.{name}", f"{key}.{name}")
        if not text.startswith(key):
            text = f"{key} (member {label}): {text}"
        raise type(err)(text) from err


def _check_members(run: DecompositionRecipe, folder: Path, sections: list[TeacherSection],
                   labels: list[str]) -> list[int]:
    """Load every member that is not ready yet (not adapted): errors before any training. Returns
    the member indices in loading order: those that train (adapt) last."""
    members, trains = run.cfg.teacher.source, []
    for i, section in enumerate(sections):
        with member_errors(i, labels[i], members[i]):
            if section.source.kind == "lorkd":
                source = Path(section.source.path).expanduser()
                if not has_network(source):
                    raise ConfigError(f"teacher.source.path: {source} is not a lorkd teacher folder (no "
                                      "model.safetensors + model.json there)")
            elif not has_network(member_folder(folder, i)):
                adapt_mode(section, build_foundation(run, section), run.names)
                trains.append(i)
    return [i for i in range(len(sections)) if i not in trains] + trains


def _weights(run: DecompositionRecipe, models: list[nn.Module]) -> tuple[Any, dict[str, list[float]] | None]:
    """The ``[members, tasks]`` weights of ``teacher.ensemble.weights`` and, for ``val_accuracy``,
    each task's validation metric per member."""
    if run.cfg.teacher.ensemble.weights == "mean":
        return mean_weights(len(models), len(run.names)), None
    scores = []
    for model in models:
        per_task = run.score(model, run.dataset("val"))
        scores.append([float(per_task[t][run.select_metric]) for t in range(len(run.names))])
    table = {name: [row[t] for row in scores] for t, name in enumerate(run.names)}
    return metric_weights(scores), table


def ensemble_description(info: dict[str, Any]) -> str:
    """The report's teacher sentence for an ensemble: how the logits are combined, whose features, each member."""
    ens = info["ensemble"]
    labels = ens["labels"]
    if ens["weights"] == "mean":
        how = "logits averaged per task"
    else:
        per_task = ", ".join(f"{task}: " + "/".join(f"{w:.3f}" for w in ws) for task, ws in ens["per_task"].items())
        how = f"logits weighted per task by each member's validation {ens['metric']} ({per_task})"
    members = "; ".join(f"member {label}: {m.get('description', '')}" for label, m in zip(labels, info["members"]))
    return (f"ensemble of {len(labels)} teachers ({', '.join(labels)}), {how}, features from member "
            f"{labels[ens['features_from']]}; {members}")


def load_ensemble_teacher(run: DecompositionRecipe, folder: Path) -> nn.Module:
    """The ensemble teacher of a run whose ``teacher.source`` is a list (see the module docstring):
    reused from ``folder`` when saved there, else each member loaded/adapted and the ensemble saved.
    Sets ``run.state.teacher_info``."""
    tcfg = run.cfg.teacher
    if has_network(folder):  # this run's ensemble, finished earlier
        model = reuse_stage(run, "teacher", folder, lambda: run.reuse_network(folder, build=lambda m: build_from_meta(run, m)))
        run.state.teacher_info = read_json(folder / META).get("teacher_info") or {}
        return model
    labels = member_labels(tcfg.source)
    sections = [member_section(tcfg, m) for m in tcfg.source]
    models: list[nn.Module | None] = [None] * len(sections)
    infos: list[dict[str, Any]] = [{}] * len(sections)
    for i in _check_members(run, folder, sections, labels):
        with member_errors(i, labels[i], tcfg.source[i]):
            models[i] = load_source_teacher(run, member_folder(folder, i), sections[i])
        infos[i] = {**run.state.teacher_info, "label": labels[i]}
        infos[i].setdefault("description", teacher_description(infos[i]))
    weights, scores = _weights(run, models)
    features_from = ensemble_member(tcfg.source, tcfg.ensemble.features_from, "teacher.ensemble.features_from")
    model = EnsembleTeacher(models, weights, features_from, labels).to(run.ctx.device)
    record = {"members": [_member_meta(run, s) for s in sections], "features_from": features_from, "labels": labels}
    ens = {"weights": tcfg.ensemble.weights, "metric": run.select_metric, "features_from": features_from,
           "labels": labels, "per_task": {n: [float(w) for w in weights[:, t]] for t, n in enumerate(run.names)}}
    if scores is not None:
        ens["val"] = scores
    info = {"source": {"kind": "ensemble", "members": [m.get("source", {}) for m in infos]}, "ensemble": ens,
            "members": infos, "parameters": sum(count_parameters(getattr(m, "feature_root", m)) for m in models),
            "adapt": {"seconds": sum(float(m.get("adapt", {}).get("seconds", 0.0)) for m in infos)}}
    info["description"] = ensemble_description(info)
    run.state.teacher_info = info
    if run.ctx.is_main:
        write_fingerprint(folder, "teacher", run.cfg)
        save_network(model, folder, {"kind": "teacher", "tasks": list(run.names), "num_classes": list(run.num_classes),
                                     "ensemble": record, "teacher_info": info})
    return model


def _member_meta(run: DecompositionRecipe, section: TeacherSection) -> dict[str, Any]:
    """What rebuilds a member (:func:`.adapt.build_from_meta`): a lorkd folder's own ``model.json``, or
    the teacher section it was loaded with."""
    if section.source.kind == "lorkd":
        meta = read_json(Path(section.source.path).expanduser() / META)
        theirs = list(meta.get("tasks") or [])
        if theirs != list(run.names):  # a folder trained on more tasks: seen through the run's (reuse_teacher)
            meta = {**meta, "remap": run.task_positions(theirs)}
        return meta
    return {"kind": "teacher", "tasks": list(run.names), "num_classes": list(run.num_classes),
            "foundation": to_dict(section)}
