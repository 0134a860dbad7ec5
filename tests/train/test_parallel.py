"""3-D parallel training under torchrun (gloo on the CPU, float32, the tiny model).

Every layout must train like one process: same losses and gradient norms at every step, to
1e-5 relative. Runs of one world size share one torchrun job (tests/train/dist_runs.py), so the
file pays for few process start-ups.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from train.config import Config, ConfigError, parse_args, validate, validate_parallel
from train.trainer import run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, "tests", "train", "dist_runs.py")

# One configuration for every layout: 4 sequences of 32 tokens per step in micro batches of 1,
# so dp 2 accumulates 2 micro batches and a 2-stage pipeline has 4 (or 2) to schedule; the 4
# validation batches fill whole pipeline rounds either way. The LR schedule's horizon is
# pinned (decay_steps) so runs of different lengths share it.
BASE = ["--training.seq_len=32", "--training.micro_batch=1", "--training.global_batch=4",
        "--training.warmup_steps=1", "--training.decay_steps=3", "--metrics.log_interval=1",
        "--eval.interval=3", "--eval.batches=4", "--checkpoint.interval=0", "--steps", "3"]
STEPS = 3
REL = 1e-5


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchrun(nproc, args, timeout=300, env=None, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra, *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_job(nproc, runs, tmp):
    """Run a list of {"out_dir", "args", ...} one after another in one torchrun job."""
    spec = tmp / f"spec-{nproc}.json"
    spec.write_text(json.dumps(runs))
    proc = torchrun(nproc, [RUNNER, str(spec)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def single(out_dir, *args, resume=False):
    cfg, _ = parse_args(BASE + list(args) + ["--out-dir", str(out_dir)])
    return run(cfg, resume=resume, progress=False)


def assert_same_weights(name, p, q) -> None:
    """Weights agree to REL in norm. AdamW moves an element by about lr whatever the size of its
    gradient, so where a gradient is a cancellation near zero, the layouts' different fp32
    summation orders move that element differently (measured: 16 of 16384 elements of an attention
    output projection, by up to 2.8e-7 after one step, 1.4e-4 of lr). Such sparse noise is ~1e-6
    of the weights' norm; a wrong shard, a skipped or doubled step or one element off by a learning
    rate is more than 1e-3 of it."""
    assert (p - q).norm() <= REL * p.norm(), name


def assert_same_curve(rows, ref, steps=None):
    steps = steps or [r["step"] for r in ref]
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == sorted(steps), (sorted(by_step), steps)
    for r in ref:
        if r["step"] not in by_step:
            continue
        got = by_step[r["step"]]
        assert ("val_loss" in got) == ("val_loss" in r), r["step"]
        for key in ("loss", "grad_norm", "val_loss"):
            if key not in r:
                continue
            assert math.isfinite(got[key])
            assert abs(got[key] - r[key]) <= REL * abs(r[key]), (r["step"], key, got[key], r[key])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process run every layout is compared with (4 steps, checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("single")
    rows = single(out, "--steps", "4", "--checkpoint.interval=2")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    return out, rows


@pytest.fixture(scope="module")
def hf_start(reference, tmp_path_factory):
    """An HF directory (the reference's step-2 weights) and the one-process run started from it."""
    from train.export import main as export_main

    hf = tmp_path_factory.mktemp("hf")
    assert export_main(["--checkpoint", str(reference[0] / "checkpoints" / "step_00000002"), "--out", str(hf),
                        "--dtype", "float32"]) == 0
    rows = single(tmp_path_factory.mktemp("from-hf"), f"--model.init_from_hf={hf}")
    return hf, rows


# ---------------------------------------------------------------------------- world 2
WORLD2 = {
    "tp2": ["--parallel.tp=2"],
    "tp2-no-sequence-parallel": ["--parallel.tp=2", "--parallel.sequence_parallel=false"],
    "pp2-1f1b": ["--parallel.pp=2", "--parallel.pp_schedule=1f1b"],
    "pp2-gpipe": ["--parallel.pp=2", "--parallel.pp_schedule=gpipe"],
    "pp2-interleaved-1f1b": ["--parallel.pp=2", "--parallel.pp_schedule=interleaved-1f1b",
                             "--parallel.virtual_stages=2"],
    "pp2-zbv": ["--parallel.pp=2", "--parallel.pp_schedule=zbv", "--parallel.virtual_stages=2"],
    "dp2-fsdp": ["--parallel.fsdp=true"],
    "dp2-replicated": ["--parallel.fsdp=false"],
}


@pytest.fixture(scope="module")
def world2(tmp_path_factory, hf_start):
    tmp = tmp_path_factory.mktemp("world2")
    runs = [{"out_dir": str(tmp / name), "args": BASE + args} for name, args in WORLD2.items()]
    runs.append({"out_dir": str(tmp / "tp2-from-hf"),
                 "args": BASE + ["--parallel.tp=2", f"--model.init_from_hf={hf_start[0]}"]})
    run_job(2, runs, tmp)
    return tmp


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(WORLD2))
def test_world2_layouts_match_one_process(world2, reference, layout):
    _, ref = reference
    assert_same_curve(read_metrics(world2 / layout), ref[:STEPS])


