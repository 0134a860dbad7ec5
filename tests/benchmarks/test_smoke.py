"""CPU smoke tests of the benchmarks: every case of every op runs once, with every provider that
can run here (the reference, the Triton kernels under the interpreter, SDPA's CPU kernel),
through pytest-benchmark with a single round. Nothing is timed in earnest: the point is that a
broken benchmark fails CI, not a number."""
from __future__ import annotations

import json

import pytest
import torch

import benchmarks
from benchmarks import __main__ as cli
from benchmarks import inspect as static_report
from benchmarks import train_step
from benchmarks.common import DIRECTIONS, environment, run_case

CPU = torch.device("cpu")
SMOKE = benchmarks.cases("smoke", torch.float32)
# Providers that cannot run on this machine, and why that is allowed.
UNAVAILABLE_HERE = ("has no", "needs a CUDA device", "is a CUDA kernel", "Liger-Kernel",
                    "the cuda backend needs", "materialises")


@pytest.fixture(scope="module")
def env():
    return environment(CPU, measure=False)


def test_every_op_has_a_smoke_case():
    assert {c.op for c in SMOKE} == set(benchmarks.OPS)


@pytest.mark.parametrize("case", SMOKE, ids=lambda c: f"{c.op}-{c.shape.replace(' ', '_').replace('/', '-')}")
def test_case_runs(case, env, benchmark):
    providers = [p.name for p in case.providers if p.name != "torch.compile"]  # compiling costs seconds each
    rows = benchmark.pedantic(run_case, args=(case, env, CPU, providers), kwargs=dict(timed=False),
                              rounds=1, iterations=1)
    assert {(r["provider"], r["direction"]) for r in rows} == {(p, d) for p in providers for d in case.directions}
    for r in rows:
        if r["status"] == "skipped":
            assert any(s in r["reason"] for s in UNAVAILABLE_HERE), r
        else:
            assert r["status"] == "ran", r
            assert r["check"] == "ok", r
    assert any(r["provider"] == "torch" and r["status"] == "ran" for r in rows)


def test_compiled_provider_runs(env, benchmark):
    case = next(c for c in SMOKE if c.op == "swiglu")
    rows = benchmark.pedantic(run_case, args=(case, env, CPU, ["torch.compile"]),
                              kwargs=dict(timed=False, directions=["both"]), rounds=1, iterations=1)
    assert [(r["status"], r["check"]) for r in rows] == [("ran", "ok")], rows


def test_timed_rows_have_every_column(env):
    case = next(c for c in SMOKE if c.op == "rms_norm")
    rows = run_case(case, env, CPU, ["torch", "triton"], rep_ms=1)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["direction"] for r in ok} == set(DIRECTIONS)
    for r in ok:
        assert r["ms"] > 0 and r["rate"] > 0 and r["unit"] == "GB/s" and r["speedup_vs_eager"] == 1.0
        assert r["pct_floor"] is None  # no measured ceiling on the CPU
    triton = [r for r in rows if r["provider"] == "triton"]
    assert triton and all(r["status"] == "skipped" for r in triton)  # the interpreter is never timed


def test_cli_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    argv = ["--size", "smoke", "--ops", "swiglu,attention", "--providers", "torch,sdpa-flash", "--rep-ms", "1",
            "--json", str(path), "--no-train-step"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "GPU figures" in out and "swiglu" in out and "flash_attention" in out
    doc = json.loads(path.read_text())
    assert doc["kind"] == "kernels" and doc["env"]["device_type"] == "cpu"
    assert {"torch", "triton"} <= set(doc["env"]) and "copy_gbps" in doc["env"] and "gemm_tflops" in doc["env"]
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert {r["op"] for r in ok} == {"swiglu", "flash_attention"}
    for r in ok:
        for key in ("op", "shape", "dtype", "direction", "provider", "ms", "rate", "unit", "pct_floor",
                    "speedup_vs_eager", "extra_mem_mb", "check"):
            assert key in r
    # A second run of the same day merges: same-key rows replaced, the others kept.
    assert cli.main(argv[:2] + ["--ops", "swiglu", "--providers", "torch", "--rep-ms", "1", "--json", str(path),
                                "--no-train-step"]) == 0
    doc2 = json.loads(path.read_text())
    assert len(doc2["rows"]) == len(doc["rows"])


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit, match="unknown"):
        cli.parse_args(["--ops", "layernorm"])
    with pytest.raises(SystemExit, match="unknown"):
        cli.parse_args(["--providers", "apex"])


