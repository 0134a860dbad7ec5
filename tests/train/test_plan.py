"""The cluster cost model: published runs, the MFU arithmetic, memory, errors, search and the CLI."""
import dataclasses
import json
import types

import pytest

from train import plan
from train.plan import ARCHITECTURES, GPUS, PUBLISHED_RUNS, Cluster, mfu, predict, search
from train.plan import PlanLayout as Layout
from train.plan.cost import layer_cost
from train.plan.memory import activation_bytes_per_token
from train.plan.runs import megatron_tflops_to_tokens_per_s

MEDITRON = dict(model="meditron-70b", gpu="A100-80", nodes=16, tp=8, pp=8, dp=2, micro_batch=2,
                global_batch=512, seq_len=4096, recompute="selective")


# --- the arithmetic of the published figures -------------------------------------------------

def test_meditron_mfu_arithmetic_reproduces_the_paper():
    # Its own inputs: 40,200 tokens/s on 128 A100s (312 TFLOP/s), 6 x 70e9 FLOPs per token.
    assert round(mfu(40200, 6 * 70e9, 128, 312e12), 3) == 0.423
    # docs/design.md, "MFU": the same run is 44.7% under (6 N_non_embedding + 12 L d s).
    named = ARCHITECTURES["meditron-70b"].model_flops_per_token(4096)
    assert round(mfu(40200, named, 128, 312e12), 3) == 0.447


def test_parameter_counts():
    # Hugging Face checkpoints of Llama-2.
    assert ARCHITECTURES["llama2-7b"].n_params == 6_738_415_616
    assert ARCHITECTURES["llama2-13b"].n_params == 13_015_864_320
    assert ARCHITECTURES["llama2-70b"].n_params == 68_976_648_192
    # Narayanan et al. 2021 eq. 2, P = 12 l h^2 (1 + 13/12h + (V + s)/12lh), and their Table 1 and 2
    # sizes (the model adds the final LayerNorm, 2h).
    for name, billions in (("gpt3-175b", 174.6), ("gpt-530b", 529.6), ("gpt-1t", 1008.0)):
        a = ARCHITECTURES[name]
        l, h, v, s = a.n_layers, a.dim, a.vocab_size, a.max_seq_len
        eq2 = 12 * l * h * h * (1 + 13 / (12 * h) + (v + s) / (12 * l * h))
        assert a.n_params == pytest.approx(eq2 + 2 * h, rel=1e-12)
        assert round(a.n_params / 1e9, 1) == billions


# --- published runs ----------------------------------------------------------------------------

@pytest.mark.parametrize("run", PUBLISHED_RUNS, ids=[r.name for r in PUBLISHED_RUNS])
def test_published_run_predicted_within_15_percent(run):
    pred = run.predict()
    assert pred.fits, f"{run.name} ran, so it must fit: {pred.memory_gb_per_gpu:.1f} GiB"
    assert abs(pred.tokens_per_s / run.tokens_per_s - 1) <= 0.15, (
        f"{run.name}: predicted {pred.tokens_per_s:,.0f} tokens/s, published {run.tokens_per_s:,.0f}")


def test_published_runs_cover_meditron_and_two_more_sources():
    sources = {r.source.split(" (")[0] for r in PUBLISHED_RUNS}
    assert any(r.name == "Meditron-70B" and r.tokens_per_s == 40200 for r in PUBLISHED_RUNS)
    assert {"Narayanan et al. 2021", "Korthikanti et al. 2022"} <= sources


def test_megatron_tflops_conversion():
    # Table 1's 1T row: 3072 GPUs at 163 TFLOP/s each, counted with the paper's eq. 3.
    tps = megatron_tflops_to_tokens_per_s("gpt-1t", 3072, 163)
    a = ARCHITECTURES["gpt-1t"]
    s, l, h, v = 2048, a.n_layers, a.dim, a.vocab_size
    per_token = 96 * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    assert tps * per_token == pytest.approx(3072 * 163e12, rel=1e-12)


