"""`lorkd bench`: the command line the README shows, the op counter, and tiny real measurements."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import nn

from lorkd import bench
from lorkd.cli import build_parser, main


def test_readme_bench_command_parses():
    args = build_parser().parse_args(
        "bench --models resnet18_2d --tasks 10 --ranks 4 --repeats 10 --out runs/bench.json".split())
    assert (args.models, args.tasks, args.ranks, args.repeats, str(args.out)) == (
        ["resnet18_2d"], [10], [4], 10, "runs/bench.json")
    assert (args.device, args.dtype, args.variants, args.no_memory) == ("cpu", "float32", ["plain", "lorkd", "grouped"], False)
    assert (args.layout, args.count_ops, args.no_timing) == ("auto", False, False)
    args = build_parser().parse_args(
        "bench --device cuda --dtype bfloat16 --variants plain lorkd --no-memory --layout lowrank --count-ops".split())
    assert (args.device, args.dtype, args.variants, args.no_memory, args.layout, args.count_ops) == (
        "cuda", "bfloat16", ["plain", "lorkd"], True, "lowrank", True)


@pytest.mark.parametrize("bad", ["--models resnet50", "--dtype float16", "--device tpu", "--tasks two",
                                 "--layout tuned", "--layout fused", "--layouts auto"])
def test_bad_bench_options_are_refused_by_argparse(bad, capsys):
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["bench", *bad.split()])
    assert err.value.code == 2
    err = capsys.readouterr().err
    assert "invalid" in err or "unrecognized" in err


def test_cuda_without_a_gpu_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert main("bench --device cuda --models resnet18_2d --tasks 2 --ranks 4".split()) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_no_timing_alone_measures_nothing_and_says_so(capsys):
    assert main("bench --no-timing".split()) == 2
    assert "--no-timing without --count-ops" in capsys.readouterr().err


def test_count_ops_of_a_hand_checkable_net():
    """Linear(3, 5) -> ReLU -> Linear(5, 2), no bias, x needs no grad, backward from a given grad:
    forward mm, clamp_min, mm; backward mm (grad of W2), mm (grad of the hidden), threshold_backward,
    mm (grad of W1): 7. The profile also holds t, transpose, as_strided and detach calls (the
    weights' transposes, AccumulateGrad): a counter that counted views would report more."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False))
    x, grad = torch.randn(4, 3), torch.randn(4, 2)

    def step():
        net.zero_grad(set_to_none=True)
        net(x).backward(grad)

    assert bench.counted_ops(step) == Counter({"aten::mm": 5, "aten::clamp_min": 1, "aten::threshold_backward": 1})
    assert bench.count_ops(step) == 7


def test_views_and_metadata_count_zero():
    x = torch.randn(4, 3)

    def step():  # every call here only makes views or reads metadata
        x.view(12).reshape(3, 4).t().unsqueeze(0).expand(2, 4, 3).permute(2, 1, 0).transpose(0, 1)[1:]
        x.select(0, 0), x.narrow(0, 1, 2), x.unsqueeze(1).squeeze(1), x.split(1), x.chunk(2), x.unbind(0), x.flatten(), x.detach()
        x.to(torch.float32), x.contiguous(), x.as_strided((2, 2), (1, 1)), x.size(), x.numel()
        torch.empty(3), torch.empty_like(x), x.new_empty(3)

    assert bench.count_ops(step) == 0
    assert bench.count_ops(lambda: x + 1) == 1  # and one elementwise op is one


def test_count_ops_of_the_benchmark_step_on_a_plain_network():
    case = bench.Case("resnet18_2d", batch=2, size=16, tasks=2, rank=2)
    counted = bench.counted_ops(bench.train_step(*bench.build_variant(case, "plain", "cpu", "float32")))
    assert not set(counted) & bench.VIEW_OPS
    assert counted["aten::mkldnn_convolution"] == 20  # one per conv layer: the innermost call of conv2d
    total = sum(counted.values())
    assert isinstance(total, int) and total > 100


def test_the_count_report_states_machine_threads_norm_and_ratios(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "default_cases", lambda models, tasks, ranks: [  # tiny, not B=32 at 64 px
        bench.Case("resnet18_2d", batch=10, size=16, tasks=t, rank=r) for t in tasks for r in ranks])
    out_file = tmp_path / "bench.json"
    assert main(f"bench --models resnet18_2d --tasks 2 10 --ranks 2 --threads 1 --count-ops --no-timing "
                f"--out {out_file}".split()) == 0
    out = capsys.readouterr().out
    assert bench.machine_info(1, "cpu")["cpu"] in out and "torch threads 1" in out and "norm=per_task" in out
    assert "lorkd10/plain" in out and "lorkd10/lorkd2" in out and "views and metadata excluded" in out
    report = json.loads(out_file.read_text())
    assert report["norm"] == "per_task" and report["machine"]["threads"] == 1
    (row,) = report["op_counts"]
    assert set(row["lorkd_ops"]) == {"2", "10"} and row["plain_ops"] > 0


def test_op_counts_of_plain_and_lorkd_at_2_and_10_tasks(capsys):
    cases = [bench.Case("resnet18_2d", batch=10, size=16, tasks=t, rank=2) for t in (2, 10)]
    (row,) = bench.count_table(cases, progress=print)
    assert row["plain_ops"] > 0 and set(row["lorkd_ops"]) == {2, 10}
    assert all(isinstance(n, int) and n > 0 for n in (row["plain_ops"], *row["lorkd_ops"].values()))
    assert row["lorkd_over_plain"] == row["lorkd_ops"][10] / row["plain_ops"]
    assert row["most_over_fewest"] == row["lorkd_ops"][10] / row["lorkd_ops"][2]
    line = capsys.readouterr().out.strip()
    assert len(line) == len(bench.count_header([2, 10]))
    print(f"tiny ResNet-18, B=10, 16 px, rank 2: plain {row['plain_ops']}, lorkd 2 tasks {row['lorkd_ops'][2]}, "
          f"10 tasks {row['lorkd_ops'][10]}")


@pytest.mark.slow
def test_a_tiny_interleaved_run_reports_training_and_inference_ratios():
    case = bench.Case("resnet18_2d", batch=4, size=16, tasks=2, rank=2)
    report = bench.run([case], repeats=2, warmup=0, device="cpu", threads=1, variants=("plain", "lorkd"),
                       memory=False, progress=lambda line: None)
    assert report["norm"] == "per_task"
    row = report["rows"][0]
    for key in ("plain_ms", "lorkd_ms", "plain_infer_ms", "lorkd_infer_ms", "lorkd_over_plain", "infer_over_plain"):
        assert row[key] > 0, key
    assert "grouped_ms" not in row
    line = bench.format_row(row)
    assert line.split()[0] == "resnet18_2d" and " - " in line  # grouped and memory columns not measured
    assert len(bench.HEADER) == len(line)


@pytest.mark.slow
def test_grouped_reference_matches_lorkd_and_memory_runs_per_variant():
    case = bench.Case("resnet18_2d", batch=4, size=16, tasks=2, rank=2)
    (lorkd, x, ids), (grouped, _, _) = (bench.build_variant(case, v, layout="lowrank") for v in ("lorkd", "grouped"))
    lorkd.eval(), grouped.eval()
    with torch.no_grad():
        torch.testing.assert_close(grouped(x, ids), lorkd(x, ids), rtol=1e-4, atol=1e-4)  # same weights (seed 0)
    report = bench.run([case], repeats=1, warmup=0, device="cpu", threads=1, layout="merged", progress=lambda line: None)
    row = report["rows"][0]
    assert row["lorkd_over_grouped"] > 0 and all(row[f"{v}_mb"] >= 0 for v in bench.BENCH_VARIANTS)