@pytest.mark.distributed
def test_tp2_continued_pretraining_from_hf(world2, hf_start):
    """--model.init_from_hf loads each rank's slices straight from the safetensors."""
    assert_same_curve(read_metrics(world2 / "tp2-from-hf"), hf_start[1])


# ---------------------------------------------------------------------------- world 4
@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    """TP 2 x PP 2 for 4 steps with checkpoints at 2 and 4; its step-2 checkpoint resumed as
    TP 1 x PP 4; TP 4 on a model with 2 kv heads (kv heads replicated)."""
    tmp = tmp_path_factory.mktemp("world4")
    long = BASE[:-2] + ["--steps", "4", "--checkpoint.interval=2"]
    runs = [
        {"out_dir": str(tmp / "tp2pp2"), "args": long + ["--parallel.tp=2", "--parallel.pp=2"]},
        {"out_dir": str(tmp / "pp4-resumed"), "args": long + ["--parallel.pp=4"], "resume": True,
         "copy_from": str(tmp / "tp2pp2"), "keep_until": 2},
        {"out_dir": str(tmp / "tp4"), "args": BASE + ["--parallel.tp=4"]},
    ]
    proc = run_job(4, runs, tmp)
    return tmp, proc


@pytest.mark.distributed
def test_tp2_pp2_matches_one_process(world4, reference):
    tmp, _ = world4
    assert_same_curve(read_metrics(tmp / "tp2pp2"), reference[1])


@pytest.mark.distributed
def test_tp4_replicates_the_two_kv_heads(world4, reference):
    tmp, _ = world4
    assert_same_curve(read_metrics(tmp / "tp4"), reference[1][:STEPS])


@pytest.mark.distributed
def test_resume_tp2_pp2_checkpoint_as_pp4(world4, reference):
    tmp, proc = world4
    assert "resuming from" in proc.stdout and "step_00000002" in proc.stdout
    rows = read_metrics(tmp / "pp4-resumed")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the first two kept from before the checkpoint
    assert_same_curve(rows, reference[1])


