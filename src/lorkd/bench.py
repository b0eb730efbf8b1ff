"""Speed and memory of lorkd vs the plain network vs the papers' grouped convolution.

Every variant runs the same model on the same batch, which mixes ``tasks`` tasks evenly:

``plain``    the network without experts.
``lorkd``    ``add_experts(..., norm="per_task", layout=...)``: each layer's form comes from the
             ``layout`` option (``auto``: chosen by the core from tensor sizes).
``grouped``  the papers' layout, implemented here as the reference: for each sample one
             merged kernel ``W + s B_t A_t``, all run as one convolution with ``groups=batch``
             (linear layers: one batched matmul with per-sample merged weights).

Both students use per-task BatchNorm (``norm="per_task"``), as every shipped recipe does.

Timing: all variants live in one process and are timed interleaved (each repetition runs one
training step of every variant, then one mixed-task inference step of plain and lorkd), so
load from other processes hits them alike; each ratio is the median of the per-repetition
ratios. Memory: each variant runs 2 training steps in a fresh subprocess and reports the peak
memory they added over what the model and batch already held (``VmHWM``; on CUDA,
``torch.cuda.max_memory_allocated``). Operations (``--count-ops``): the data-moving aten calls
of one training step, counted on the CPU by :func:`count_ops`, plain vs lorkd at each task count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet, resnet18
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from .errors import ConfigError
from .experts import ExpertLayer, active_routing, add_experts
from .experts.layers import LAYOUTS
from .fileio import write_json

BENCH_MODELS, BENCH_VARIANTS, BENCH_DTYPES = ("resnet18_2d", "unet_3d"), ("plain", "lorkd", "grouped"), ("float32", "bfloat16")


def bench_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``lorkd bench`` options (also those of ``python -m lorkd.bench``)."""
    p.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=BENCH_MODELS)
    p.add_argument("--tasks", nargs="+", type=int, default=[2, 10], help="tasks mixed evenly in the batch")
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=BENCH_DTYPES, help="model and input dtype")
    p.add_argument("--variants", nargs="+", default=list(BENCH_VARIANTS), choices=BENCH_VARIANTS,
                   help="what to time (plain is always measured: ratios are to it); grouped is slow on CPUs")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="lorkd's layout option (auto: the core picks each layer's form from tensor sizes)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--count-ops", action="store_true", help="also count the data-moving aten calls of one "
                   "training step, plain vs lorkd at each --tasks (torch.profiler, CPU, float32)")
    p.add_argument("--no-timing", action="store_true", help="skip the timing and memory table "
                   "(with --count-ops: the op counts alone, which a busy machine does not change)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p

@dataclass
class Case:
    model: str  # "resnet18_2d" or "unet_3d"
    batch: int
    size: int
    tasks: int
    rank: int


def build_model(name: str) -> tuple[nn.Module, int]:
    """The benchmark networks and their spatial dims (``name`` in :data:`BENCH_MODELS`)."""
    if name == "resnet18_2d":
        return resnet18(spatial_dims=2, n_input_channels=1, num_classes=10), 2
    if name == "unet_3d":
        return UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(16, 32, 64, 128, 256),
                    strides=(2, 2, 2, 2), num_res_units=2), 3
    raise ValueError(f"unknown benchmark model {name!r}; choose resnet18_2d or unet_3d")


