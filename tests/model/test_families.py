"""Llama-3 (llama3 rope, tied), Qwen2, Qwen3 and Mistral against transformers, in float32.

Each family is a tiny transformers model whose norm weights and biases are random (not their
neutral init), loaded with Llama.from_hf: logits, loss and every gradient on packed documents
(against transformers on each document alone), a save_hf -> transformers round trip, greedy
generate; the Triton backend (under the interpreter) for the families without a sliding window.
The presets are checked against the published config.json values and transformers' parameter count.
"""
import json

import pytest
import torch

import meditron_kernels as mk
from meditron_kernels import backend as B
from model import Llama, LlamaConfig
from model.hf import ARCHITECTURES, config_from_hf, to_hf_name

transformers = pytest.importorskip("transformers")

_SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              vocab_size=101, max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
FAMILIES = {
    # llama3 rope with original_max_position_embeddings 32, so positions up to 37 cross its bands; tied head
    "llama3": ("LlamaConfig", dict(_SMALL, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "qwen2": ("Qwen2Config", dict(_SMALL, rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default",
                                                                               rope_theta=1e6))),
    # head_dim 32 != 64 / 4; attention_bias puts biases on all four projections
    "qwen3": ("Qwen3Config", dict(_SMALL, head_dim=32, attention_bias=True, tie_word_embeddings=True)),
    # a window of 5 keys: far shorter than the documents
    "mistral": ("MistralConfig", dict(_SMALL, sliding_window=5)),
    # per-layer attention types: the first max_window_layers layers global, the rest sliding
    "qwen2-window": ("Qwen2Config", dict(_SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}
WINDOWED = {"mistral", "qwen2-window"}
DOCS = [13, 1, 23]  # packed document lengths


def _hf_model(family, path):
    cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw), attn_implementation="eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    hf = hf.float().eval()
    hf.save_pretrained(path)
    return hf


def _scale_close(a, b, rel, what=""):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.0e} x scale {scale:.3e}"


def _check_packed(hf, ours, backend):
    """Our packed forward, loss and gradients against transformers on each document alone."""
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (1, sum(DOCS)), generator=g)
    targets = torch.randint(0, vocab, (1, sum(DOCS)), generator=g)
    targets[0, :3] = -100
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)
    ref = torch.cat([hf(tokens[:, a:b]).logits for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, vocab), targets.reshape(-1))
    ref_loss.backward()
    with mk.use_backend(backend):
        _scale_close(ours(tokens, cu_seqlens=cu, max_seqlen=max(DOCS)), ref.detach(), 1e-4, "logits")
        loss = ours.loss(tokens, targets, cu_seqlens=cu, max_seqlen=max(DOCS))
        loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    hf_params = dict(hf.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert len(names) == len(hf_params), "every transformers parameter has its counterpart"
    for name, p in ours.named_parameters():
        _scale_close(p.grad, hf_params[to_hf_name(name)].grad, 1e-4, name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family, tmp_path):
    hf = _hf_model(family, tmp_path / "hf")
    ours = Llama.from_hf(tmp_path / "hf")
    assert ours.cfg.model_type == hf.config.model_type
    hf_windows = [layer.self_attn.sliding_window if hasattr(layer.self_attn, "sliding_window")
                  else getattr(hf.config, "sliding_window", None) for layer in hf.model.layers]
    assert [ours.cfg.window(i) for i in range(ours.cfg.n_layers)] == hf_windows
    assert any(hf_windows) == (family in WINDOWED)
    # batched, with every switch in play
    tokens = torch.randint(0, hf.config.vocab_size, (2, 37))
    _scale_close(ours(tokens), hf(tokens).logits, 1e-4, "batched logits")
    _check_packed(hf, ours, "torch")
    # save_hf writes the same family back: transformers loads it as that class, with the same outputs
    ours.save_hf(tmp_path / "ours")
    conf = json.load(open(tmp_path / "ours" / "config.json"))
    assert conf["model_type"] == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back).__name__ == type(hf).__name__ == ARCHITECTURES[ours.cfg.model_type]
    assert getattr(back.config, "layer_types", None) == getattr(hf.config, "layer_types", None)
    assert getattr(back.config, "sliding_window", None) == getattr(hf.config, "sliding_window", None)
    torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, rtol=0, atol=0)
    assert Llama.from_hf(tmp_path / "ours").cfg == ours.cfg


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_greedy_generate_equals_transformers(family, tmp_path):
    hf = _hf_model(family, tmp_path)
    with torch.no_grad():  # sharper logits: greedy choices far from ties
        hf.lm_head.weight.mul_(20)
    hf.save_pretrained(tmp_path)
    ours = Llama.from_hf(tmp_path).eval()
    prompts = [[5, 17, 3, 60, 2, 9, 41], [11], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]
    got = ours.generate(prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, got):
        ids = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out == ids[0, len(prompt):].tolist()


