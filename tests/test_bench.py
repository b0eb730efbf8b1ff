"""`lorkd bench`: the command line the README shows, and one tiny real measurement."""

from __future__ import annotations

import pytest

from lorkd import bench
from lorkd.cli import build_parser, main


def test_readme_bench_command_parses():
    args = build_parser().parse_args(
        "bench --models resnet18_2d --tasks 10 --ranks 4 --repeats 10 --out runs/bench.json".split())
    assert (args.models, args.tasks, args.ranks, args.repeats, str(args.out)) == (
        ["resnet18_2d"], [10], [4], 10, "runs/bench.json")
    assert (args.device, args.dtype, args.variants, args.no_memory) == ("cpu", "float32", ["plain", "lorkd", "grouped"], False)
    assert args.layouts == "tuned"
    args = build_parser().parse_args("bench --device cuda --dtype bfloat16 --variants plain lorkd --no-memory --layouts auto".split())
    assert (args.device, args.dtype, args.variants, args.no_memory, args.layouts) == (
        "cuda", "bfloat16", ["plain", "lorkd"], True, "auto")


@pytest.mark.parametrize("bad", ["--models resnet50", "--dtype float16", "--device tpu", "--tasks two", "--layouts best"])
def test_bad_bench_options_are_refused_by_argparse(bad, capsys):
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["bench", *bad.split()])
    assert err.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert main("bench --device cuda --models resnet18_2d --tasks 2 --ranks 4".split()) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_interleaved_run_reports_training_and_inference_ratios():
    case = bench.Case("resnet18_2d", batch=4, size=16, tasks=2, rank=2)
    report = bench.run([case], repeats=2, warmup=0, device="cpu", threads=1, variants=("plain", "lorkd"),
                       memory=False, progress=lambda line: None)
    row = report["rows"][0]
    for key in ("plain_ms", "lorkd_ms", "plain_infer_ms", "lorkd_infer_ms", "lorkd_over_plain", "infer_over_plain"):
        assert row[key] > 0, key
    assert len(row["layouts"]) == 21 and "grouped_ms" not in row
    line = bench.format_row(row)
    assert line.split()[0] == "resnet18_2d" and " - " in line  # grouped and memory columns not measured
    assert len(bench.HEADER) == len(line)
