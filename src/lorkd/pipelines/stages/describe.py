"""``lorkd teacher CONFIG``: what a run's teacher offers (source, sizes, layers, outputs), without training."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...engine.metrics import count_parameters
from ...models.taps import layer_names
from ...models.teacher import Foundation
from ..core.recipe import DecompositionRecipe
from ..schema import TeacherSection, member_labels
from .adapt import adapt_mode, build_foundation, build_from_meta, sample_batch, source_text
from .ensemble import member_errors, member_section


def describe_teacher(run: DecompositionRecipe, tcfg: TeacherSection | None = None) -> str:
    """What ``lorkd teacher CONFIG`` prints for the recipe ``run`` (its data loaded): the source,
    parameter counts, the layers usable as ``teacher.features`` (with their output shapes) and the
    output shapes per task for a sample batch of the run's data (an ensemble: each member's). Loads
    the teacher (``tcfg``: that teacher section instead of the run's); trains nothing.

    Raises:
        ConfigError / DataError: as the run's teacher stage would, before any training.
    """
    tcfg = tcfg or run.cfg.teacher
    if isinstance(tcfg.source, list):
        return _describe_ensemble(run, tcfg)
    lines = []
    if tcfg.source is None:
        model: nn.Module = run.network(tcfg.net, run.num_classes)
        lines.append(f"source: none: `lorkd run` trains teacher.net ({tcfg.net.arch}) on all tasks "
                     f"({tcfg.train.epochs} epochs); shown untrained")
    elif tcfg.source.kind == "lorkd":
        model = run.reuse_network(Path(tcfg.source.path).expanduser(), build=lambda m: build_from_meta(run, m))
        lines.append(f"source: {source_text(tcfg.source)}")
    else:
        model = build_foundation(run, tcfg)
        mode = adapt_mode(tcfg, model, run.names)
        lines.append(f"source: {source_text(tcfg.source)}")
        lines.append(f"adapt: {mode}" + (f" ({tcfg.adapt.epochs} epochs)" if mode != "none" else ""))
    root = getattr(model, "feature_root", model)
    batch = sample_batch(run)
    shapes: dict[str, tuple[str, list[int]]] = {}
    script = isinstance(root, torch.jit.ScriptModule)  # hooks cannot reach layers inside a script
    handles = [] if script else [m.register_forward_hook(_shape_keeper(shapes, n, type(m).__name__))
                                 for n, m in root.named_modules() if n]
    model.eval()
    with torch.no_grad():
        out = model(batch.images, batch.task_ids)
    for h in handles:
        h.remove()
    lines.append(f"parameters: {count_parameters(root):,} in the teacher's layers, {count_parameters(model):,} "
                 "with the task heads")
    lines.append(f"sample batch: {list(batch.images.shape)} (the run's input)")
    lines.append(f"features: {tcfg.features or 'the output'} -> {list(out.features.shape)}")
    lines.append("outputs per task:")
    for t, name in enumerate(run.names):
        how = "its output " + repr(model.mapped[t]) if isinstance(model, Foundation) and t in model.mapped else "head"
        lines.append(f"  {name} ({run.num_classes[t]} classes): {how} -> logits {list(out.logits[t].shape)}")
    if script:
        lines.append("layers: none usable (a TorchScript model offers only its outputs: teacher.features and "
                     "feature distillation need its output, hooks cannot reach layers inside a script)")
        return "\n".join(lines)
    lines.append("layers (names usable as teacher.features and as teacher layers of feature distillation):")
    for name in layer_names(root):
        kind, shape = shapes.get(name, (None, None))
        lines.append(f"  {name}  {kind or ''}  {shape if shape is not None else '(did not run or no tensor)'}")
    return "\n".join(lines)


def _describe_ensemble(run: DecompositionRecipe, tcfg: TeacherSection) -> str:
    """Each member of an ensemble teacher described (errors name ``teacher.source[i]``)."""
    ens, labels = tcfg.ensemble, member_labels(tcfg.source)
    how = "averaged" if ens.weights == "mean" else "weighted per task by each member's validation metric"
    lines = [f"ensemble of {len(labels)} teachers ({', '.join(labels)}): logits {how}; features and layers from "
             f"member {ens.features_from}"]
    for i, (label, member) in enumerate(zip(labels, tcfg.source)):
        with member_errors(i, label, member):
            text = describe_teacher(run, member_section(tcfg, member))
        lines.append(f"member {label} (teacher.source[{i}]):")
        lines += ["  " + line for line in text.splitlines()]
    return "\n".join(lines)


def _shape_keeper(shapes: dict, name: str, kind: str):
    def hook(_m, _i, output):
        tensor = output if isinstance(output, torch.Tensor) else next(
            (o for o in output if isinstance(o, torch.Tensor)), None) if isinstance(output, (tuple, list)) else None
        shapes[name] = (kind, list(tensor.shape) if tensor is not None else None)
    return hook