@pytest.mark.distributed
def test_resume_tp2_pp2_checkpoint_in_one_process(world4, reference, tmp_path):
    tmp, _ = world4
    from dist_runs import copy_run

    out = tmp_path / "resumed"
    copy_run(str(tmp / "tp2pp2"), str(out), keep_until=2)
    rows = single(out, "--steps", "4", "--checkpoint.interval=2", resume=True)
    assert [r["step"] for r in rows] == [3, 4]
    assert_same_curve(rows, reference[1], steps=[3, 4])
    # and the weights after the last step equal the unbroken run's
    from train.export import load_model

    a = load_model(str(reference[0] / "checkpoints" / "step_00000004"))
    b = load_model(str(out / "checkpoints" / "step_00000004"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_same_weights(name, p, q)


@pytest.mark.distributed
def test_export_from_distributed_checkpoint(world4, reference, tmp_path):
    tmp, _ = world4
    from model import Llama
    from train.export import load_model, main as export_main

    ckpt = tmp / "tp2pp2" / "checkpoints" / "step_00000004"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    exported = Llama.from_hf(tmp_path / "hf")
    ref = load_model(str(reference[0] / "checkpoints" / "step_00000004"))
    for (name, p), q in zip(ref.named_parameters(), exported.parameters()):
        assert_same_weights(name, p, q)


# ---------------------------------------------------------------------------- world 8
@pytest.mark.distributed
def test_pp2_dp2_tp2_world8_matches_one_process(reference, tmp_path):
    """FSDP under 1F1B, and replication (FSDP's hybrid mode, shards of one rank) under the
    interleaved schedule."""
    w8 = BASE + ["--parallel.tp=2", "--parallel.pp=2"]
    replicated = w8 + ["--parallel.fsdp=false", "--parallel.pp_schedule=interleaved-1f1b", "--parallel.virtual_stages=2"]
    run_job(8, [{"out_dir": str(tmp_path / "fsdp"), "args": w8},
                {"out_dir": str(tmp_path / "replicated"), "args": replicated}], tmp_path)
    for name in ("fsdp", "replicated"):
        assert_same_curve(read_metrics(tmp_path / name), reference[1][:STEPS])


# ---------------------------------------------------------------------------- faults
@pytest.mark.distributed
def test_killed_rank_restarts_and_resumes(reference, tmp_path):
    """Rank 1 is SIGKILLed at step 4 (after the step-2 checkpoint); torchrun restarts the job,
    which resumes on its own and finishes with the unbroken run's curve."""
    out = tmp_path / "fault"
    args = ["-m", "train", *BASE[:-2], "--steps", "4", "--checkpoint.interval=2", "--out-dir", str(out)]
    proc = torchrun(2, args, extra=["--max-restarts=1"], env={"MEDITRON_TRAIN_TEST_KILL_RANK_AT_STEP": "1:3"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr  # the kill happened ...
    assert "resuming from" in proc.stdout and "step_00000002" in proc.stdout  # ... and the restart resumed
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert_same_curve(rows, reference[1])


# ---------------------------------------------------------------------------- validation
def _cfg(**changes) -> Config:
    cfg = Config()
    cfg.training.micro_batch, cfg.training.global_batch = 1, 8
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("world,changes,match", [
    (6, dict(parallel__tp=4), r"world size 6 is not divisible by parallel.tp x parallel.pp = 4 x 1 = 4"),
    (8, dict(training__global_batch=4), r"training.global_batch \(4\) must be divisible by training.micro_batch x dp "
                                        r"\(1 x 8 = 8\)"),
])
def test_startup_errors_of_the_world(world, changes, match):
    with pytest.raises(ConfigError, match=match):
        validate(_cfg(**changes), world_size=world)


@pytest.mark.parametrize("world,changes,match", [
    (8, dict(parallel__tp=8), r"n_heads \(4\) is not divisible by parallel.tp \(8\)"),
    (8, dict(parallel__pp=8), r"4 layers, fewer than the pipeline stages parallel.pp x parallel.virtual_stages "
                              r"= 8 x 1 = 8"),
    (4, dict(parallel__pp=2, parallel__pp_schedule="interleaved-1f1b", parallel__virtual_stages=3),
     r"4 layers, fewer than the pipeline stages parallel.pp x parallel.virtual_stages = 2 x 3 = 6"),
    (2, dict(parallel__pp=2, parallel__pp_schedule="zbv"), r"parallel.virtual_stages = 2, got 1"),
    (2, dict(parallel__pp=2, training__global_batch=2, training__micro_batch=2), r"1 micro batches per step, "
                                                                                   r"fewer than parallel.pp \(2\)"),
    (2, dict(parallel__tp=2, training__seq_len=33), r"training.seq_len \(33\) is not divisible by parallel.tp"),
    (2, dict(parallel__tp=2, training__compile=True), r"training.compile with parallel.tp = 2 is not supported"),
])
def test_startup_errors_of_the_model(world, changes, match):
    from model import LlamaConfig

    cfg = _cfg(**changes)
    validate(cfg, world_size=world)
    with pytest.raises(ConfigError, match=match):
        validate_parallel(cfg, world, LlamaConfig.from_name("tiny"))


@pytest.mark.parametrize("name", ["meditron-7b", "meditron-70b"])
def test_meditron_presets_pass_the_layout_checks(name):
    from train.config import CONFIG_DIR
    from train.trainer import model_config

    cfg, _ = parse_args(["--config", os.path.join(CONFIG_DIR, f"{name}.toml")])
    world = (2 if name == "meditron-70b" else 64) * cfg.parallel.tp * cfg.parallel.pp
    validate(cfg, world)
    validate_parallel(cfg, world, model_config(cfg))


def test_kv_heads_that_fit_no_layout_are_rejected():
    from model import LlamaConfig

    mcfg = LlamaConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=64, ffn_dim=64)
    with pytest.raises(ConfigError, match=r"n_kv_heads \(3\) and parallel.tp \(2\)"):
        validate_parallel(_cfg(parallel__tp=2), 2, mcfg)


@pytest.mark.distributed
def test_startup_error_under_torchrun_names_the_values(tmp_path):
    proc = torchrun(2, ["-m", "train", "--out-dir", str(tmp_path), "--parallel.pp=2",
                        "--parallel.pp_schedule=interleaved-1f1b", "--parallel.virtual_stages=4"])
    assert proc.returncode != 0
    assert "config error: the model has 4 layers, fewer than the pipeline stages parallel.pp x " \
           "parallel.virtual_stages = 2 x 4 = 8" in proc.stderr


# ---------------------------------------------------------------------------- bf16 parameters
def test_bfloat16_params_in_one_process(reference, tmp_path):
    """bf16 parameters and compute with float32 master weights, in a lone process (a 1-rank
    group is made for FSDP's mixed-precision policy): the curve follows float32's closely, and
    the checkpoint holds the float32 masters."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    try:
        rows = single(tmp_path, "--training.dtype=bfloat16-params", "--steps", "2", "--checkpoint.interval=2")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    ref = reference[1]
    for r, f in zip(rows, ref):
        assert math.isfinite(r["loss"]) and abs(r["loss"] - f["loss"]) < 2e-2 * f["loss"]
    md = dcp.FileSystemReader(str(tmp_path / "checkpoints" / "step_00000002" / "state")).read_metadata()
    assert md.state_dict_metadata["model.layers.0.attention.wq.weight"].properties.dtype == torch.float32


def test_single_process_resume_is_exact_to_the_last_update(reference, tmp_path):
    """2 + 2 steps give the weights of 4 straight (the last step's update included: a stale
    learning rate after loading the optimizer shows only there)."""
    from train.export import load_model

    single(tmp_path, "--steps", "2", "--checkpoint.interval=2")
    single(tmp_path, "--steps", "4", "--checkpoint.interval=2", resume=True)
    a = load_model(str(reference[0] / "checkpoints" / "step_00000004"))
    b = load_model(str(tmp_path / "checkpoints" / "step_00000004"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_packed_positions_round_trip():
    """Pipelined stages get per-row document positions and rebuild cu_seqlens from them."""
    from meditron_kernels import packing

    cu = torch.tensor([0, 5, 16, 32, 40, 64], dtype=torch.int32)
    pos = packing.document_positions(cu, 64).view(2, 32)
    assert pos.shape == (2, 32) and pos[0, 5] == 0 and pos[0, 4] == 4 and pos[1, 0] == 0
    back = packing.cu_seqlens_from_positions(pos)
    assert torch.equal(back, cu) and packing.longest_document(back) == 24


def test_layer_split_and_stage_placement():
    from train.parallelize import stage_indices, stage_layers

    assert [list(r) for r in stage_layers(10, 4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert stage_indices(1, 4, 2, "interleaved-1f1b") == [1, 5]
    assert stage_indices(1, 4, 2, "zbv") == [1, 6]