def test_train_step_tiny(tmp_path, benchmark):
    path = tmp_path / "ts.json"
    argv = ["--preset", "tiny", "--layers", "1", "--seq", "32", "--batch", "1", "--steps", "1", "--warmup", "0",
            "--configs", "ours,eager-sdpa", "--json", str(path)]
    assert benchmark.pedantic(train_step.main, args=(argv,), rounds=1, iterations=1) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["config"] for r in rows] == ["ours", "eager-sdpa"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["flops_per_token"] > r["flops_per_token_paper"] * 0.5
        assert abs(r["loss"] - torch.log(torch.tensor(512.0)).item()) < 1.0  # fresh weights: about log(vocab)


def test_train_step_triton_backend_runs_or_says_why(tmp_path):
    """Our kernels in the training step, under the interpreter: either it runs, or it names the op
    that has no Triton backend yet."""
    args = train_step.parse_args(["--preset", "tiny", "--layers", "1", "--seq", "16", "--batch", "1",
                                  "--steps", "1", "--warmup", "0", "--backend", "triton"])
    cfg = train_step.LlamaConfig(**{**train_step._cfg_dict(train_step.LlamaConfig.from_name("tiny")), "n_layers": 1})
    row = train_step.run_config("ours", cfg, args, CPU, steps=1, warmup=0)
    assert row["status"] in ("ok", "skipped"), row
    if row["status"] == "skipped":
        assert "has no 'triton' backend" in row["reason"]


def test_inspect_one_module(benchmark):
    records = benchmark.pedantic(static_report.triton_records, args=(["swiglu"], (90,)), rounds=1, iterations=1)
    assert records and all(r["arch"] == "sm_90" for r in records)
    for r in records:
        for key in ("kernel", "arch", "registers", "spill_bytes", "shared_bytes", "mma", "vector_load_bits"):
            assert key in r, r
        assert not static_report.problems(r), r


def test_cost_models_by_hand():
    """The bytes and FLOPs models against numbers worked out by hand for the 7B shapes."""
    from benchmarks import bench_attention, bench_cross_entropy, bench_rms_norm, bench_swiglu

    T, H, e = 16384, 4096, 2
    assert bench_rms_norm.bytes_moved("forward", T, H, e, False) == 2 * T * H * e + H * e
    assert bench_rms_norm.bytes_moved("backward", T, H, e, True) == 4 * T * H * e + 2 * H * e
    assert bench_swiglu.bytes_moved("both", T, 11008, e) == 8 * T * 11008 * e
    assert bench_cross_entropy.ce_bytes("both", T, 32000, e) == 2 * T * 32000 * e + 8 * T
    assert bench_cross_entropy.flce_cost(T, H, 32000, e).flops == 6 * T * H * 32000
    fwd = bench_attention.flops("forward", 4, 4096, 32, 128, causal=True)
    assert fwd == 4 * 4 * 4096 ** 2 * 32 * 128 / 2
    assert bench_attention.flops("both", 4, 4096, 32, 128, causal=True) == 3.5 * fwd
    for case in benchmarks.cases("full", torch.bfloat16):
        for d in case.directions:
            cost = case.cost(d)
            assert (cost.bytes or 0) > 0 or (cost.flops or 0) > 0, (case.op, case.shape, d)


def test_floor_and_rate():
    from benchmarks.common import Cost, floor_ms, throughput

    env = dict(copy_gbps=3000.0, gemm_tflops=800.0)
    ms, bound = floor_ms(Cost(bytes=3e9), env)
    assert bound == "memory" and ms == pytest.approx(1.0)
    ms, bound = floor_ms(Cost(bytes=3e9, flops=1.6e12), env)  # 1 ms of bytes, 2 ms of FLOPs
    assert bound == "compute" and ms == pytest.approx(2.0)
    assert throughput(Cost(bytes=3e9, flops=1.6e12), 4.0, bound) == (pytest.approx(400.0), "TFLOP/s")
    assert floor_ms(Cost(bytes=1.0), dict(copy_gbps=None, gemm_tflops=None)) == (None, None)


def test_plot(tmp_path):
    rows = [dict(op="swiglu", shape="7b 16384x11008", dtype="bf16", direction=d, provider=p, status="ok",
                 pct_floor=v, device="test") for d in ("forward", "both") for p, v in (("triton", 90.0), ("torch", 30.0))]
    paths = cli.plot(rows, str(tmp_path), "test")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["test-swiglu.png"]
    assert (tmp_path / "test-swiglu.png").stat().st_size > 1000
