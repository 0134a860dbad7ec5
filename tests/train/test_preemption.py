"""SIGTERM and SIGINT (Slurm and Kubernetes preemption, Ctrl-C): a checkpoint at the next step
boundary, a clean exit with 128 + signal, and a resume that continues the unbroken run exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from train.config import Config
from train.trainer import Hooks, TrainingInterrupted, run

from tests.helpers import tiny_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--steps", "5", "--training.seq_len=64", "--training.micro_batch=2", "--training.global_batch=2",
        "--training.warmup_steps=1", "--metrics.log_interval=1", "--checkpoint.interval=0", "--eval.interval=0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tiny(out_dir, steps=5) -> Config:
    return tiny_run_config(out_dir, steps, checkpoint_interval=0)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return run(tiny(tmp_path_factory.mktemp("straight") / "run"), progress=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_step_boundary_and_resume_is_exact(tmp_path, straight, sig):
    """In one process: the signal arrives during step 3 (0-based 2); step 3 finishes, is
    saved, and the resumed run's steps 4 and 5 equal the unbroken run's bit for bit."""

    def send(step):
        if step == 2:
            os.kill(os.getpid(), sig)

    with pytest.raises(TrainingInterrupted) as info:
        run(tiny(tmp_path / "cut"), hooks=Hooks(before_step=send), progress=False)
    assert (info.value.signum, info.value.step) == (sig, 3)
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["step_00000003"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = run(tiny(tmp_path / "cut"), resume=True, progress=False)
    assert [r["step"] for r in resumed] == [4, 5]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[3:]]
    assert [r["loss"] for r in read_metrics(tmp_path / "cut")] == [r["loss"] for r in straight]


@pytest.fixture(scope="module")
def straight_cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = subprocess.run([sys.executable, "-m", "train", "--out-dir", str(out), *ARGS], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_metrics(out)


def test_sigterm_to_python_m_train_then_resume(tmp_path, straight_cli):
    """The command line as a scheduler sees it: SIGTERM once two steps are logged."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train", "--out-dir", str(out), *ARGS], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("training interrupted: SIGTERM after step")]
    assert len(lines) == 1 and "continue with --resume" in lines[0]
    saved = sorted(os.listdir(out / "checkpoints"))
    assert len(saved) == 1 and 2 <= int(saved[0][5:]) < 5
    resumed = subprocess.run([sys.executable, "-m", "train", "--out-dir", str(out), *ARGS, "--resume"], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in rows] == [r[key] for r in straight_cli]


@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """torchrun, gloo, world 2 (dp 2): rank 1 alone gets SIGTERM before step 2; the per-step
    stop flag makes both ranks save step 2 and leave; the resumed job matches one process."""
    from test_parallel import BASE, assert_same_curve, single, torchrun

    ref = single(tmp_path / "single", "--steps", "4")
    out = tmp_path / "dist"
    args = ["-m", "train", *BASE[:-2], "--steps", "4", "--out-dir", str(out)]
    proc = torchrun(2, args, env={"MEDITRON_TRAIN_TEST_SIGTERM_RANK_AT_STEP": "1:1"})
    assert proc.returncode != 0
    assert "training interrupted: SIGTERM after step 2" in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002"]
    proc = torchrun(2, args + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stdout and "step_00000002" in proc.stdout
    assert_same_curve(read_metrics(out), ref)
