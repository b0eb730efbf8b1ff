"""Speed and memory of one training step: plain network vs lorkd vs the papers' grouped conv.

Every variant runs the same model on the same batch, which mixes ``tasks`` tasks evenly:

``plain``    the network without experts.
``lorkd``    ``add_experts``, each layer's layout chosen by ``tune_layouts`` on the benchmark
             batch (tuned in one process, timed in another, so tuning memory is not counted).
``grouped``  the papers' layout, implemented here as the reference: for each sample one
             merged kernel ``W + s B_t A_t``, all run as one convolution with ``groups=batch``
             (linear layers: one batched matmul with per-sample merged weights).

Each variant is measured in a fresh subprocess (so that peak memory is its own): median
wall time of ``repeats`` forward+backward steps after ``warmup`` steps, and the peak resident
memory the steps added over what the model and batch already held (``ru_maxrss``; on CUDA,
``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("plain", "lorkd", "grouped")


@dataclass
class Case:
    model: str  # "resnet18_2d" or "unet_3d"
    batch: int
    size: int
    tasks: int
    rank: int


def build_model(name: str) -> tuple[nn.Module, int]:
    """The benchmark networks and their spatial dims."""
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


def measure(case: Case, variant: str, repeats: int, warmup: int, device: str, layouts: list[str] | None = None) -> dict:
    """Time ``repeats`` training steps of one variant in this process."""
    from .experts import ExpertLayer, add_experts
    from .experts.tune import median_ms

    torch.manual_seed(0)
    model, dims = build_model(case.model)
    x = torch.randn(case.batch, 1, *([case.size] * dims), device=device)
    task_ids = torch.arange(case.batch) % case.tasks
    if variant == "plain":
        net, call = model.to(device), (lambda: net(x))
    else:
        net = add_experts(model, case.tasks, rank=case.rank).to(device)
        for layer in net.modules():
            if isinstance(layer, ExpertLayer):
                nn.init.normal_(layer.experts[0].B)  # non-zero experts, as after training
                if variant == "grouped":
                    layer.forward = grouped_forward.__get__(layer)
        call = lambda: net(x, task_ids)  # noqa: E731
    net.train()

    def step() -> None:
        net.zero_grad(set_to_none=True)
        out = call()
        out.float().square().mean().backward()

    if variant == "lorkd":
        if layouts is None:  # tune here (then this process's peak memory includes the tuning)
            net.tune_layouts(x, task_ids)
            layouts = [layer.layout for _, layer in net.expert_layers()]
        for (_, layer), layout in zip(net.expert_layers(), layouts):
            layer.layout = layout
    base_mem = _peak_bytes(device)
    ms = median_ms(step, repeats, warmup, cuda=device.startswith("cuda"))
    result = {"variant": variant, **asdict(case), "median_ms": ms, "peak_mb": (_peak_bytes(device) - base_mem) / 2**20}
    if variant == "lorkd":
        result["layouts"] = layouts
    return result


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_isolated(case: Case, variant: str, repeats: int, warmup: int, device: str, threads: int,
                 layouts: list[str] | None = None) -> dict:
    """Run :func:`measure` in a fresh interpreter so that its peak memory is its own."""
    code = ("import json,sys,torch; from lorkd.bench import Case, measure; "
            f"torch.set_num_threads({threads}); "
            f"print(json.dumps(measure(Case(**{asdict(case)!r}), {variant!r}, {repeats}, {warmup}, {device!r}, {layouts!r})))")
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


def run(cases: list[Case], repeats: int, warmup: int, device: str, threads: int, progress=print) -> dict:
    """Measure every case; ``plain`` once per model. Returns ``{"machine", "results", "rows"}``."""
    results, plain = [], {}
    for case in cases:
        if case.model not in plain:
            plain[case.model] = run_isolated(case, "plain", repeats, warmup, device, threads)
            results.append(plain[case.model])
        row = {}
        # lorkd: layouts tuned per layer in one process, then timed in a fresh one (so that
        # the tuning's own memory does not count)
        tuned = run_isolated(case, "lorkd", 1, 0, device, threads)["layouts"]
        for variant in ("lorkd", "grouped"):
            row[variant] = run_isolated(case, variant, repeats, warmup, device, threads, tuned if variant == "lorkd" else None)
            results.append(row[variant])
        p, lk, gr = plain[case.model], row["lorkd"], row["grouped"]
        summary = {**asdict(case), "plain_ms": p["median_ms"], "lorkd_ms": lk["median_ms"], "grouped_ms": gr["median_ms"],
                   "lorkd_over_plain": lk["median_ms"] / p["median_ms"], "lorkd_over_grouped": lk["median_ms"] / gr["median_ms"],
                   "plain_mb": p["peak_mb"], "lorkd_mb": lk["peak_mb"], "grouped_mb": gr["peak_mb"],
                   "mem_lorkd_over_plain": lk["peak_mb"] / max(p["peak_mb"], 1e-9)}
        progress(format_row(summary))
        row.update(summary)
        results.append({"variant": "summary", **summary})
    return {"machine": machine_info(threads, device), "repeats": repeats, "warmup": warmup,
            "rows": [r for r in results if r["variant"] == "summary"], "raw": [r for r in results if r["variant"] != "summary"]}


HEADER = (f"{'model':<12} {'batch':>5} {'size':>4} {'tasks':>5} {'rank':>4} | {'plain ms':>9} {'lorkd ms':>9} "
          f"{'grouped ms':>10} | {'lorkd/plain':>11} {'lorkd/grouped':>13} | {'plain MB':>8} {'lorkd MB':>8} "
          f"{'grouped MB':>10} {'mem l/p':>7}")


def format_row(r: dict) -> str:
    return (f"{r['model']:<12} {r['batch']:>5} {r['size']:>4} {r['tasks']:>5} {r['rank']:>4} | {r['plain_ms']:>9.1f} "
            f"{r['lorkd_ms']:>9.1f} {r['grouped_ms']:>10.1f} | {r['lorkd_over_plain']:>11.2f} {r['lorkd_over_grouped']:>13.2f} | "
            f"{r['plain_mb']:>8.0f} {r['lorkd_mb']:>8.0f} {r['grouped_mb']:>10.0f} {r['mem_lorkd_over_plain']:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorkd bench", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_2d", "unet_3d"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 10])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    info = machine_info(args.threads, args.device)
    print(f"machine: {info}; {args.repeats} timed steps after {args.warmup} warm-up, median; "
          "peak = extra resident memory of the steps")
    print(HEADER)
    report = run(default_cases(args.models, args.tasks, args.ranks), args.repeats, args.warmup, args.device, args.threads)
    if args.out:
        from .fileio import write_json

        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
