"""Every published number from one command: the acceptance recipes of issue 19, their seeds, the
aggregation with ``lorkd report`` and a results markdown.

    python benchmarks/reproduce.py --dry-run                      # the exact commands and folders
    python benchmarks/reproduce.py --out runs/reproduce            # every run, CPU
    python benchmarks/reproduce.py --only medmnist --device cuda   # one run on a GPU
    python benchmarks/reproduce.py --only transfer --seeds 0       # one seed

Each run's folders lie under ``OUT/<name>/`` (``seed<S>/`` per seed for a recipe; ``foundation/``
and ``transfer/`` for a transfer); a run with a ``pretrain`` foundation first trains it once with
``lorkd pretrain ... --resume`` into ``OUT/<its config's stem>/`` (reused when it is already there,
and shared by every seed, which distils from its ``teacher/``); its aggregate is ``OUT/<name>/report.md`` (``lorkd report`` over
the seeds; for a transfer over the foundation run, plus the transfer's own ``report.md``, which holds
its seeds). ``OUT/results.md`` holds the machine, the threads, the device, every command exactly as
run with its wall time and exit status, and each run's report. A command that fails is recorded and
the run's later commands are skipped; the other runs still go. Data: ``../shared/data`` or
``$LORKD_DATA`` (:mod:`lorkd.data.paths`). The commands run in the repository root: a relative
``--out`` is relative to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Acceptance:
    """One acceptance run: a recipe (``lorkd run`` once per seed), or a transfer (``lorkd run`` of
    ``foundation`` once, then ``lorkd transfer`` of ``config`` with every seed)."""

    name: str
    config: str
    seeds: tuple[int, ...]
    what: str
    foundation: str | None = None  # the foundation recipe of a transfer
    # teacher configs trained once each with `lorkd pretrain` into OUT/<config stem>/ (shared by every run
    # that names them); with one, each seed distils from its teacher/ folder (teacher.source.path)
    pretrain: tuple[str, ...] = ()
    teacher: str | None = None  # instead: the --set teacher.source=... of each seed ("{out}": OUT)
    sets: tuple[str, ...] = ()  # more --set key=value of each seed ("{base}": the run's folder OUT/<name>)


FOUNDATION = ("configs/foundation_medmnist2d.yaml",)
RUNS: tuple[Acceptance, ...] = (
    Acceptance("medmnist", "configs/medmnist.yaml", (0, 1, 2),
               "BreastMNIST + PneumoniaMNIST at 28 px, distilled from an ensemble of the MedMNIST foundation "
               "(pretrained on BreastMNIST + PneumoniaMNIST + OrganAMNIST) and a two-task teacher: teacher, KD "
               "expert, no-KD student",
               pretrain=(*FOUNDATION, "configs/teacher_medmnist2d.yaml"),
               teacher="teacher.source=[{kind: lorkd, path: {out}/foundation_medmnist2d/teacher, label: foundation}, "
                       "{kind: lorkd, path: {out}/teacher_medmnist2d/teacher, label: single}]"),
    Acceptance("medmnist_routed", "configs/medmnist_routed.yaml", (0,),
               "BreastMNIST + PneumoniaMNIST + OrganAMNIST at 28 px, MoLA-Router student beside mola_grad "
               "(task ids), distilled from the MedMNIST foundation", pretrain=FOUNDATION),
    *(Acceptance(f"select_{m}", "configs/medmnist_select.yaml", (0, 1, 2),
                 f"BreastMNIST + PneumoniaMNIST + OrganAMNIST, 100 training images per task chosen by {m} selection "
                 "on the MedMNIST foundation's features (one choice for every seed)",
                 pretrain=FOUNDATION,
                 sets=(f"data.select.method={m}", "data.select.file={base}/selection.json"))
      for m in ("random", "kcenter", "diverse")),
    Acceptance("transfer", "configs/transfer_medmnist.yaml", (0, 1, 2),
               "decomposed on BreastMNIST + PneumoniaMNIST + OrganAMNIST, downstream BloodMNIST, every method",
               foundation="configs/transfer_medmnist_foundation.yaml"),
    Acceptance("medmnist3d", "configs/medmnist3d.yaml", (0, 1, 2), "AdrenalMNIST3D + VesselMNIST3D experts"),
    Acceptance("cardiac", "configs/cardiac.yaml", (0,), "ACDC + left atrium, Dice with bootstrap intervals"),
    Acceptance("transfer_la", "configs/transfer_la.yaml", (0,), "ACDC foundation to the left atrium",
               foundation="configs/transfer_acdc_foundation.yaml"),
)
NAMES = tuple(r.name for r in RUNS)
# one model across runs that differ in one setting: {title: (run names, the first is the reference)},
# written to OUT/<title>.md and into results.md when every one of those runs finished in the invocation
COMPARISONS = {"select": ("select_random", "select_kcenter", "select_diverse")}


@dataclass
class Step:
    name: str
    argv: list[str]  # after ``lorkd``
    folder: Path

    @property
    def text(self) -> str:
        return shlex.join(["lorkd", *self.argv])


def steps(run: Acceptance, out: Path, seeds: Sequence[int], device: str, resume: bool) -> list[Step]:
    """The lorkd commands of ``run``, in order, with the folder each writes."""
    base = out / run.name
    common = ["--set", f"device={device}", "--no-progress"] + (["--resume"] if resume else [])
    first: list[Step] = []
    extra = [a for kv in run.sets for a in ("--set", kv.replace("{base}", str(base)))]
    # always --resume: a teacher finished by an earlier run or invocation is reused, not retrained
    flags = ["--set", f"device={device}", "--no-progress", "--resume"]
    for config in run.pretrain:
        folder = pretrain_folder(config, out)
        first.append(Step(f"pretrain {folder.name}", ["pretrain", config, "--out", str(folder), "--set", "seed=0",
                                                       *flags], folder))
    if run.teacher is not None:
        common = ["--set", run.teacher.replace("{out}", str(out)), *common]
    elif len(run.pretrain) == 1:
        common = ["--set", f"teacher.source.path={pretrain_folder(run.pretrain[0], out) / 'teacher'}", *common]
    if run.foundation is None:
        out_steps = first + [
            Step(f"seed {s}", ["run", run.config, "--out", str(base / f"seed{s}"), "--set", f"seed={s}", *extra, *common],
                 base / f"seed{s}") for s in seeds]
        folders = [str(base / f"seed{s}") for s in seeds]
    else:
        found, transfer = base / "foundation", base / "transfer"
        out_steps = [Step("foundation", ["run", run.foundation, "--out", str(found), "--set", "seed=0", *common], found),
                     Step("transfer", ["transfer", run.config, "--out", str(transfer), "--set", f"foundation.run={found}",
                                       "--set", f"seeds=[{','.join(map(str, seeds))}]", *common], transfer)]
        folders = [str(found)]
    report = base / "report.md"
    return out_steps + [Step("report", ["report", *folders, "--out", str(report)], report)]


def pretrain_folder(config: str, out: Path) -> Path:
    """Where a ``pretrain`` config's teacher is trained: ``OUT/<config stem>/`` (one for every run naming it)."""
    return out / Path(config).stem


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: integers separated by commas, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: distinct integers separated by commas, not {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce", description="Run every acceptance recipe with its seeds, aggregate "
                                "with `lorkd report` and write OUT/results.md.",
                                epilog="runs: " + "; ".join(f"{r.name} ({r.config}, seeds {list(r.seeds)})" for r in RUNS))
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="root folder (default runs/reproduce)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only this one (repeatable): {', '.join(NAMES)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seeds", type=parse_seeds, help="seeds for every selected run, e.g. 0,1,2 (default: each run's own)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="OMP_NUM_THREADS / MKL_NUM_THREADS of every command (default: the CPU count)")
    p.add_argument("--resume", action="store_true", help="pass --resume to every lorkd run / transfer")
    p.add_argument("--dry-run", action="store_true", help="print the commands and output folders; run nothing")
    return p