def grouped_forward(layer, x: Tensor, output_size=None) -> Tensor:
    """The papers' layout for one ``ExpertLayer``: per-sample merged kernels, ``groups=batch``."""
    base, n_batch = layer.base, x.shape[0]
    per_sample = layer.task_weights()[active_routing().row_tasks(x)]  # [rows, *W.shape], input order
    if isinstance(base, nn.Linear):
        flat = x.reshape(n_batch, -1, x.shape[-1])
        y = torch.bmm(flat, per_sample.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        return y if base.bias is None else y + base.bias
    dims = base.weight.dim() - 2
    bias = None if base.bias is None else base.bias.repeat(n_batch)
    xs = x.reshape(1, n_batch * x.shape[1], *x.shape[2:])
    if base.transposed:
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        w = per_sample.reshape(n_batch * per_sample.shape[1], *per_sample.shape[2:])
        y = conv_t(xs, w, bias, base.stride, base.padding, base.output_padding, base.groups * n_batch, base.dilation)
    else:
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        w = per_sample.reshape(n_batch * per_sample.shape[1], *per_sample.shape[2:])
        y = conv(xs, w, bias, base.stride, base.padding, base.dilation, base.groups * n_batch)
    return y.reshape(n_batch, -1, *y.shape[2:])


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# aten ops that move no tensor data: views, metadata, allocation without a kernel, no-op
# conversions (a ``to``/``contiguous`` that does copy shows its ``copy_`` child, which counts).
VIEW_OPS = frozenset("aten::" + name for name in """
    view view_as reshape reshape_as _reshape_alias _unsafe_view expand expand_as permute t transpose
    as_strided as_strided_ unsqueeze unsqueeze_ squeeze squeeze_ select slice narrow split split_with_sizes
    unsafe_split tensor_split unbind chunk unsafe_chunk unfold diagonal movedim flatten unflatten alias
    detach detach_ empty empty_like empty_strided new_empty new_empty_strided resize_
    resolve_conj resolve_neg conj _conj _neg_view lift_fresh to contiguous result_type
    size sym_size stride sym_stride numel sym_numel dim
    is_same_size _has_compatible_shallow_copy_type""".split())


def count_ops(step) -> int:
    """Data-moving aten calls of one ``step()`` (e.g. :func:`train_step`), profiled on the CPU.

    ``step`` runs once untimed (warm-up), then once under ``torch.profiler``. A call counts when
    it is an aten op outside :data:`VIEW_OPS` none of whose aten descendants counts, i.e. a leaf
    once views and metadata are left out: ``conv2d -> convolution -> mkldnn_convolution`` counts
    once (the innermost), a view counts zero. A call that does part of its work through an aten
    helper counts as that helper (``mm`` that first clones a strided input counts as its
    ``copy_``), so the figure is a close lower bound of the kernels a GPU would launch."""
    return sum(counted_ops(step).values())


def counted_ops(step) -> Counter:
    """What :func:`count_ops` counts, by aten op name."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()

    def moves_data(event) -> bool:  # the event, or one below it, is a data-moving aten call
        return (event.name.startswith("aten::") and event.name not in VIEW_OPS) or any(
            moves_data(child) for child in event.cpu_children)

    return Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS
                   and not any(moves_data(child) for child in e.cpu_children))


NORM = "per_task"  # what every shipped recipe uses; both students are built with it


def build_variant(case: Case, variant: str, device: str = "cpu", dtype: str = "float32", layout: str = "auto"):
    """``(net, x, task_ids)`` for one variant (``task_ids`` None for plain); the students get
    :data:`NORM` and non-zero experts, as after training; ``layout`` is lorkd's layout option."""
    torch.manual_seed(0)
    model, dims = build_model(case.model)
    x = torch.randn(case.batch, 1, *([case.size] * dims), device=device, dtype=DTYPES[dtype])
    task_ids = (torch.arange(case.batch) % case.tasks).to(device)
    if variant == "plain":
        return model.to(device, DTYPES[dtype]), x, None
    net = add_experts(model, case.tasks, rank=case.rank, norm=NORM,
                      layout=layout if variant == "lorkd" else "auto").to(device, DTYPES[dtype])
    for layer in net.modules():
        if isinstance(layer, ExpertLayer):
            nn.init.normal_(layer.B, std=0.02)  # every task's B at once: [T, d0, r]
            if variant == "grouped":
                layer.forward = grouped_forward.__get__(layer)
    return net, x, task_ids


def train_step(net, x, task_ids):
    """One forward + backward in train mode, as a closure."""
    def step() -> None:
        net.train()
        net.zero_grad(set_to_none=True)
        out = net(x) if task_ids is None else net(x, task_ids)
        out.float().square().mean().backward()
    return step


def infer_step(net, x, task_ids):
    """One forward without gradients in eval mode (mixed tasks for the students), as a closure."""
    def step() -> None:
        net.eval()
        with torch.no_grad():
            net(x) if task_ids is None else net(x, task_ids)
    return step


def time_ms(step, cuda: bool = False) -> float:
    """Wall time of one ``step()`` in milliseconds (the GPU synchronised around it when ``cuda``)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    sync()
    return 1000 * (time.perf_counter() - start)


def measure_time(case: Case, variants: list[str], repeats: int, warmup: int, device: str, dtype: str,
                 layout: str = "auto") -> dict:
    """Interleaved timing in this process: each repetition times one training step of every
    variant, then one inference step of plain and lorkd, one after the other, so that load
    from other processes hits them alike. Ratios are medians of the per-repetition ratios."""
    cuda = device.startswith("cuda")
    nets = {v: build_variant(case, v, device, dtype, layout) for v in variants}
    steps = {v: train_step(*nets[v]) for v in variants}
    steps.update({f"{v}_infer": infer_step(*nets[v]) for v in ("plain", "lorkd") if v in nets})
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(time_ms(step, cuda))
    result = {**asdict(case), "device": device, "dtype": dtype, "norm": NORM, "layout": layout,
              **{f"{name}_ms": statistics.median(t) for name, t in times.items()}}
    for name in times:
        if name != "plain" and not name.endswith("_infer"):
            result[f"{name}_over_plain"] = _median_ratio(times[name], times["plain"])
    if "lorkd" in times and "grouped" in times:
        result["lorkd_over_grouped"] = _median_ratio(times["lorkd"], times["grouped"])
    if "lorkd_infer" in times:
        result["infer_over_plain"] = _median_ratio(times["lorkd_infer"], times["plain_infer"])
    return result


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def measure_memory(case: Case, variant: str, steps: int, device: str, dtype: str, layout: str = "auto") -> dict:
    """Peak memory ``steps`` training steps of one variant add, in this process (run it in a fresh
    one: :func:`run_isolated`)."""
    net, x, task_ids = build_variant(case, variant, device, dtype, layout)
    step = train_step(net, x, task_ids)
    base_mem = _peak_bytes(device)
    for _ in range(steps):
        step()
    return {"variant": variant, "peak_mb": (_peak_bytes(device) - base_mem) / 2**20}


def _peak_bytes(device: str) -> int:
    """Peak memory of this process so far: CUDA allocations, else the resident high-water mark.

    On Linux this is ``VmHWM`` (this process's own), not ``ru_maxrss``, which a child started
    by a large parent inherits across ``exec`` and would hide the child's own peak."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_isolated(case: Case, variant: str, steps: int, device: str, dtype: str, threads: int,
                 layout: str = "auto") -> dict:
    """Run :func:`measure_memory` in a fresh interpreter so that its peak memory is its own."""
    code = ("import json,sys,torch; from lorkd.bench import Case, measure_memory; "
            f"torch.set_num_threads({threads}); "
            f"print(json.dumps(measure_memory(Case(**{asdict(case)!r}), {variant!r}, {steps}, {device!r}, {dtype!r}, {layout!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed for {variant} {case}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_info(threads: int, device: str) -> dict:
    info = {"cpu": _cpu_model(), "machine": platform.machine(), "cpus": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe_machine(info: dict) -> str:
    """One line for the report: CPU model, cores, threads, torch, device (and GPU)."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"machine: {info['cpu']} ({info['machine']}, {info['cpus']} CPUs), torch threads {info['threads']}, "
            f"torch {info['torch']}, device {info['device']}{gpu}")


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def default_cases(models: list[str], tasks: list[int], ranks: list[int]) -> list[Case]:
    sizes = {"resnet18_2d": (32, 64), "unet_3d": (2, 64)}
    return [Case(m, *sizes[m], t, r) for m in models for t in tasks for r in ranks]


def run(cases: list[Case], repeats: int, warmup: int, device: str, dtype: str = "float32", threads: int = 2,
        variants: tuple[str, ...] = BENCH_VARIANTS, memory: bool = True, layout: str = "auto", progress=print) -> dict:
    """Measure every case: interleaved timing (:func:`measure_time`), then, with ``memory``,
    each variant's peak memory in a fresh process. Returns ``{"machine", "rows"}``."""
    torch.set_num_threads(threads)
    rows = []
    for case in cases:
        row = measure_time(case, list(variants), repeats, warmup, device, dtype, layout)
        if memory:
            for variant in variants:
                row[f"{variant}_mb"] = run_isolated(case, variant, 2, device, dtype, threads, layout)["peak_mb"]
            if "lorkd" in variants:
                row["mem_lorkd_over_plain"] = row["lorkd_mb"] / max(row["plain_mb"], 1e-9)
        progress(format_row(row))
        rows.append(row)
    return {"machine": machine_info(threads, device), "norm": NORM, "layout": layout, "repeats": repeats,
            "warmup": warmup, "rows": rows}


def count_table(cases: list[Case], layout: str = "auto", progress=print) -> list[dict]:
    """Op counts (:func:`count_ops` of :func:`train_step`, CPU, float32) of plain and of lorkd at
    every task count of ``cases``, one row per model, size and rank. ``lorkd_over_plain`` is at the
    most tasks; ``most_over_fewest`` compares the most tasks with the fewest."""
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault((case.model, case.batch, case.size, case.rank), []).append(case)
    rows = []
    for (model, batch, size, rank), group in groups.items():
        plain = count_ops(train_step(*build_variant(group[0], "plain")))
        lorkd = {case.tasks: count_ops(train_step(*build_variant(case, "lorkd", layout=layout)))
                 for case in sorted(group, key=lambda c: c.tasks)}
        fewest, most = min(lorkd), max(lorkd)
        row = {"model": model, "batch": batch, "size": size, "rank": rank, "plain_ops": plain,
               "lorkd_ops": lorkd, "lorkd_over_plain": lorkd[most] / plain,
               "most_over_fewest": lorkd[most] / lorkd[fewest] if most != fewest else None}
        progress(format_count_row(row))
        rows.append(row)
    return rows


def count_header(tasks: list[int]) -> str:
    """The op-count table's header for these task counts (its rows: :func:`format_count_row`)."""
    tasks = sorted(set(tasks))
    cells = [f"{'model':<12}", f"{'batch':>5}", f"{'size':>4}", f"{'rank':>4}", f"{'plain ops':>9}"]
    cells += [f"{f'lorkd {t} ops':>12}" for t in tasks]
    cells += [f"{f'lorkd{tasks[-1]}/plain':>14}", f"{f'lorkd{tasks[-1]}/lorkd{tasks[0]}':>14}"]
    return " ".join(cells)


def format_count_row(r: dict) -> str:
    cells = [f"{r['model']:<12}", f"{r['batch']:>5}", f"{r['size']:>4}", f"{r['rank']:>4}", f"{r['plain_ops']:>9}"]
    cells += [f"{n:>12}" for _, n in sorted(r["lorkd_ops"].items())]
    ratio = r["most_over_fewest"]
    cells += [f"{r['lorkd_over_plain']:>14.2f}", f"{'-':>14}" if ratio is None else f"{ratio:>14.2f}"]
    return " ".join(cells)


COLUMNS = [  # (key, header, format)
    ("model", "model", "<12"), ("batch", "batch", ">5"), ("size", "size", ">4"), ("tasks", "tasks", ">5"),
    ("rank", "rank", ">4"), ("plain_ms", "plain ms", ">9.1f"), ("lorkd_ms", "lorkd ms", ">9.1f"),
    ("grouped_ms", "grouped ms", ">10.1f"), ("lorkd_over_plain", "lorkd/plain", ">11.2f"),
    ("lorkd_over_grouped", "lorkd/grouped", ">13.2f"), ("plain_infer_ms", "infer plain ms", ">14.1f"),
    ("lorkd_infer_ms", "infer lorkd ms", ">14.1f"), ("infer_over_plain", "infer l/p", ">9.2f"),
    ("plain_mb", "plain MB", ">8.0f"), ("lorkd_mb", "lorkd MB", ">8.0f"), ("grouped_mb", "grouped MB", ">10.0f"),
    ("mem_lorkd_over_plain", "mem l/p", ">7.2f"),
]
HEADER = " ".join(f"{header:{fmt.split('.')[0]}}" for _, header, fmt in COLUMNS)


def format_row(r: dict) -> str:
    """One table row; a column the run did not measure shows ``-``."""
    cells = []
    for key, _, fmt in COLUMNS:
        value = r.get(key)
        cells.append(f"{'-':{fmt.split('.')[0]}}" if value is None else f"{value:{fmt}}")
    return " ".join(cells)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for the options parsed by :func:`bench_arguments`."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to torch here")
    if args.no_timing and not args.count_ops:
        raise ConfigError("--no-timing without --count-ops measures nothing")
    variants = tuple(v for v in BENCH_VARIANTS if v == "plain" or v in args.variants)
    cases = default_cases(args.models, args.tasks, args.ranks)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads, args.device)
    print(describe_machine(info))
    print(f"students: norm={NORM} (lorkd and grouped; as every shipped recipe), layout={args.layout}, "
          f"alpha 16, experts non-zero (B ~ N(0, 0.02)); rows: model, batch, size (pixels a side), tasks mixed "
          "evenly in the batch, rank")
    report: dict = {"machine": info, "norm": NORM, "layout": args.layout}
    if not args.no_timing:
        print(f"timing: dtype {args.dtype}; {args.repeats} timed steps after {args.warmup} warm-up, variants "
              "interleaved in one process, ratios = median of per-step ratios (x/plain, lorkd/grouped); infer = "
              "no grad, eval, mixed tasks; peak = extra memory of 2 training steps, each variant in its own process")
        print(HEADER)
        report = run(cases, args.repeats, args.warmup, args.device, args.dtype, args.threads, variants,
                     not args.no_memory, args.layout)
    if args.count_ops:
        print("operations: data-moving aten calls of one training step (forward + backward, no optimizer), "
              "views and metadata excluded; torch.profiler on the CPU, float32")
        print(count_header(args.tasks))
        report["op_counts"] = count_table(cases, args.layout)
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorkd.bench [options]``: the same options as ``lorkd bench``."""
    parser = argparse.ArgumentParser(prog="lorkd bench", description=__doc__.split("\n")[0])
    return run_from_args(bench_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