_TRITON = all((op, "triton") in B._REGISTRY for op in ("rms_norm", "flash_attention", "swiglu",
                                                         "fused_linear_cross_entropy"))


@pytest.mark.skipif(not _TRITON, reason="a Triton op the model uses is not registered")
# qwen3 has every switch but the window (biases, q/k norms, head_dim != dim / n_heads, tied head); the
# interpreter takes about 30 s per family on 2 cores, so the others run with the slow tests
@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] if f != "qwen3" else [])
                                    for f in sorted(set(FAMILIES) - WINDOWED)])
def test_family_on_triton_matches_transformers(family, tmp_path):
    hf = _hf_model(family, tmp_path)
    _check_packed(hf, Llama.from_hf(tmp_path), "triton")


@pytest.mark.skipif(not _TRITON, reason="a Triton op the model uses is not registered")
def test_sliding_window_on_triton_is_refused_by_name(tmp_path):
    import inspect

    if "window" in inspect.signature(B._REGISTRY[("flash_attention", "triton")]).parameters:
        pytest.skip("the Triton attention kernel takes window")
    hf = _hf_model("mistral", tmp_path)
    ours = Llama.from_hf(tmp_path)
    with mk.use_backend("triton"), pytest.raises(NotImplementedError, match="window"):
        ours(torch.randint(0, 101, (1, 9)))


# ------------------------------------------------------------------------------------------------ presets
_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA31_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
               "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
               "rope_scaling": _LLAMA31_ROPE, "tie_word_embeddings": False, "attention_bias": False,
               "mlp_bias": False, "hidden_act": "silu"}
_LLAMA31_70B = dict(_LLAMA31_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64)
_LLAMA32 = dict(_LLAMA31_8B, intermediate_size=8192, tie_word_embeddings=True,
                rope_scaling=dict(_LLAMA31_ROPE, factor=32.0))
# the published config.json values that set each model's shape (transformers 4.x spelling, as published)
PUBLISHED = {
    "llama3.1-8b": _LLAMA31_8B,
    "llama3.1-70b": _LLAMA31_70B,
    "llama3.2-1b": dict(_LLAMA32, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "llama3.2-3b": dict(_LLAMA32, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    "meditron3-8b": _LLAMA31_8B,
    "meditron3-70b": _LLAMA31_70B,
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "sliding_window": 131072, "max_window_layers": 28, "use_sliding_window": False,
                   "tie_word_embeddings": False, "hidden_act": "silu"},
    "qwen3-8b": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                 "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
                 "rope_scaling": None, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                 "max_window_layers": 36, "tie_word_embeddings": False, "hidden_act": "silu"},
    "mistral-7b-v0.3": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "vocab_size": 32768, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
                        "hidden_act": "silu"},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_is_the_published_config_and_counts_as_transformers(name):
    cfg = LlamaConfig.from_name(name)
    assert cfg == config_from_hf(PUBLISHED[name])
    hf_cfg = transformers.AutoConfig.for_model(**PUBLISHED[name])
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    total = sum(p.numel() for p in hf.parameters())  # a tied head is one parameter
    assert cfg.num_params() == total
    embedding = hf.get_input_embeddings().weight.numel()
    head = 0 if cfg.tie_embeddings else hf.get_output_embeddings().weight.numel()
    assert cfg.num_params(include_embedding=False) == total - embedding - head
    # the head is a matmul whether tied or not; attention reads at most seq keys per query
    seq = 8192
    expect = 6 * (total - embedding - head + cfg.vocab_size * cfg.dim)
    expect += 12 * cfg.n_layers * hf_cfg.num_attention_heads * cfg.head_dim * seq
    assert cfg.flops_per_token(seq) == expect