def selected(parser: argparse.ArgumentParser, only: Sequence[str]) -> list[Acceptance]:
    unknown = [n for n in only if n not in NAMES]
    if unknown:
        parser.error(f"unknown --only {', '.join(unknown)}; the runs are: {', '.join(NAMES)}")
    return [r for r in RUNS if not only or r.name in only]


def comparisons(out: Path, seeds: dict[str, Sequence[int]], finished: set[str]) -> list[str]:
    """The sections of the :data:`COMPARISONS` whose runs all finished (``OUT/<title>.md`` written)."""
    from lorkd.report.compare import compare_groups, comparison_markdown

    lines: list[str] = []
    for title, names in COMPARISONS.items():
        if not set(names) <= finished:
            continue
        groups = {name: [out / name / f"seed{s}" for s in seeds[name]] for name in names}
        text = comparison_markdown(compare_groups(groups, model="expert"))
        (out / f"{title}.md").write_text(f"# {title}\n\n{text}")
        lines += [f"## comparison: {title}", "", text]
    return lines


def lorkd_command() -> list[str]:
    exe = Path(sys.executable).parent / "lorkd"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("lorkd")
    return [found] if found else [sys.executable, "-c", "import sys; from lorkd.cli import main; sys.exit(main())"]


def machine(device: str, threads: int) -> list[str]:
    import torch

    lines = [f"- machine: {platform.node()}, {platform.platform()}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs", f"- threads: OMP_NUM_THREADS={threads}", f"- device: {device}",
             f"- python {platform.python_version()}, torch {torch.__version__}"]
    if device == "cuda" and torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    runs = selected(parser, args.only)
    plan = [(r, args.seeds or r.seeds, steps(r, args.out, args.seeds or r.seeds, args.device, args.resume)) for r in runs]
    if args.dry_run:
        print(f"# OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads}; results: {args.out / 'results.md'}")
        for run, seeds, todo in plan:
            print(f"## {run.name}: {run.what} (seeds {', '.join(map(str, seeds))}); folder {args.out / run.name}")
            for step in todo:
                print(f"{step.text}    # -> {step.folder}")
        return 0
    out = args.out if args.out.is_absolute() else ROOT / args.out  # the commands run in the repository root
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    lorkd, failed = lorkd_command(), 0
    out.mkdir(parents=True, exist_ok=True)
    sections, start, finished = [], time.perf_counter(), set()
    for run, seeds, todo in plan:
        rows, ok = [], True
        for step in todo:
            if not ok:
                rows.append(f"| {step.name} | skipped | | `{step.text}` |")
                continue
            print(f"reproduce: {run.name}: {step.text}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(lorkd + step.argv, cwd=ROOT, env=env).returncode
            rows.append(f"| {step.name} | {rc} | {time.perf_counter() - t0:.0f} | `{step.text}` |")
            ok = rc == 0
        failed += not ok
        if ok:
            finished.add(run.name)
        section = [f"## {run.name}", "", f"{run.what}; `{run.config}`; seeds {', '.join(map(str, seeds))}.", "",
                   "| stage | exit | wall (s) | command |", "|---|---|---|---|", *rows, ""]
        for title, path in (("aggregate (`lorkd report`)", out / run.name / "report.md"),
                            ("transfer report", out / run.name / "transfer" / "report.md")):
            if path.is_file():
                text = path.read_text().replace("\n# ", "\n#### ").replace("\n## ", "\n#### ")
                section += [f"### {run.name}: {title}", "", text.lstrip("# ").strip(), ""]
        sections += section
    sections += comparisons(out, {run.name: seeds for run, seeds, _ in plan}, finished)
    head = ["# Reproduced results", "", *machine(args.device, args.threads),
            f"- total wall time: {time.perf_counter() - start:.0f} s", f"- command: `{shlex.join(['python', 'benchmarks/reproduce.py', *(argv if argv is not None else sys.argv[1:])])}`", ""]
    results = out / "results.md"
    results.write_text("\n".join(head + sections) + "\n")
    print(f"reproduce: wrote {results}" + (f"; {failed} run(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