def test_per_layer_timings_of_korthikanti_table_4():
    """The A100 GEMM efficiency is chosen to reproduce one layer of the 22B model (h 6144, TP 8,
    micro-batch 4, seq 2048): forward and backward ms for each recomputation / SP setting."""
    arch, cluster = ARCHITECTURES["gpt-22b"], Cluster(GPUS["A100-80"], 1, 8)
    measured = {(False, "none"): (7.7, 11.9), (True, "none"): (7.2, 11.8), (False, "full"): (7.7, 19.5),
                (False, "selective"): (7.7, 13.2), (True, "selective"): (7.2, 13.1)}
    for (sp, rc), (fwd_ms, bwd_ms) in measured.items():
        layout = Layout(tp=8, pp=1, dp=1, micro_batch=4, global_batch=4, seq_len=2048, recompute=rc,
                        sequence_parallel=sp, flash_attention=False)
        c = layer_cost(arch, cluster, layout)
        fwd = c.fwd_compute + c.fwd_comm
        bwd = (c.bwd_compute + c.recompute + c.recompute_comm + c.bwd_comm_exposed
               + max(0.0, c.bwd_comm_hidden - c.overlap_window))
        assert fwd * 1e3 == pytest.approx(fwd_ms, rel=0.05), (sp, rc)
        assert bwd * 1e3 == pytest.approx(bwd_ms, rel=0.05), (sp, rc)


# --- the model's structure --------------------------------------------------------------------

def test_step_time_is_the_sum_of_its_parts():
    p = predict(**MEDITRON)
    parts = p.compute_s + p.tp_comm_exposed_s + p.pp_comm_s + p.bubble_s + p.dp_comm_exposed_s + p.optimizer_s
    assert p.step_time_s == pytest.approx(parts, rel=1e-12)
    assert p.tokens_per_s == pytest.approx(512 * 4096 / p.step_time_s)
    assert p.mfu == pytest.approx(mfu(p.tokens_per_s, 6 * ARCHITECTURES["meditron-70b"].n_params, 128, 312e12))


def test_bubble_is_p_minus_1_over_v_m():
    p = predict(**MEDITRON)
    assert p.n_microbatches == 512 // (2 * 2)
    assert p.bubble_fraction == pytest.approx(7 / 128)
    q = predict(**{**MEDITRON, "virtual_stages": 2})
    assert q.bubble_fraction == pytest.approx(7 / (2 * 128))
    assert q.bubble_s < p.bubble_s and q.pp_comm_s > p.pp_comm_s  # interleaving sends twice as often
    assert predict(**{**MEDITRON, "pp": 1, "dp": 16}).bubble_fraction == 0


def test_overlap_only_ever_helps():
    for overlap in plan.OVERLAP:
        p = predict(**MEDITRON, overlap=overlap)
        assert p.step_time_no_overlap_s >= p.step_time_s >= p.step_time_overlap_s
        assert p.tp_comm_s >= p.tp_comm_exposed_s >= p.tp_comm_exposed_overlap_s > 0
        assert p.dp_comm_s >= p.dp_comm_exposed_s >= p.dp_comm_exposed_overlap_s > 0
    none, tp, both = (predict(**MEDITRON, overlap=o).step_time_s for o in plan.OVERLAP)
    assert none > tp >= both


def test_memory_split():
    p = predict(**MEDITRON)
    m = p.memory
    assert p.memory_gb_per_gpu == pytest.approx(m.total / plan.GiB)
    # llama2-70b's last stage: 10 layers + the head, over TP 8.
    a = ARCHITECTURES["meditron-70b"]
    weights = (10 * a.layer_params + a.vocab_size * a.dim) / 8
    assert m.parameters == pytest.approx(2 * weights)
    assert m.gradients == pytest.approx(4 * weights)
    assert m.optimizer == pytest.approx(12 * weights / 2)  # distributed over DP 2
    plain = predict(**MEDITRON, distributed_optimizer=False).memory
    assert plain.optimizer == pytest.approx(2 * m.optimizer)
    bf16 = predict(**MEDITRON, grad_bytes=2).memory
    assert bf16.gradients == pytest.approx(m.gradients / 2)


