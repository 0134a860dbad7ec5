import pytest
import torch

import meditron_kernels as mk
from meditron_kernels import backend as B
from model import Llama, LlamaConfig, PRESETS


def test_presets_exact_names_and_counts():
    assert set(PRESETS) == {"llama2-7b", "llama2-13b", "llama2-70b", "meditron-7b", "meditron-70b", "tiny",
                            "llama3.1-8b", "llama3.1-70b", "llama3.2-1b", "llama3.2-3b", "meditron3-8b",
                            "meditron3-70b", "qwen2.5-7b", "qwen3-8b", "mistral-7b-v0.3"}
    for name, expect in [("llama2-7b", 6.74e9), ("meditron-7b", 6.74e9), ("llama2-70b", 68.98e9),
                         ("meditron-70b", 68.98e9), ("llama2-13b", 13.02e9)]:
        cfg = LlamaConfig.from_name(name)
        assert (cfg.norm_eps, cfg.rope_theta, cfg.max_seq_len) == (1e-5, 10000.0, 4096)
        with torch.device("meta"):
            m = Llama(cfg)
        n = sum(p.numel() for p in m.parameters())
        assert round(n / 1e9, 2) == round(expect / 1e9, 2), name
        assert n == cfg.num_params()
    for name in PRESETS:  # the other families (tests/model/test_families.py counts them against transformers)
        with torch.device("meta"):
            m = Llama(LlamaConfig.from_name(name))
        assert sum(p.numel() for p in m.parameters()) == m.cfg.num_params(), name
    with pytest.raises(ValueError, match="unknown model preset"):
        LlamaConfig.from_name("Llama2-7B")


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="dim"):
        LlamaConfig(dim=65, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="n_layers"):
        LlamaConfig(dim=64, n_layers=0, n_heads=4)


def test_meditron_70b_flops_per_token_gives_paper_mfu():
    # 40,200 tokens/s on 128 A100s: 42.3% under 6 N_total, 44.7% under the primary formula
    cfg = LlamaConfig.from_name("meditron-70b")
    peak = 128 * 312e12
    assert round(6 * 70e9 * 40200 / peak * 100, 1) == 42.3
    assert round(cfg.flops_per_token(4096) * 40200 / peak * 100, 1) == 44.7


def test_meta_build_to_empty_init_weights():
    cfg = LlamaConfig.from_name("tiny")
    with torch.device("meta"):
        m = Llama(cfg)
    m.to_empty(device=torch.get_default_device())
    m.init_weights()
    ref = Llama(cfg)
    assert torch.equal(m.rope_cos, ref.rope_cos)
    for p in m.parameters():
        assert torch.isfinite(p).all()
    w = m.layers["0"].attention.wq.weight
    assert 0.015 < w.std().item() < 0.025
    assert torch.equal(m.layers["1"].ffn_norm.weight, torch.ones(cfg.dim))
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    assert m(tokens).shape == (2, 9, cfg.vocab_size)


def test_rope_tables_stay_float32_when_cast():
    m = Llama(LlamaConfig.from_name("tiny")).to(torch.bfloat16)
    assert m.rope_cos.dtype == torch.float32
    assert torch.equal(m.rope_cos, Llama(LlamaConfig.from_name("tiny")).rope_cos)


def test_pipeline_stage_can_drop_layers():
    cfg = LlamaConfig(dim=32, n_layers=4, n_heads=4, vocab_size=40, ffn_dim=64, max_seq_len=32)
    full = Llama(cfg)
    tokens = torch.randint(0, 40, (2, 8))
    first, second = Llama(cfg), Llama(cfg)
    first.load_state_dict(full.state_dict())
    second.load_state_dict(full.state_dict())
    for i in ("2", "3"):
        del first.layers[i]
    first.norm = first.output = None
    for i in ("0", "1"):
        del second.layers[i]
    second.tok_embeddings = None
    assert torch.allclose(second(first(tokens)), full(tokens), atol=1e-6)


def test_packed_documents_equal_separate_runs():
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, ffn_dim=64, max_seq_len=32)
    m = Llama(cfg)
    docs = [torch.randint(0, 40, (n,)) for n in (5, 1, 10)]
    tokens = torch.cat(docs)[None]
    cu = torch.tensor([0, 5, 6, 16], dtype=torch.int32)
    packed = m(tokens, cu_seqlens=cu, max_seqlen=10)[0]
    alone = torch.cat([m(d[None])[0] for d in docs])
    assert torch.allclose(packed, alone, atol=1e-5)


@pytest.mark.cpu_only  # CPU tensors resolving to torch outside the context
def test_backend_switch_reaches_every_op(monkeypatch):
    seen = []
    for op in ("rms_norm", "flash_attention", "swiglu", "fused_linear_cross_entropy"):
        ref = B._REGISTRY[(op, "torch")]

        def spy(*args, _op=op, _ref=ref):
            seen.append(_op)
            return _ref(*args)

        monkeypatch.setitem(B._REGISTRY, (op, "triton"), spy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=40, ffn_dim=64, max_seq_len=32)
    m = Llama(cfg)
    tokens = torch.randint(0, 40, (1, 6))
    with mk.use_backend("triton"):
        m.loss(tokens, tokens)
    assert seen.count("rms_norm") == 2 * 2 + 1
    assert seen.count("flash_attention") == 2 and seen.count("swiglu") == 2
    assert seen.count("fused_linear_cross_entropy") == 1
    seen.clear()
    m.loss(tokens, tokens)  # outside the context: CPU tensors resolve to torch
    assert seen == []
