"""Llama.generate: KV cache against full recomputation and against transformers, sampling, stops, errors."""
import warnings

import pytest
import torch

import meditron_kernels as mk
from model import KVCache, Llama, LlamaConfig

CFG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=160, max_seq_len=64)
PROMPTS = [[5, 17, 3, 60, 2, 9, 41], [11], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 1, 2]]


def _model(dtype=torch.float32, **over):
    model = Llama(LlamaConfig(**dict(CFG, **over))).eval()
    with torch.no_grad():  # sharper logits than the training init: greedy choices far from ties
        model.output.weight.mul_(20)
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(4)
    return model.to(dtype)


def _greedy_by_recomputation(model, prompt, n):
    """The reference: the whole sequence through the plain forward at every step."""
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(torch.tensor([seq]))[0, -1].float().argmax())
        out.append(t)
        seq.append(t)
    return out


def test_greedy_from_cache_equals_recomputation():
    model = _model()
    out = model.generate(PROMPTS, max_new_tokens=20)
    assert [len(o) for o in out] == [20, 20, 20]
    for prompt, got in zip(PROMPTS, out):
        assert got == _greedy_by_recomputation(model, prompt, 20)


def test_one_call_equals_one_prompt_at_a_time():
    model = _model()
    together = model.generate(PROMPTS, max_new_tokens=10)
    assert together == [model.generate([p], max_new_tokens=10)[0] for p in PROMPTS]


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model()
    model.save_hf(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ours = model.generate(PROMPTS, max_new_tokens=16)
    for prompt, got in zip(PROMPTS, ours):
        ids = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == ids[0, len(prompt):].tolist()


def test_seeded_sampling_is_reproducible():
    model = _model()
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.9)
    a = model.generate(PROMPTS, seed=7, **kw)
    assert a == model.generate(PROMPTS, seed=7, **kw)
    assert a != model.generate(PROMPTS, seed=8, **kw)
    # a vanishing nucleus is greedy, whatever the temperature
    assert model.generate(PROMPTS, max_new_tokens=6, temperature=2.0, top_p=1e-6, seed=1) == \
        model.generate(PROMPTS, max_new_tokens=6)


def test_top_p_keeps_only_the_nucleus():
    from model.llama import _sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    drawn = _sample(logits, 1.0, 0.8, g)
    assert set(drawn.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.8: the tail is never drawn
    assert 0.55 < (drawn == 0).float().mean() < 0.70  # renormalised: 0.5 / 0.8


def test_stop_ids_stop_each_sequence():
    model = _model()
    free = model.generate(PROMPTS, max_new_tokens=12)
    stop = free[0][3]
    out = model.generate(PROMPTS, max_new_tokens=12, stop_ids=(stop, 1000))
    for f, o in zip(free, out):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert o == f[:cut]  # the stop token is kept, nothing after it
    assert out[0][-1] == stop and len(out[0]) == free[0].index(stop) + 1 <= 4


def test_generation_stops_at_the_context():
    model = _model()
    long = list(range(1, 62))  # 61 tokens of a 64-token context
    with pytest.warns(UserWarning, match=r"prompts\[0\] has 61 tokens: .*max_seq_len=64\) leaves room for 3 of "
                      r"max_new_tokens=10"):
        out = model.generate([long, [3]], max_new_tokens=10)
    assert len(out[0]) == 3 and len(out[1]) == 10
    assert out[0] == _greedy_by_recomputation(model, long, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # room enough: no warning
        model.generate([long], max_new_tokens=3)


def test_cache_is_gqa_sized_in_the_model_dtype():
    model = _model(torch.float16)
    cache = KVCache(model.cfg, 3, 40, torch.float16)
    assert cache.k.shape == (2, 3, 40, 2, 16) and cache.k.dtype == torch.float16
    assert len(model.generate(PROMPTS, max_new_tokens=4)) == 3  # half precision runs end to end


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        model.generate([[1, 2], []])
    with pytest.raises(ValueError, match=r"prompts\[0\] has 64 tokens, but the context holds 64"):
        model.generate([list(range(64))])
    with pytest.raises(ValueError, match="vocab_size=97"):
        model.generate([[1, 97]])
    with pytest.raises(TypeError, match="non-empty list"):
        model.generate([])
    with pytest.raises(TypeError, match="prompts\\[0\\] must be a list"):
        model.generate(["hello"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1]], top_p=0.0)


# ---------------------------------------------------------------------------- the attention it runs on
def test_decode_attention_with_per_sequence_cache_lengths():
    # one query per sequence against a cache whose unused rows hold garbage: never read
    b, cap, h, hkv, d = 3, 20, 4, 2, 16
    k, v = torch.randn(b, cap, hkv, d, dtype=torch.float64), torch.randn(b, cap, hkv, d, dtype=torch.float64)
    lens = torch.tensor([5, 1, 20], dtype=torch.int32)
    for i, n in enumerate(lens.tolist()):
        k[i, n:] = float("nan")
        v[i, n:] = float("inf")
    q = torch.randn(b, 1, h, d, dtype=torch.float64)
    o, lse = mk.flash_attention(q, k, v, seqlens_k=lens, return_lse=True)
    for i, n in enumerate(lens.tolist()):
        ref = mk.flash_attention(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n])
        torch.testing.assert_close(o[i:i + 1], ref)
        s = torch.einsum("hd,khd->hk", q[i, 0], k[i, :n].repeat_interleave(2, dim=1)) / d ** 0.5
        torch.testing.assert_close(lse[i, :, 0], torch.logsumexp(s, -1))


def test_generate_on_the_triton_kernels_equals_torch():
    # every op through the Triton kernels (interpreted): packed prefill, then split-KV decoding
    model = _model(n_layers=1)
    expected = model.generate(PROMPTS[:2], max_new_tokens=4)
    with mk.use_backend("triton"):
        assert model.generate(PROMPTS[:2], max_new_tokens=4) == expected
