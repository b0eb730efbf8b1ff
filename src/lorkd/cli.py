"""The ``lorkd`` command.

    lorkd run CONFIG --out DIR [--set key=value ...] [--resume | --overwrite] [--reuse] [--trust-code]
    lorkd pretrain | decompose | baselines | export | evaluate  CONFIG --out DIR [...]
    lorkd predict EXPERT_DIR INPUT [INPUT ...] [--output FILE] [--device DEV] [--class-indices] [--trust-code]
    lorkd demo [--out DIR] [--seed N] [--set key=value ...] [--resume | --overwrite]
    lorkd report RUN_DIR [RUN_DIR ...] --out FILE [--allow-different]
    lorkd transfer CONFIG --out DIR [--set key=value ...] [--resume | --overwrite]
    lorkd bench [...]
    lorkd teacher CONFIG [--set key=value ...]

Every command may be launched under ``torchrun``; rank 0 alone writes. User errors (bad
config, bad data, a non-finite loss) print one line naming the cause and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from . import bench
from .config import apply_overrides, from_dict, load_yaml, to_dict
from .engine.checkpoint import RUN_MARKER, prepare_run_dir
from .engine.distributed import DistributedContext
from .errors import ConfigError, LorkdError
from .factories import trusted_code
from .pipelines.core.runtime import resolve_device
from .pipelines.predict import predict_files
from .pipelines.predict_routed import is_routed, predict_routed
from .pipelines.recipes import describe, run_stages
from .pipelines.recipes.transfer import run_transfer
from .pipelines.schema import CONFIGS, ClassificationConfig
from .pipelines.schema.presets import demo_config
from .report import load_histories, write_aggregate_report, write_report
from .report.markdown import headline_text

log = logging.getLogger("lorkd")

STAGE_COMMANDS = {
    "run": None,  # all stages of the recipe
    "pretrain": ("teacher",),
    "decompose": ("teacher", "student"),
    "baselines": ("teacher", "student", "baselines"),
    "export": ("teacher", "student", "export"),
    "evaluate": ("teacher", "student", "baselines", "export", "evaluate"),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except LorkdError as err:
        print(f"lorkd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorkd: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorkd", description="Low-Rank Knowledge Decomposition of a medical "
                                     "foundation model into lightweight per-task experts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stages in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help="all stages of the recipe" if stages is None else f"stages up to {stages[-1]}")
        _run_arguments(p)
        p.set_defaults(func=cmd_stages, stages=stages)
    p = sub.add_parser("demo", help="the whole classification recipe on the embedded synthetic data")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0, help="seed of the training and of the synthetic data (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo's config (as `lorkd run`), e.g. --set student.train.epochs=5")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true")
    mode.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("predict", help="class probabilities (or masks) of inputs through an exported expert")
    p.add_argument("expert", type=Path, help="an expert folder (experts/<task>/ of a run), or routed/ of a run with "
                   "student.router (prints task, class and probabilities, no task id needed; segmentation: each volume "
                   "routed once, then masked by its task's expert)")
    p.add_argument("inputs", nargs="+", help="image files (PNG/JPEG/TIF, 8/16-bit or float in [0, 1]), .npy or "
                   ".npz files, folders of them, or quoted glob patterns ('scans/*.png'); for a segmentation "
                   "expert also NIfTI (.nii/.nii.gz) or HDF5 (.h5) volumes")
    p.add_argument("--split", default="test", help="for .npz inputs: which split's images (default test)")
    p.add_argument("--output", type=Path, help="write results here (.csv or .json) instead of printing; for a "
                   "segmentation expert: the folder for the masks (default ./masks)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--batch-size", type=int, default=256, help="inputs per forward pass (classification)")
    p.add_argument("--bits", type=int, help="bit depth of 16-bit image files (e.g. 12: values / 4095; default "
                   "16: / 65535), classification")
    p.add_argument("--class-indices", action="store_true", help="segmentation: write masks of class indices "
                   "0..K-1 instead of the values of the task's training masks (card label_values, e.g. 0/255)")
    p.add_argument("--trust-code", action="store_true", help="allow the card's architecture factory to lie "
                   "outside monai.networks.nets, lorkd.models, torchvision.models, timm (only for experts you trust)")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("report", help="mean and std over several runs (e.g. seeds) as markdown")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--allow-different", action="store_true", help="aggregate runs whose configs differ in more "
                   "than the seed (refused by default); the report lists the differences")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("teacher", help="what the config's teacher would be (source, parameters, layer names, "
                       "output shapes per task), without training")
    p.add_argument("config", type=Path, help="YAML recipe (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.set_defaults(func=cmd_teacher)
    p = sub.add_parser("transfer", help="foundation model vs its experts on unseen downstream tasks "
                       "(fine-tuning, linear probe, LoRA, KD, Reprogramming Distillation)")
    _run_arguments(p)
    p.set_defaults(func=cmd_transfer)
    p = sub.add_parser("bench", help="speed and memory of lorkd vs plain vs grouped convolution")
    bench.bench_arguments(p)
    p.set_defaults(func=bench.run_from_args)
    return parser


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML recipe (see configs/)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set student.train.epochs=5 (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    mode.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--reuse", action="store_true", help="reuse trained stages in --out even though their "
                   "fingerprint.json records another config (the differences go into the report)")
    p.add_argument("--trust-code", action="store_true", help="allow saved architecture specs (model.json, "
                   "card.json) to name factories outside monai.networks.nets, lorkd.models, torchvision.models, timm "
                   "(the same as trust_code: true in the config)")


def load_recipe(path: Path, overrides: list[str], default: str = "classification") -> Any:
    """Read, override and validate a recipe; the ``recipe`` key (else ``default``) picks classification,
    segmentation or transfer."""
    data = apply_overrides(load_yaml(path), overrides)
    recipe = data.pop("recipe", default)
    try:
        if recipe in CONFIGS:
            return from_dict(CONFIGS[recipe], data)
        raise ConfigError(f"recipe: {recipe!r} is not one of 'classification', 'segmentation', 'transfer'")
    except ConfigError as err:  # every config error names the YAML file
        raise ConfigError(f"{path}: {err}") from err


def cmd_stages(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.config, args.overrides)
    if cfg.RECIPE == "transfer":
        raise ConfigError(f"{args.config} is a transfer config (recipe: transfer); run it with `lorkd transfer`")
    if args.trust_code:
        cfg.trust_code = True
    return execute(cfg, args.out, args.stages, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.no_progress, first_stage=args.command in ("run", "pretrain"), reuse=args.reuse)


def execute(cfg: Any, out: Path, stages: tuple[str, ...] | None, resume: bool = False, overwrite: bool = False,
            progress: bool = True, first_stage: bool = True, reuse: bool = False, headline: bool = False) -> int:
    """Prepare the run folder, run the stages (under torchrun too), write the report on rank 0
    and print the test table (with ``headline``: also the report's headline) and its path.

    A first command (``run``, ``pretrain``) that started on an empty folder (new, or emptied by
    ``--overwrite``) and fails before any training state exists (bad data, a typo in ``arch``)
    removes what it wrote: the folder itself when the command created it, else its contents (the
    run marker included), so the corrected rerun is not refused as "another run's output"."""
    ctx = DistributedContext.from_env(resolve_device(cfg.device))
    fresh = created = False
    try:
        if first_stage:
            if ctx.is_main:
                created = not out.exists()
                prepare_run_dir(out, overwrite=overwrite, resume=resume)
                fresh = not any(p.name != RUN_MARKER for p in out.iterdir())  # new, emptied or overwritten
            ctx.barrier()
        elif not (out / RUN_MARKER).is_file() and not (out / "config.yaml").is_file():
            raise ConfigError(f"{out}: not a lorkd run folder; start it with `lorkd run` or `lorkd pretrain`")
        try:
            metrics = run_stages(cfg, out, ctx, stages, resume=resume, progress=progress, reuse=reuse)
        except Exception:
            if fresh and ctx.is_main:
                _clear_failed_start(out, created)
            raise
        if metrics is not None and ctx.is_main:
            report = write_report(out, metrics, metrics.get("config", to_dict(cfg)), load_histories(out))
            print(summary_table(metrics))
            if headline:
                print(headline_text(metrics))
            print(f"report: {report}")
    finally:
        ctx.shutdown()
    return 0


def _clear_failed_start(out: Path, created: bool) -> None:
    """Remove what a failed first command wrote into ``out`` (run marker, config.yaml, splits,
    fingerprints, timing), unless some training state (a checkpoint or a saved network) exists:
    ``out`` itself when the command ``created`` it, else only its entries (the folder stays, empty).
    Only called on a folder that held nothing but lorkd's marker when the command started."""
    if any(out.rglob("*.pt")) or any(out.rglob("*.safetensors")):
        return
    if created:
        shutil.rmtree(out)
        return
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def summary_table(metrics: dict[str, Any]) -> str:
    """A compact text table of the primary metric: tasks x models."""
    key = metrics["primary_metric"]
    models = sorted({m for per in metrics["tasks"].values() for m in per}, key=_model_order)
    lines = [f"test {key}: " + "  ".join(f"{m:>12}" for m in models)]
    for task, per in metrics["tasks"].items():
        cells = "  ".join(f"{per[m][key]:>12.4f}" if m in per else f"{'':>12}" for m in models)
        lines.append(f"{task[:14]:<14} {cells}")
    return "\n".join(lines)


def _model_order(name: str) -> tuple[int, str]:
    order = ["teacher", "student", "expert", "stl", "stl_kd", "mtl", "mtl_kd", "student_nokd"]
    return (order.index(name) if name in order else len(order), name)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        cfg = from_dict(ClassificationConfig, apply_overrides(demo_config(args.seed), args.overrides))
    except ConfigError as err:
        raise ConfigError(f"lorkd demo: {err}") from err
    return execute(cfg, args.out, None, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                   headline=True)


def cmd_predict(args: argparse.Namespace) -> int:
    with trusted_code(args.trust_code):
        if is_routed(args.expert):  # routed/: task, class, probabilities
            predict_routed(args.expert, args.inputs, split=args.split, output=args.output, batch_size=args.batch_size,
                           device=args.device, bits=args.bits, class_indices=args.class_indices)
        else:
            predict_files(args.expert, args.inputs, split=args.split, output=args.output, batch_size=args.batch_size,
                          device=args.device, bits=args.bits, class_indices=args.class_indices)
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.config, args.overrides)
    if cfg.RECIPE == "transfer":
        raise ConfigError(f"{args.config} is a transfer config; `lorkd teacher` describes a decomposition run's teacher")
    print(describe(cfg))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = write_aggregate_report(args.runs, args.out, allow_different=args.allow_different)
    print(Path(path).read_text())
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    recipe = apply_overrides(load_yaml(args.config), list(args.overrides)).get("recipe", "transfer")
    if recipe != "transfer":
        raise ConfigError(f"{args.config}: recipe {recipe!r}; `lorkd transfer` takes a transfer config "
                          "(`recipe: transfer`, see configs/transfer_medmnist.yaml)")
    cfg = load_recipe(args.config, args.overrides, default="transfer")
    ctx = DistributedContext.from_env(resolve_device(cfg.device))
    try:
        if ctx.is_distributed:
            raise ConfigError("lorkd transfer runs in one process; launch it without torchrun")
        if ctx.is_main:
            prepare_run_dir(args.out, overwrite=args.overwrite, resume=args.resume)
        ctx.barrier()
        metrics = run_transfer(cfg, args.out, ctx, resume=args.resume, progress=not args.no_progress)
        if metrics is not None:
            for task, table in metrics["methods"].items():
                print(f"{task}: test {metrics['primary_metric']} (mean over {len(cfg.seeds)} seed(s))")
                for label, m in table.items():
                    print(f"  {label:<28} {m['test_mean']:.4f}  trained {m['trained_params']:>10}")
            print(f"report: {args.out / 'report.md'}")
    finally:
        ctx.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