def test_recomputation_trades_memory_for_time():
    def acts(rc, **kw):
        return predict(**{**MEDITRON, "recompute": rc, **kw})
    unfused = {rc: acts(rc, flash_attention=False) for rc in plan.RECOMPUTE}
    acts_of = {rc: p.memory.activations for rc, p in unfused.items()}
    assert acts_of["none"] > acts_of["selective"] > acts_of["full"]
    assert unfused["none"].step_time_s < unfused["selective"].step_time_s < unfused["full"].step_time_s
    # Flash attention never stores the s^2 scores: selective has nothing left to drop.
    assert acts("none").memory.activations == acts("selective").memory.activations
    assert acts("none").step_time_s == acts("selective").step_time_s


def test_activation_bytes_follow_korthikanti_table_2():
    a = ARCHITECTURES["gpt3-175b"]
    h, heads, s, t = a.dim, a.n_heads, 2048, 8
    attn = 5 * heads * s / h

    def per_token(**kw):
        rc = kw.pop("recompute")
        layout = Layout(tp=t, pp=1, dp=1, micro_batch=1, global_batch=1, seq_len=s, recompute=rc,
                        flash_attention=False, **kw)
        return activation_bytes_per_token(a, layout, rc) / h

    assert per_token(recompute="none", sequence_parallel=False) == pytest.approx(10 + 24 / t + attn / t)
    assert per_token(recompute="none", sequence_parallel=True) == pytest.approx(34 / t + attn / t)
    assert per_token(recompute="selective", sequence_parallel=False) == pytest.approx(10 + 24 / t)
    assert per_token(recompute="selective", sequence_parallel=True) == pytest.approx(34 / t)
    assert per_token(recompute="full", sequence_parallel=False) == pytest.approx(2)


def test_any_preset_dict_or_config_object():
    ref = predict("llama2-7b", "H100", 1, tp=2, global_batch=64)
    d = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000)
    assert predict(d, "H100", 1, tp=2, global_batch=64).tokens_per_s == pytest.approx(ref.tokens_per_s)
    cfg = types.SimpleNamespace(**d, max_seq_len=4096, norm_eps=1e-5)  # LlamaConfig's attribute names
    assert predict(cfg, "H100", 1, tp=2, global_batch=64).tokens_per_s == pytest.approx(ref.tokens_per_s)


def test_faster_hardware_is_faster():
    layout = dict(model="llama2-13b", nodes=2, tp=4, pp=1, micro_batch=1, global_batch=256)
    a40, a80, h100, h200 = (predict(gpu=g, **layout) for g in ("A100-40", "A100-80", "H100", "H200"))
    assert a40.tokens_per_s < a80.tokens_per_s < h100.tokens_per_s < h200.tokens_per_s
    assert a40.capacity_bytes < a80.capacity_bytes < h200.capacity_bytes


# --- fits / does not fit --------------------------------------------------------------------------