def test_sliding_layers_attend_to_at_most_the_window():
    cfg = LlamaConfig(dim=64, n_layers=4, n_heads=4, vocab_size=50, ffn_dim=96, sliding_window=100,
                      layer_types=["sliding_attention", "full_attention"] * 2)
    full = LlamaConfig(dim=64, n_layers=4, n_heads=4, vocab_size=50, ffn_dim=96)
    assert cfg.flops_per_token(1000) == full.flops_per_token(1000) - 2 * 12 * 64 * (1000 - 100)
    assert cfg.flops_per_token(50) == full.flops_per_token(50)


# ------------------------------------------------------------------------------------------------ bad input
def test_unsupported_model_type_and_rope_scaling_are_refused_by_name(tmp_path):
    ours = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, ffn_dim=64, max_seq_len=32))
    ours.save_hf(tmp_path)
    conf = json.load(open(tmp_path / "config.json"))
    for model_type in ("gpt2", "gemma3_text"):
        json.dump(dict(conf, model_type=model_type), open(tmp_path / "config.json", "w"))
        with pytest.raises(ValueError, match=f"model_type '{model_type}' is not supported; supported: llama, "
                                             "mistral, qwen2, qwen3"):
            Llama.from_hf(tmp_path)
    for kind in ("yarn", "longrope"):
        rope = {"rope_type": kind, "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16}
        json.dump(dict(conf, rope_parameters=rope), open(tmp_path / "config.json", "w"))
        with pytest.raises(NotImplementedError, match=f"rope scaling '{kind}' is not implemented; supported: "
                                                      "default, linear, llama3"):
            Llama.from_hf(tmp_path)


def test_save_hf_refuses_what_the_family_cannot_express(tmp_path):
    base = dict(dim=32, n_layers=2, n_heads=2, vocab_size=50, ffn_dim=64, max_seq_len=32)
    for over, what in ((dict(model_type="llama", qk_norm=True), "qk_norm=True"),
                       (dict(model_type="qwen2"), "qkv_bias=False"),
                       (dict(model_type="llama", sliding_window=4), "sliding_window=4"),
                       (dict(model_type="mistral", sliding_window=4, layer_types=["full_attention",
                                                                                  "sliding_attention"]),
                        "full_attention layers")):
        with pytest.raises(ValueError, match=f"model_type '{over['model_type']}' cannot express .*{what}"):
            Llama(LlamaConfig(**base, **over)).save_hf(tmp_path)


def test_config_refuses_bad_switches():
    base = dict(dim=32, n_layers=2, n_heads=2, vocab_size=50, ffn_dim=64)
    with pytest.raises(ValueError, match="model_type must be one of"):
        LlamaConfig(**base, model_type="gpt2")
    with pytest.raises(ValueError, match="layer_types must list one of"):
        LlamaConfig(**base, sliding_window=4, layer_types=["sliding_attention"])
    with pytest.raises(ValueError, match="sliding_window is None"):
        LlamaConfig(**base, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(NotImplementedError, match="mlp 'geglu' is not implemented"):
        LlamaConfig(**base, mlp="geglu")
    with pytest.raises(NotImplementedError, match="norm_offset=1.0 is not implemented yet"):
        LlamaConfig(**base, norm_offset=1.0)
    with pytest.raises(ValueError, match="must be even"):
        LlamaConfig(**base, head_dim=15)
    # explicit head_dim frees dim from divisibility; a JSON round trip (lists, no head_dim key) is the same config
    cfg = LlamaConfig(dim=30, n_layers=2, n_heads=4, vocab_size=50, ffn_dim=64, head_dim=8, sliding_window=3,
                      layer_types=("full_attention", "sliding_attention"))
    import dataclasses

    assert LlamaConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
