"""The trainer end to end, on the tiny model and the bundled corpus (short runs)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

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
    # the start-up banner: model and size, tokens per step, data, device and kernels, where output goes
    banner = proc.stdout
    assert "model   tiny: 0.87M parameters (dim 128, 4 layers" in banner
    assert "tokens  512 per step (global_batch 8 x seq_len 64), 4 steps" in banner
    assert "data    the bundled corpus (guidelines 40%" in banner and "tokenizer byte" in banner
    assert "device  cpu x 1 (pp 1 x dp 1 x tp 1), float32, kernels auto -> torch" in banner
    assert f"output  {out} (checkpoints in {out / 'checkpoints'}, metrics in {out / 'metrics.jsonl'})" in banner


def test_evaluation_cadence_is_independent_of_logging(tmp_path):
    cfg = small_config(tmp_path, steps=6)
    cfg.eval.interval, cfg.metrics.log_interval, cfg.checkpoint.interval = 3, 5, 0
    rows = run(cfg, progress=False)
    assert [r["step"] for r in rows] == [3, 5, 6]  # a validation step is logged with the training metrics
    assert ["val_loss" in r for r in rows] == [True, False, True]
    assert all("loss" in r and "grad_norm" in r for r in rows)


def test_model_overrides_on_top_of_the_preset(tmp_path, capsys):
    cfg = small_config(tmp_path, steps=1)
    cfg.model.vocab_size, cfg.model.dim, cfg.model.n_layers, cfg.model.ffn_dim = 600, 64, 2, 96
    rows = run(cfg, progress=False)
    assert math.isfinite(rows[0]["loss"])
    assert "model   tiny (vocab_size=600, dim=64, n_layers=2, ffn_dim=96):" in capsys.readouterr().out
    with open(tmp_path / "checkpoints" / "step_00000001" / "meta.json") as f:
        shape = json.load(f)["model_config"]
    assert (shape["vocab_size"], shape["dim"], shape["n_layers"], shape["ffn_dim"], shape["n_heads"]) == \
        (600, 64, 2, 96, 4)


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


def test_resume_20_straight_equals_10_plus_10(tmp_path):
    def cfg(out, steps):
        c = small_config(out, steps=steps, decay_steps=20, micro_batch=2, global_batch=2, seq_len=32)
        c.checkpoint.interval = 10
        c.eval.interval = 0
        return c

    straight = run(cfg(tmp_path / "a", 20), progress=False)
    run(cfg(tmp_path / "b", 10), progress=False)
    resumed = run(cfg(tmp_path / "b", 20), resume=True, progress=False)
    assert [r["loss"] for r in straight[10:]] == [r["loss"] for r in resumed]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    from model import Llama, LlamaConfig
    from train.parallelize import apply_activation_checkpointing

    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=96, max_seq_len=32)
    torch.manual_seed(0)
    plain = Llama(cfg)
    wrapped = Llama(cfg)
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped, mode)
    tokens = torch.randint(0, 50, (2, 16))
    cu = torch.tensor([0, 5, 16, 32], dtype=torch.int32)
    for m in (plain, wrapped):
        m.loss(tokens, tokens, cu_seqlens=cu, max_seqlen=16).backward()
    grads = dict(plain.named_parameters())
    for name, p in wrapped.named_parameters():
        name = name.replace("._checkpoint_wrapped_module", "")
        assert torch.equal(p.grad, grads[name].grad), name


def test_compiled_blocks_train_like_eager(tmp_path):
    eager = run(small_config(tmp_path / "e", steps=2), progress=False)
    compiled = run(small_config(tmp_path / "c", steps=2, compile=True), progress=False)
    for a, b in zip(eager, compiled):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_export_then_transformers_and_init_from_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    from model import Llama

    run(small_config(tmp_path / "run", steps=3), progress=False)
    from train.export import main as export_main

    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = Llama.from_hf(tmp_path / "hf")
    tokens = torch.randint(0, 258, (1, 12))
    ref = hf(tokens).logits
    assert (ours(tokens) - ref).abs().max() <= 1e-4 * ref.abs().max()

    # continued pretraining from the exported checkpoint starts at its loss, not a random model's
    cfg = small_config(tmp_path / "cont", steps=1)
    cfg.model.init_from_hf = str(tmp_path / "hf")
    first = run(cfg, progress=False)[0]["loss"]
    fresh = run(small_config(tmp_path / "fresh", steps=1), progress=False)[0]["loss"]
    assert first < fresh - 0.3


def test_export_without_checkpoint_is_an_error(tmp_path, capsys):
    from train.export import main as export_main

    assert export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_mfu_arithmetic_reproduces_meditron():
    from train.metrics import mfu

    assert round(mfu(6 * 70e9, 40_200, 128, 312e12) * 100, 1) == 42.3


@pytest.mark.parametrize("dtype", ["bfloat16", "bfloat16-params"])
def test_bf16_modes_train(tmp_path, dtype):
    rows = run(small_config(tmp_path, steps=4, dtype=dtype, lr=3e-3), progress=False)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