def test_obviously_too_large_layout_does_not_fit(capsys):
    p = predict("llama2-70b", "A100-40", 1, tp=8, global_batch=8)
    assert not p.fits and p.memory_gb_per_gpu > 100
    assert plan.main(["--model", "llama2-70b", "--gpu", "A100-40", "--nodes", "1", "--tp", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False
    plan.main(["--model", "llama2-70b", "--gpu", "A100-40", "--nodes", "1", "--tp", "8"])
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_meditron_layout_fits():
    assert predict(**MEDITRON).fits


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--model", "llama2-7b", "--gpu", "H100", "--nodes", "1", "--tp", "2", "--pp", "2", "--dp", "4"],
     "must equal --nodes x --gpus-per-node"),
    (["--model", "llama2-7b", "--gpu", "H100", "--nodes", "1", "--tp", "3"], "is not divisible by --tp x --pp"),
    (["--model", "llama2-7b", "--gpu", "H100", "--nodes", "1", "--tp", "8", "--micro-batch", "4",
      "--global-batch", "6"], "--global-batch (6) must be divisible by --micro-batch x --dp"),
    (["--model", "llama2-7b", "--gpu", "H100", "--nodes", "1", "--gpus-per-node", "3", "--pp", "3"],
     "32 layers must be divisible by --pp (3)"),
    (["--model", "llama2-13b", "--gpu", "H100", "--nodes", "2", "--tp", "16"],
     "40 attention heads must be divisible by --tp (16)"),
    (["--model", "llama2-70b", "--gpu", "H100", "--nodes", "2", "--tp", "16"],
     "8 key/value heads must be divisible by --tp (16)"),
    (["--model", "llama2-7b", "--gpu", "H100", "--nodes", "1", "--micro-batch", "0"],
     "--micro-batch must be a positive"),
    (["--model", "llama2-7b", "--gpu", "H100", "--nodes", "1", "--seq-len", "-1"], "--seq-len must be a positive"),
    (["--model", "llama2-7b", "--gpu", "H100", "--nodes", "1", "--seq-len", "0"], "--seq-len must be a positive"),
    (["--model", "llama2-7b", "--gpu", "H100", "--nodes", "0"], "--nodes and --gpus-per-node must be positive"),
    (["--model", "llama3-8b", "--gpu", "H100", "--nodes", "1"], "unknown model 'llama3-8b'"),
    (["--model", "{\"dim\": 4096", "--gpu", "H100", "--nodes", "1"], "--model is not valid JSON"),
    (["--model", "llama2-7b", "--gpu", "V100", "--nodes", "1"], "invalid choice: 'V100'"),
    (["--model", "llama2-7b", "--gpu", "H100", "--nodes", "1", "--recompute", "some"], "invalid choice: 'some'"),
    (["--gpu", "H100", "--nodes", "1"], "required: --model"),
])
def test_bad_flags_give_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_library_errors_are_value_errors():
    with pytest.raises(ValueError, match="--tp x --pp x --dp"):
        predict("llama2-7b", "H100", 1, tp=2, pp=2, dp=1)
    with pytest.raises(ValueError, match="unknown --gpu"):
        predict("llama2-7b", "B200", 1)
    with pytest.raises(ValueError, match="--virtual-stages > 1 needs --pp > 1"):
        predict("llama2-7b", "H100", 1, virtual_stages=2)


# --- JSON and search ----------------------------------------------------------------------------------

def test_json_output(capsys):
    argv = ["--model", "meditron-70b", "--gpu", "A100-80", "--nodes", "16", "--tp", "8", "--pp", "8", "--dp", "2",
            "--micro-batch", "2", "--global-batch", "512", "--seq-len", "4096", "--recompute", "selective", "--json"]
    assert plan.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("tokens_per_s", "mfu", "mfu_named", "step_time_s", "memory_gb_per_gpu", "fits",
                "memory_breakdown_gb", "bubble_fraction", "tp_comm_s", "tp_comm_exposed_s",
                "tp_comm_exposed_no_overlap_s", "dp_comm_s", "dp_comm_exposed_s", "step_time_no_overlap_s"):
        assert key in out, key
    p = predict(**MEDITRON)
    assert out["tokens_per_s"] == pytest.approx(p.tokens_per_s)
    assert out["mfu"] == pytest.approx(p.mfu) and out["mfu_named"] == pytest.approx(p.mfu_named)
    assert out["fits"] is True
    assert set(out["memory_breakdown_gb"]) == {"parameters", "gradients", "optimizer", "activations", "overhead"}
    assert sum(out["memory_breakdown_gb"].values()) == pytest.approx(out["memory_gb_per_gpu"])


def test_search_lists_fitting_layouts_best_first():
    found = search("llama2-70b", "H100", 8, global_batch=512)
    assert len(found) > 5
    assert [r.mfu for r in found] == sorted((r.mfu for r in found), reverse=True)
    for r in found:
        L = r.layout
        assert r.fits
        assert L.tp in (1, 2, 4, 8) and L.tp * L.pp * L.dp == 64 and 80 % L.pp == 0
        assert L.micro_batch in (1, 2, 4) and 512 % (L.micro_batch * L.dp) == 0
    assert {r.layout.recompute for r in found} <= {"selective", "full"}


