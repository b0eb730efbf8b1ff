"""Speed and memory of lorkd vs the plain network vs the papers' grouped convolution.

Every variant runs the same model on the same batch, which mixes ``tasks`` tasks evenly:

``plain``    the network without experts.
``lorkd``    ``add_experts``, each layer's layouts (training and inference) chosen by
             ``tune_layouts`` on the benchmark batch.
``grouped``  the papers' layout, implemented here as the reference: for each sample one
             merged kernel ``W + s B_t A_t``, all run as one convolution with ``groups=batch``
             (linear layers: one batched matmul with per-sample merged weights).

Timing: all variants live in one process and are timed interleaved (each repetition runs one
training step of every variant, then one mixed-task inference step of plain and lorkd), so
load from other processes hits them alike; each ratio is the median of the per-repetition
ratios. Memory: each variant runs 2 training steps in a fresh subprocess and reports the peak
memory they added over what the model and batch already held (``VmHWM``; on CUDA,
``torch.cuda.max_memory_allocated``).
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
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cli import BENCH_VARIANTS as VARIANTS  # one list for the CLI and the benchmark


@dataclass
class Case:
    model: str  # "resnet18_2d" or "unet_3d"
    batch: int
    size: int
    tasks: int
    rank: int


def build_model(name: str) -> tuple[nn.Module, int]:
    """The benchmark networks and their spatial dims (``name`` in :data:`lorkd.cli.BENCH_MODELS`)."""
    from monai.networks.nets import UNet, resnet18

    if name == "resnet18_2d":
        return resnet18(spatial_dims=2, n_input_channels=1, num_classes=10), 2
    if name == "unet_3d":
        return UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(16, 32, 64, 128, 256),
                    strides=(2, 2, 2, 2), num_res_units=2), 3
    raise ValueError(f"unknown benchmark model {name!r}; choose resnet18_2d or unet_3d")


def grouped_forward(layer, x: Tensor, output_size=None) -> Tensor:
    """The papers' layout for one ``ExpertLayer``: per-sample merged kernels, ``groups=batch``."""
    from .experts.routing import active_routing

    routing = active_routing()
    tasks = torch.cat([torch.full((s.length,), s.task) for s in routing.segments])
    base, n_batch = layer.base, x.shape[0]
    deltas = torch.stack([layer.experts[t].delta() for t in range(len(layer.experts))])
    per_sample = base.weight.unsqueeze(0) + layer.scale * deltas[tasks].view(n_batch, *base.weight.shape)
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
    detach detach_ empty empty_like empty_strided resize_ resolve_conj resolve_neg conj _conj _neg_view
    lift_fresh to contiguous result_type size sym_size stride sym_stride numel sym_numel dim
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
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()

    def moves_data(event) -> bool:  # the event, or one below it, is a data-moving aten call
        return (event.name.startswith("aten::") and event.name not in VIEW_OPS) or any(
            moves_data(child) for child in event.cpu_children)

    return Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS
                   and not any(moves_data(child) for child in e.cpu_children))




def build_variant(case: Case, variant: str, device: str, dtype: str, layouts: list[str] | None = None, tune: bool = True):
    """``(net, x, task_ids)`` for one variant; ``lorkd`` layouts are tuned here when not given
    (and ``tune``; else the ``auto`` rule decides)."""
    from .experts import ExpertLayer, add_experts

    torch.manual_seed(0)
    model, dims = build_model(case.model)
    x = torch.randn(case.batch, 1, *([case.size] * dims), device=device, dtype=DTYPES[dtype])
    task_ids = (torch.arange(case.batch) % case.tasks).to(device)
    if variant == "plain":
        return model.to(device, DTYPES[dtype]), x, None
    net = add_experts(model, case.tasks, rank=case.rank).to(device, DTYPES[dtype])
    for layer in net.modules():
        if isinstance(layer, ExpertLayer):
            for expert in layer.experts:
                nn.init.normal_(expert.B, std=0.02)  # non-zero experts, as after training
            if variant == "grouped":
                layer.forward = grouped_forward.__get__(layer)
    if variant == "lorkd":
        net.train()
        if layouts is None and tune:
            net.tune_layouts(x, task_ids)
            net.tune_layouts(x, task_ids, inference=True)
        elif layouts is not None:
            for (_, layer), layout in zip(net.expert_layers(), layouts):
                layer.layout = layout
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


