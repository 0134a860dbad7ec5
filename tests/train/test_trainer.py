"""The trainer end to end, on the tiny model and the bundled corpus (short runs)."""
import json
import math
import os
import subprocess
import sys

import pytest

from train.config import Config
from train.trainer import Hooks, TrainingStopped, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(out_dir, **training) -> Config:
    cfg = Config()
    cfg.out_dir = str(out_dir)
    cfg.training.steps = 6
    cfg.training.micro_batch = 2
    cfg.training.global_batch = 4
    cfg.training.seq_len = 64
    cfg.training.warmup_steps = 2
    for k, v in training.items():
        setattr(cfg.training, k, v)
    cfg.metrics.log_interval = 1
    cfg.checkpoint.interval = 3
    cfg.eval.interval = 3
    cfg.eval.batches = 1
    return cfg


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_python_m_train_default_entry_point_runs(tmp_path):
    """The README's main command, shortened: a subprocess, as a user runs it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "--out-dir", str(out), "--steps", "4", "--training.seq_len=64",
           "--metrics.log_interval=2", "--eval.interval=4", "--eval.batches=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mfu_paper", "skipped_steps"):
        assert key in rows[0]
    assert rows[0]["mfu"] is None  # unknown peak on the CPU
    assert "val_loss" in rows[-1]
    assert os.path.isdir(out / "checkpoints" / "step_00000004")


def test_loss_falls_and_metrics_are_sane(tmp_path):
    cfg = small_config(tmp_path, steps=12, lr=3e-3)
    cfg.checkpoint.interval = 0
    rows = run(cfg, progress=False)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert all(math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["lr"] == pytest.approx(3e-3 / 2)  # warmup: step 1 of 2


def test_resume_is_exact(tmp_path):
    # the schedule's horizon is pinned (decay_steps), so stopping early does not change it
    straight = run(small_config(tmp_path / "a", decay_steps=4), progress=False)
    first = run(small_config(tmp_path / "b", steps=3, decay_steps=4), progress=False)
    assert [r["loss"] for r in first] == [r["loss"] for r in straight[:3]]
    resumed = run(small_config(tmp_path / "b", decay_steps=4), resume=True, progress=False)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[3:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight[3:]]
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]


def test_nan_is_skipped_and_counted(tmp_path):
    def inject(step, micro, loss):
        return loss * float("nan") if step == 2 and micro == 1 else loss

    cfg = small_config(tmp_path)
    rows = run(cfg, hooks=Hooks(loss=inject), progress=False)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    assert not math.isfinite(rows[2]["loss"])


def test_nan_stop_policy_saves_last_good_state(tmp_path):
    def inject(step, micro, loss):
        return loss * float("inf") if step == 4 else loss

    cfg = small_config(tmp_path, nan_policy="stop")
    cfg.checkpoint.interval = 0
    with pytest.raises(TrainingStopped, match="step 5"):
        run(cfg, hooks=Hooks(loss=inject), progress=False)
    saved = os.listdir(tmp_path / "checkpoints")
    assert saved == ["step_00000004"]