def test_search_cli(capsys):
    argv = ["--model", "llama2-7b", "--gpu", "A100-80", "--nodes", "2", "--global-batch", "256", "--search"]
    assert plan.main(argv + ["--json", "--top", "5"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert 0 < len(rows) <= 5 and all(r["fits"] for r in rows)
    assert [r["mfu"] for r in rows] == sorted((r["mfu"] for r in rows), reverse=True)
    assert plan.main(argv) == 0
    assert "best layouts for llama2-7b" in capsys.readouterr().out


def test_search_reports_when_nothing_fits(capsys):
    assert search("llama2-70b", "A100-40", 1, global_batch=8) == []
    assert plan.main(["--model", "llama2-70b", "--gpu", "A100-40", "--nodes", "1", "--global-batch", "8",
                      "--search"]) == 1
    assert "no layout" in capsys.readouterr().out


def test_validate_cli(capsys):
    assert plan.main(["--validate", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= len(PUBLISHED_RUNS) + 1 and "Meditron-70B" in out


def test_layout_is_a_plain_dataclass():
    # Other tools serialise layouts; keep every field JSON-friendly.
    json.dumps(dataclasses.asdict(PUBLISHED_RUNS[0].layout))


def test_docs_table_matches_the_model():
    # docs/plan.md shows the validation table; regenerate it with --validate --markdown.
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "plan.md").read_text()
    assert plan.validation_table(markdown=True) in doc


# --- one vocabulary with the model and the trainer ----------------------------------------------

def test_shapes_and_flops_come_from_llama_config():
    from model import PRESETS, LlamaConfig
    from train import metrics

    for name in PRESETS:
        cfg, a = LlamaConfig.from_name(name), ARCHITECTURES[name]
        assert a.config == cfg
        assert a.n_params == cfg.num_params()
        assert a.model_flops_per_token(4096) == cfg.flops_per_token(4096)
    assert plan.mfu is metrics.mfu
    assert {g.peak_flops for g in GPUS.values()} == set(metrics.PEAK_FLOPS.values())


def test_config_toml_reads_the_training_layout(capsys):
    argv = ["--config", "train/configs/meditron-70b.toml", "--gpu", "A100-80", "--nodes", "16", "--json"]
    assert plan.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "meditron-70b"
    assert (out["tp"], out["pp"], out["dp"], out["micro_batch"], out["global_batch"], out["seq_len"]) == \
        (8, 8, 2, 2, 512, 4096)
    # The trainer's selective checkpointing (norms, rotary, SwiGLU) and FSDP2 over dp.
    assert out["recompute"] == "elementwise" and out["fsdp"] is True and out["sequence_parallel"] is True
    # Flags given with --config override it.
    assert plan.main(argv + ["--pp", "4", "--dp", "4", "--recompute", "full"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["pp"], out["dp"], out["recompute"]) == (4, 4, "full")


def test_config_errors_are_clear(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        plan.main(["--config", str(tmp_path / "missing.toml"), "--gpu", "H100", "--nodes", "1"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_elementwise_recompute_sits_between_none_and_full():
    runs = {rc: predict(**{**MEDITRON, "recompute": rc}) for rc in ("none", "elementwise", "full")}
    acts = {rc: p.memory.activations for rc, p in runs.items()}
    assert acts["none"] > acts["elementwise"] > acts["full"]
    assert runs["none"].step_time_s < runs["elementwise"].step_time_s < runs["full"].step_time_s


def test_fsdp_shards_weights_and_gradients_and_gathers_them():
    zero1 = predict(**MEDITRON)
    fsdp = predict(**MEDITRON, fsdp=True)
    assert fsdp.memory.gradients < zero1.memory.gradients
    assert fsdp.memory.optimizer < zero1.memory.optimizer
    assert fsdp.dp_comm_s > zero1.dp_comm_s  # weights gathered and gradients reduced every micro-batch
    assert fsdp.dp_comm_s >= fsdp.dp_comm_exposed_s > 0
    no_pp = dict(MEDITRON, pp=1, dp=16, global_batch=512)
    flat = predict(**{**no_pp, "recompute": "full"}, fsdp=True)
    assert flat.memory.parameters < predict(**{**no_pp, "recompute": "full"}).memory.parameters