def measure_time(case: Case, variants: list[str], repeats: int, warmup: int, device: str, dtype: str,
                 tune: bool = True) -> dict:
    """Interleaved timing in this process: each repetition times one training step of every
    variant, then one inference step of plain and lorkd, one after the other, so that load
    from other processes hits them alike. Ratios are medians of the per-repetition ratios."""
    from .experts.tune import median_ms

    cuda = device.startswith("cuda")
    nets = {v: build_variant(case, v, device, dtype, tune=tune) for v in variants}
    steps = {v: train_step(*nets[v]) for v in variants}
    steps.update({f"{v}_infer": infer_step(*nets[v]) for v in ("plain", "lorkd") if v in nets})
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(median_ms(step, 1, warmup=0, cuda=cuda))
    result = {**asdict(case), "device": device, "dtype": dtype,
              **{f"{name}_ms": statistics.median(t) for name, t in times.items()}}
    for name in times:
        if name != "plain" and not name.endswith("_infer"):
            result[f"{name}_over_plain"] = _median_ratio(times[name], times["plain"])
    if "lorkd" in times and "grouped" in times:
        result["lorkd_over_grouped"] = _median_ratio(times["lorkd"], times["grouped"])
    if "lorkd_infer" in times:
        result["infer_over_plain"] = _median_ratio(times["lorkd_infer"], times["plain_infer"])
    if "lorkd" in nets:
        result["layouts"] = [layer.layout for _, layer in nets["lorkd"][0].expert_layers()]
        result["infer_layouts"] = [layer.infer_layout for _, layer in nets["lorkd"][0].expert_layers()]
    return result


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def measure_memory(case: Case, variant: str, steps: int, device: str, dtype: str, layouts: list[str] | None) -> dict:
    """Peak memory ``steps`` training steps of one variant add, in this process (run it in a fresh
    one: :func:`run_isolated`)."""
    net, x, task_ids = build_variant(case, variant, device, dtype, layouts)
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
                 layouts: list[str] | None = None) -> dict:
    """Run :func:`measure_memory` in a fresh interpreter so that its peak memory is its own."""
    code = ("import json,sys,torch; from lorkd.bench import Case, measure_memory; "
            f"torch.set_num_threads({threads}); "
            f"print(json.dumps(measure_memory(Case(**{asdict(case)!r}), {variant!r}, {steps}, {device!r}, {dtype!r}, {layouts!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed for {variant} {case}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_info(threads: int, device: str) -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor() or _cpu_model(),
            "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def default_cases(models: list[str], tasks: list[int], ranks: list[int]) -> list[Case]:
    sizes = {"resnet18_2d": (32, 64), "unet_3d": (2, 64)}
    return [Case(m, *sizes[m], t, r) for m in models for t in tasks for r in ranks]


def run(cases: list[Case], repeats: int, warmup: int, device: str, dtype: str = "float32", threads: int = 2,
        variants: tuple[str, ...] = VARIANTS, memory: bool = True, tune: bool = True, progress=print) -> dict:
    """Measure every case: interleaved timing (:func:`measure_time`), then, with ``memory``,
    each variant's peak memory in a fresh process. Returns ``{"machine", "rows"}``."""
    torch.set_num_threads(threads)
    rows = []
    for case in cases:
        row = measure_time(case, list(variants), repeats, warmup, device, dtype, tune)
        if memory:
            for variant in variants:
                layouts = row.get("layouts") if variant == "lorkd" else None
                row[f"{variant}_mb"] = run_isolated(case, variant, 2, device, dtype, threads, layouts)["peak_mb"]
            if "lorkd" in variants:
                row["mem_lorkd_over_plain"] = row["lorkd_mb"] / max(row["plain_mb"], 1e-9)
        progress(format_row(row))
        rows.append(row)
    return {"machine": machine_info(threads, device), "repeats": repeats, "warmup": warmup, "rows": rows}


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
    """Run the benchmark for the options parsed by :func:`lorkd.cli.bench_arguments`."""
    if args.device == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError("--device cuda: no CUDA device is available to torch here")
    variants = tuple(v for v in VARIANTS if v == "plain" or v in args.variants)
    info = machine_info(args.threads, args.device)
    print(f"machine: {info}; dtype {args.dtype}; layouts {args.layouts}; {args.repeats} timed steps after {args.warmup} warm-up, "
          "variants interleaved in one process, ratios = median of per-step ratios; infer = no grad, eval, "
          "mixed tasks; peak = extra memory of 2 training steps, each variant in its own process")
    print(HEADER)
    report = run(default_cases(args.models, args.tasks, args.ranks), args.repeats, args.warmup, args.device,
                 args.dtype, args.threads, variants, not args.no_memory, args.layouts == "tuned")
    if args.out:
        from .fileio import write_json

        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorkd.bench [options]``: the same options as ``lorkd bench``."""
    from .cli import bench_arguments

    parser = argparse.ArgumentParser(prog="lorkd bench", description=__doc__.split("\n")[0])
    return run_from_args(bench_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
