"""Logs (issue 12.8): start-up summary, progress lines off a terminal, optional TensorBoard scalars."""

from __future__ import annotations

import io
import logging

import pytest
import torch
import yaml

from lorkd import cli
from lorkd.engine import fit
from lorkd.engine.distributed import DistributedContext
from lorkd.engine.handlers import ScalarsHandler
from lorkd.engine.progress import LineProgress, progress_bar
from lorkd.engine.scalars import ScalarLog, tensorboard_writer_class
from lorkd.errors import ConfigError

from test_cli import TINY
from test_engine_trainer import NAMES, _cfg, _objective, _setup


class FakeWriter:
    """Records add_scalar calls as a SummaryWriter would receive them."""

    def __init__(self):
        self.scalars, self.flushes, self.closed = [], 0, False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def test_progress_off_a_terminal_is_a_line_every_tenth():
    stream = io.StringIO()  # not a TTY
    bar = progress_bar(40, 0, "student", True, stream=stream)
    assert isinstance(bar, LineProgress)
    for step in range(40):
        bar.set_postfix(epoch=step // 20, loss="0.5")
        bar.update(1)
    bar.write("[student] epoch=1 loss=0.5")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in stream.getvalue()
    assert lines[0].startswith("[student] step 4/40 (10%), epoch=0 loss=0.5, ")
    assert lines[9].startswith("[student] step 40/40 (100%), epoch=1") and "steps/s" in lines[9]
    assert not isinstance(progress_bar(40, 0, "x", False, stream=io.StringIO()), LineProgress)


def test_resumed_progress_counts_from_where_it_was():
    stream = io.StringIO()
    bar = LineProgress(10, initial=6, desc="t", every=0.5, stream=stream, clock=iter(range(100)).__next__)
    for _ in range(4):
        bar.update(1)
    bar.close()
    assert stream.getvalue().splitlines() == ["[t] step 10/10 (100%), 4 steps/s, eta 00:00:00"]  # 4 steps in 1 s


def test_fit_writes_each_epoch_as_scalars_through_an_injected_writer(tmp_path):
    data, model, sampler = _setup()
    writer = FakeWriter()
    fit_result = fit(
        model, _objective(), data, sampler, _cfg(), tmp_path, DistributedContext(), task_names=NAMES,
        handlers=[ScalarsHandler(ScalarLog(writer, prefix="teacher/"))])
    rows = fit_result.history
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"teacher/loss", "teacher/lr", "teacher/loss/task0"} <= tags and "teacher/epoch" not in tags
    assert [(v, s) for t, v, s in writer.scalars if t == "teacher/loss"] == [(r["loss"], r["step"]) for r in rows]
    assert writer.flushes == 2


def test_tensorboard_without_the_package_is_refused_before_training(tmp_path, capsys):
    try:  # the refusal is observable only where tensorboard is absent (as in this project's venv)
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed here: the refusal cannot be observed")
    with pytest.raises(ConfigError, match="logging.tensorboard.*pip install tensorboard"):
        tensorboard_writer_class()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "logging": {"tensorboard": True}}))
    (tmp_path / "run").mkdir()  # a folder that existed before the command stays, empty
    assert cli.main(["pretrain", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "logging.tensorboard" in capsys.readouterr().err
    assert (tmp_path / "run").is_dir() and not any((tmp_path / "run").iterdir())


@pytest.mark.slow
def test_run_logs_a_start_up_summary_and_steps_per_epoch(tmp_path, caplog):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    with caplog.at_level(logging.INFO, logger="lorkd"):
        assert cli.main(["pretrain", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    text = caplog.text
    assert f"device cpu, {torch.get_num_threads()} torch threads" in text and "world size 1" in text
    assert "task synth_xray: train 48, val 24, test 24" in text
    assert "[teacher] 1 epochs x 6 steps per epoch (batch 16 per rank x world size 1; 96 training items)" in text
