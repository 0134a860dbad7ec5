"""Triton rotary embedding (meditron_kernels/ops/rotary.py) against the reference."""

import pytest
import torch

from meditron_kernels.static import module_reports
import meditron_kernels as mk
from meditron_kernels.ops import rotary
from tests.helpers import assert_close_rule, assert_static_clean

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, seq, n_heads, n_kv_heads, head_dim, with position_ids): seq 1, 37, 97; GQA ratios 1, 4,
# 8; head_dim 64, 128, 96. Every (dtype, layout, position_ids or not) meets two shapes.
CASES = [(2, 1, 4, 4, 64, True), (1, 37, 8, 2, 128, False), (1, 97, 8, 1, 96, True), (2, 37, 16, 2, 64, False)]


def _inputs(batch, seq, hq, hk, d, dtype, with_pos, n_positions=None):
    q = torch.randn(batch, seq, hq, d).to(dtype)
    k = torch.randn(batch, seq, hk, d).to(dtype)
    n_positions = n_positions or seq + 64
    cos, sin = mk.rotary_cos_sin(n_positions, d)
    pos = torch.randint(0, n_positions, (batch, seq)) if with_pos else None
    return q, k, cos, sin, pos


def _forward_backward(q, k, cos, sin, pos, interleaved, backend, gq, gk, dtype=None):
    gq, gk = gq.to(q.dtype), gk.to(k.dtype)  # the same rounded gradients for every way
    dtype = dtype or q.dtype
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    qo, ko = mk.apply_rotary(q, k, cos, sin, pos, interleaved=interleaved, backend=backend)
    torch.autograd.backward((qo, ko), (gq.to(dtype), gk.to(dtype)))
    return qo.detach(), ko.detach(), q.grad, k.grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + ("_pos" if c[5] else ""))
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_forward_backward(case, interleaved, dtype):
    *shape, with_pos = case
    q, k, cos, sin, pos = _inputs(*shape, dtype, with_pos)
    gq, gk = torch.randn(q.shape).to(dtype), torch.randn(k.shape).to(dtype)
    ours = _forward_backward(q, k, cos, sin, pos, interleaved, "triton", gq, gk)
    plain = _forward_backward(q, k, cos, sin, pos, interleaved, "torch", gq, gk)
    ref = _forward_backward(q, k, cos, sin, pos, interleaved, "torch", gq, gk, dtype=torch.float64)
    for name, o, t, r in zip(("q_out", "k_out", "dq", "dk"), ours, plain, ref):
        assert o.dtype == dtype
        assert_close_rule(o, t, r, factor=2.0 if name.endswith("out") else 3.0, name=name)


@pytest.mark.parametrize("head_dim", [2, 6, 250, 256])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_any_even_head_dim_up_to_256(head_dim, interleaved):
    q, k, cos, sin, pos = _inputs(1, 5, 3, 1, head_dim, torch.float32, True)
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)
    ours = _forward_backward(q, k, cos, sin, pos, interleaved, "triton", gq, gk)
    ref = _forward_backward(q, k, cos, sin, pos, interleaved, "torch", gq, gk, dtype=torch.float64)
    plain = _forward_backward(q, k, cos, sin, pos, interleaved, "torch", gq, gk)
    for name, o, t, r in zip(("q_out", "k_out", "dq", "dk"), ours, plain, ref):
        assert_close_rule(o, t, r, name=name)


def test_position_ids_are_honoured():
    # Two packed documents: positions restart at the document boundary. Rotating the pack with
    # those positions equals rotating each document alone from position 0.
    q, k, cos, sin, _ = _inputs(1, 23, 4, 2, 64, torch.float32, False)
    pos = torch.cat((torch.arange(9), torch.arange(14)))[None]
    qo, ko = mk.apply_rotary(q, k, cos, sin, pos, backend="triton")
    qa, ka = mk.apply_rotary(q[:, :9], k[:, :9], cos, sin, backend="triton")
    qb, kb = mk.apply_rotary(q[:, 9:], k[:, 9:], cos, sin, backend="triton")
    assert torch.equal(qo, torch.cat((qa, qb), 1)) and torch.equal(ko, torch.cat((ka, kb), 1))
    q0, _ = mk.apply_rotary(q, k, cos, sin, backend="triton")
    assert not torch.equal(qo[:, 9:], q0[:, 9:])


def _per_token_angles(batch, seq, d, n_positions=None, dtype=torch.float32, independent=False):
    """cos, sin (batch, seq, head_dim) as transformers' rotary embedding returns them: the table
    row of each token's position, repeated for both halves. independent=True draws every column
    freely instead (the general map x * cos + rotate_half(x) * sin, not a rotation)."""
    if independent:
        return torch.randn(batch, seq, d).to(dtype), torch.randn(batch, seq, d).to(dtype)
    cos, sin = mk.rotary_cos_sin(n_positions or seq + 64, d)
    pos = torch.randint(0, cos.shape[0], (batch, seq))
    return torch.cat((cos[pos], cos[pos]), -1).to(dtype), torch.cat((sin[pos], sin[pos]), -1).to(dtype)


# (batch, seq, n_heads, n_kv_heads, head_dim, batch of the angles (1: broadcast), independent columns)
PER_TOKEN_CASES = [(2, 1, 4, 4, 64, 1, False), (1, 37, 8, 2, 128, 1, True), (3, 13, 8, 1, 96, 3, False),
                   (2, 37, 16, 2, 64, 2, True)]


@pytest.mark.parametrize("case", PER_TOKEN_CASES, ids=lambda c: "x".join(map(str, c[:6])) + ("_free" if c[6] else ""))
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_per_token_angles_accuracy(case, interleaved, dtype):
    # transformers hands attention per-token cos, sin (batch or 1, seq, head_dim), in the model's dtype.
    b, s, hq, hk, d, cb, free = case
    q, k = torch.randn(b, s, hq, d).to(dtype), torch.randn(b, s, hk, d).to(dtype)
    cos, sin = _per_token_angles(cb, s, d, dtype=dtype, independent=free)
    gq, gk = torch.randn(q.shape).to(dtype), torch.randn(k.shape).to(dtype)
    ours = _forward_backward(q, k, cos, sin, None, interleaved, "triton", gq, gk)
    plain = _forward_backward(q, k, cos, sin, None, interleaved, "torch", gq, gk)
    ref = _forward_backward(q, k, cos.double(), sin.double(), None, interleaved, "torch", gq, gk,
                            dtype=torch.float64)
    for name, o, t, r in zip(("q_out", "k_out", "dq", "dk"), ours, plain, ref):
        assert o.dtype == dtype
        assert_close_rule(o, t, r, factor=2.0 if name.endswith("out") else 3.0, name=name)


def test_per_token_angles_are_transformers_formula():
    # The reference against transformers' own definition, q * cos + rotate_half(q) * sin, with
    # every column of cos and sin free; and the interleaved layout against pairwise rotation.
    b, s, h, d = 2, 5, 3, 8
    q, k = torch.randn(b, s, h, d, dtype=torch.float64), torch.randn(b, s, 1, d, dtype=torch.float64)
    cos, sin = torch.randn(1, s, d, dtype=torch.float64), torch.randn(1, s, d, dtype=torch.float64)

    def rotate_half(x):
        return torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1)

    q2, k2 = mk.apply_rotary(q, k, cos, sin, backend="torch")
    c, sn = cos[:, :, None], sin[:, :, None]
    assert torch.allclose(q2, q * c + rotate_half(q) * sn, atol=1e-12)
    assert torch.allclose(k2, k * c + rotate_half(k) * sn, atol=1e-12)
    q3, _ = mk.apply_rotary(q, k, cos, sin, interleaved=True, backend="torch")
    x1, x2 = q[..., 0::2], q[..., 1::2]
    expect = torch.stack((x1 * c[..., 0::2] - x2 * sn[..., 0::2], x2 * c[..., 1::2] + x1 * sn[..., 1::2]), -1)
    assert torch.allclose(q3, expect.flatten(-2), atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_per_token_angles_equal_tables(interleaved):
    # Tables read at position_ids and the same angles handed over per token give the same result.
    b, s, hq, hk, d = 2, 11, 4, 2, 64
    q, k = torch.randn(b, s, hq, d), torch.randn(b, s, hk, d)
    cos, sin = mk.rotary_cos_sin(32, d)
    pos = torch.randint(0, 32, (b, s))
    if interleaved:
        per_tok = cos[pos].repeat_interleave(2, -1), sin[pos].repeat_interleave(2, -1)
    else:
        per_tok = torch.cat((cos[pos], cos[pos]), -1), torch.cat((sin[pos], sin[pos]), -1)
    for backend in ("torch", "triton"):
        a = mk.apply_rotary(q, k, cos, sin, pos, interleaved=interleaved, backend=backend)
        t = mk.apply_rotary(q, k, *per_tok, interleaved=interleaved, backend=backend)
        assert torch.allclose(a[0], t[0], atol=1e-6) and torch.allclose(a[1], t[1], atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_position_ids_broadcast_over_batch(backend):
    # transformers passes position_ids (1, seq) for a whole batch: the same as expanding them.
    b, s, d = 3, 9, 64
    q, k, cos, sin, _ = _inputs(b, s, 4, 2, d, torch.float32, False)
    pos = torch.randint(0, cos.shape[0], (1, s))
    q.requires_grad_(), k.requires_grad_()
    qo, ko = mk.apply_rotary(q, k, cos, sin, pos, backend=backend)
    gq, gk = torch.autograd.grad((qo * 1.5).sum() + ko.sum(), (q, k))
    qe, ke = mk.apply_rotary(q, k, cos, sin, pos.expand(b, s).contiguous(), backend=backend)
    ge = torch.autograd.grad((qe * 1.5).sum() + ke.sum(), (q, k))
    for x, y in zip((qo, ko, gq, gk), (qe, ke, *ge)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("case,match", [
    ("pos_shape", r"position_ids must have shape \(batch, seq\) = \(2, 4\) or \(1, 4\)"),
    ("per_token_shape", r"cos must have shape \(2 or 1, 4, 64\)"),
    ("per_token_sin_2d", "sin must be 3-D"),
    ("per_token_with_pos", "position_ids must be None with per-token cos and sin"),
], ids=lambda v: v if " " not in v and "\\" not in v else "")
def test_bad_angle_shapes(case, match):
    q, k, cos, sin, pos = _inputs(2, 4, 2, 1, 64, torch.float32, True)
    tok_cos, tok_sin = _per_token_angles(2, 4, 64)
    args = {
        "pos_shape": (cos, sin, pos[:, :3]),
        "per_token_shape": (tok_cos[:, :, :32], tok_sin, None),
        "per_token_sin_2d": (tok_cos, sin, None),
        "per_token_with_pos": (tok_cos, tok_sin, pos),
    }[case]
    with pytest.raises(ValueError, match=match):
        mk.apply_rotary(q, k, *args, backend="triton")


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_per_token_compile_and_opcheck(interleaved):
    q, k = torch.randn(2, 5, 4, 64), torch.randn(2, 5, 2, 64)
    cos, sin = _per_token_angles(1, 5, 64)
    torch.library.opcheck(torch.ops.meditron_kernels.triton_apply_rotary.default,
                          (q.clone().requires_grad_(), k.clone().requires_grad_(), cos, sin, None, interleaved, False))

    def step(q, k):
        qo, ko = mk.apply_rotary(q, k, cos, sin, interleaved=interleaved, backend="triton")
        return (qo * qo).sum() + ko.sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        fn(qq, kk).backward()
        grads.append((qq.grad, kk.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_strided_inputs(interleaved):
    # q and k as views of one fused qkv projection (head and token strides != contiguous),
    # a transposed q (head_dim not unit-stride: copied once), and broadcast int32 positions.
    b, s, hq, hk, d = 2, 7, 4, 2, 64
    qkv = torch.randn(b, s, (hq + 2 * hk) * d, dtype=torch.float16)
    q = qkv[..., : hq * d].view(b, s, hq, d)
    k = qkv[..., hq * d: (hq + hk) * d].view(b, s, hk, d)
    cos, sin = mk.rotary_cos_sin(16, d)
    pos = torch.randint(0, 16, (1, s), dtype=torch.int32).expand(b, s)
    qo, ko = mk.apply_rotary(q, k, cos, sin, pos, interleaved=interleaved, backend="triton")
    qc, kc = mk.apply_rotary(q.contiguous(), k.contiguous(), cos, sin, pos.contiguous().long(),
                             interleaved=interleaved, backend="triton")
    assert torch.equal(qo, qc) and torch.equal(ko, kc)
    qt = q.contiguous().transpose(2, 3).contiguous().transpose(2, 3)
    assert qt.stride(-1) != 1
    qo2, _ = mk.apply_rotary(qt, k, cos, sin, pos, interleaved=interleaved, backend="triton")
    assert torch.equal(qo2, qc)
    # Strided tables (a column slice of a wider table) are read through their row stride.
    wide_c, wide_s = torch.randn(16, d), torch.randn(16, d)
    wide_c[:, : d // 2], wide_s[:, : d // 2] = cos, sin
    qo3, ko3 = mk.apply_rotary(q, k, wide_c[:, : d // 2], wide_s[:, : d // 2], pos, interleaved=interleaved,
                               backend="triton")
    assert torch.equal(qo3, qc) and torch.equal(ko3, kc)


def test_out_of_place_and_expanded_gradient():
    q, k, cos, sin, pos = _inputs(1, 6, 2, 1, 64, torch.bfloat16, True)
    q0, k0 = q.clone(), k.clone()
    q.requires_grad_(), k.requires_grad_()
    qo, ko = mk.apply_rotary(q, k, cos, sin, pos, backend="triton")
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)
    assert qo.data_ptr() != q.data_ptr() and ko.data_ptr() != k.data_ptr()
    (qo.sum() + ko.sum()).backward()  # gradients are expanded scalars: every stride 0
    ones = torch.ones_like(q0), torch.ones_like(k0)
    expect = mk.apply_rotary(*ones, cos, -sin, pos, backend="torch")
    assert torch.equal(q.grad, expect[0]) and torch.equal(k.grad, expect[1])


def test_empty_batch():
    q, k, cos, sin, _ = _inputs(0, 3, 2, 1, 64, torch.float32, False)
    qo, ko = mk.apply_rotary(q, k, cos, sin, backend="triton")
    assert qo.shape == q.shape and ko.shape == k.shape


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the kernel was launched")


@pytest.mark.parametrize("case,err,match", [
    ("head_dim", ValueError, "head_dim must be at most 256"),
    ("float64", TypeError, "^q: backend='triton'"),
    ("cos_float64", TypeError, "^cos: backend='triton'"),
    ("pos_range", ValueError, "position_ids must lie in"),
    ("pos_negative", ValueError, "position_ids must lie in"),
    ("cos_grad", ValueError, "cos and sin"),
], ids=lambda v: v if isinstance(v, str) and " " not in v and "^" not in v else "")
def test_bad_inputs_raise_before_launch(monkeypatch, case, err, match):
    monkeypatch.setattr(rotary, "_rotary_kernel", _NoLaunch())
    d = 258 if case == "head_dim" else 64
    q, k, cos, sin, pos = _inputs(1, 4, 2, 1, d, torch.float32, True, n_positions=8)
    if case == "float64":
        q, k = q.double(), k.double()
    elif case == "cos_float64":
        cos = cos.double()
    elif case == "pos_range":
        pos[0, 2] = 8
    elif case == "pos_negative":
        pos[0, 1] = -1
    elif case == "cos_grad":
        cos.requires_grad_()
    with pytest.raises(err, match=match):
        mk.apply_rotary(q, k, cos, sin, pos, backend="triton")


@pytest.mark.cpu_only
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, cos, sin, _ = _inputs(1, 4, 2, 1, 64, torch.float32, False)
    with pytest.raises(ValueError, match="CUDA"):
        mk.apply_rotary(q, k, cos, sin, backend="triton")


@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
def test_opcheck(with_pos):
    q, k, cos, sin, pos = _inputs(1, 5, 4, 2, 64, torch.float32, with_pos)
    torch.library.opcheck(torch.ops.meditron_kernels.triton_apply_rotary.default,
                          (q.requires_grad_(), k.requires_grad_(), cos, sin, pos, True, False))


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_compile_fullgraph_matches_eager(interleaved):
    q, k, cos, sin, pos = _inputs(2, 9, 4, 1, 64, torch.float32, True)
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)

    def step(q, k, pos):
        qo, ko = mk.apply_rotary(q, k, cos, sin, pos, interleaved=interleaved, backend="triton")
        return qo, ko, (qo * gq).sum() + (ko * gk).sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        qo, ko, loss = fn(qq, kk, pos)
        loss.backward()
        results.append((qo.detach(), ko.detach(), qq.grad, kk.grad))
    for e, c in zip(*results):
        assert torch.equal(e, c)


@pytest.fixture(scope="module")
def rotary_reports():
    return list(module_reports("meditron_kernels.ops.rotary").values())


@pytest.mark.parametrize("cc", [80, 90])
def test_static_compile(cc, rotary_reports):
    reports = [r for r in rotary_reports if r["arch"] == f"sm_{cc}"]
    assert {r["kernel"] for r in reports} == {
        f"rotary_{layout}{angles}_{way}" for layout in ("half", "interleaved") for angles in ("", "_per_token")
        for way in ("fwd", "bwd")}
    for rec in reports:
        assert_static_clean(rec)  # 16-byte aligned bf16 rows: 8 elements per load


# ---------------------------------------------------------------------------- rope scaling (rotary_cos_sin)
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
LLAMA32 = dict(LLAMA31, factor=32.0)
GEMMA3_GLOBAL = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
GEMMA3_LOCAL = {"rope_type": "default", "rope_theta": 10000.0}
# Small enough that positions 0..63 cross all three llama3 bands at head_dim 32 (wavelengths 6 to 35000).
SMALL_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024}


def _hf_rotary(family, rope_parameters, head_dim, seq):
    """transformers' own inv_freq and per-token cos (seq, head_dim // 2) for ``rope_parameters``."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if family == "llama":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Emb
        cfg = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                                       rope_parameters=dict(rope_parameters), max_position_embeddings=131072)
        layer = {}
    else:  # gemma3_text: rope parameters per layer type; the global layers carry the scaling
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding as Emb
        cfg = transformers.Gemma3TextConfig(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=head_dim, rope_parameters={
                                                "full_attention": dict(rope_parameters),
                                                "sliding_attention": dict(GEMMA3_LOCAL)})
        layer = {"layer_type": "full_attention"}
    emb = Emb(cfg)
    prefix = layer.get("layer_type", "") + ("_" if layer else "")
    inv_freq = getattr(emb, prefix + "inv_freq")
    kind = rope_parameters.get("rope_type", rope_parameters.get("type"))
    if kind != "default":
        assert torch.equal(ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", **layer)[0], inv_freq)
    assert getattr(emb, prefix + "attention_scaling") == 1.0  # so the tables need no extra factor
    cos, sin = emb(torch.zeros(1, seq, head_dim), torch.arange(seq)[None], **layer)
    return inv_freq, cos[0, :, :head_dim // 2], sin[0, :, :head_dim // 2]


@pytest.mark.parametrize("family,params,head_dim", [
    ("llama", LLAMA31, 128), ("llama", LLAMA32, 64), ("llama", {"rope_type": "default", "rope_theta": 500000.0}, 128),
    ("gemma3", GEMMA3_GLOBAL, 256), ("gemma3", {"type": "linear", "factor": 8.0, "rope_theta": 1000000.0}, 128)],
    ids=["llama3.1", "llama3.2", "default", "gemma3-linear", "legacy-type-key"])
def test_scaled_tables_match_transformers(family, params, head_dim):
    pytest.importorskip("transformers")  # absent from the Triton 3.6 leg of .ci/run
    from meditron_kernels import reference as R

    seq = 48
    hf_inv, hf_cos, hf_sin = _hf_rotary(family, params, head_dim, seq)
    # the same formula: in float32 it reproduces transformers' inv_freq bit for bit
    assert torch.equal(R.rope_inv_freq(head_dim, params["rope_theta"], params, dtype=torch.float32), hf_inv)
    # the tables (float64 angles, one rounding) differ from transformers' float32 angles only by those
    # roundings: inv_freq to 1 ulp, the product p * inv_freq to 1/2 ulp
    cos, sin = mk.rotary_cos_sin(seq, head_dim, params["rope_theta"], scaling=params)
    bound = 2 * (seq - 1) * hf_inv.max().item() * torch.finfo(torch.float32).eps + 1e-7
    torch.testing.assert_close(cos, hf_cos, atol=bound, rtol=0)
    torch.testing.assert_close(sin, hf_sin, atol=bound, rtol=0)
    if params.get("rope_type", params.get("type")) != "default":  # the scaling did change the slow frequencies
        plain = R.rope_inv_freq(head_dim, params["rope_theta"])
        assert (R.rope_inv_freq(head_dim, params["rope_theta"], params) < plain).any()


def test_llama3_bands():
    from meditron_kernels import reference as R

    inv = R.rope_inv_freq(32, 10000.0)
    scaled = R.rope_inv_freq(32, 10000.0, SMALL_LLAMA3)
    wavelen = 2 * torch.pi / inv
    fast, slow = wavelen < 1024 / 4, wavelen > 1024 / 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    assert torch.equal(scaled[fast], inv[fast])
    torch.testing.assert_close(scaled[slow], inv[slow] / 8, rtol=1e-15, atol=0)
    mid = ~fast & ~slow
    assert ((scaled[mid] < inv[mid]) & (scaled[mid] > inv[mid] / 8)).all()


def test_scaling_bad_input():
    with pytest.raises(ValueError, match="'yarn' is not implemented; supported: default, linear, llama3"):
        mk.rotary_cos_sin(8, 64, 10000.0, scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="'longrope' is not implemented"):
        mk.rotary_cos_sin(8, 64, scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]})
    with pytest.raises(ValueError, match="'dynamic' is not implemented"):
        mk.rotary_cos_sin(8, 64, scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="needs 'low_freq_factor'"):
        mk.rotary_cos_sin(8, 64, scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match=r"scaling\['factor'\] must be a positive number"):
        mk.rotary_cos_sin(8, 64, scaling={"rope_type": "linear", "factor": 0})
    with pytest.raises(ValueError, match="must be below high_freq_factor"):
        mk.rotary_cos_sin(8, 64, scaling=dict(SMALL_LLAMA3, low_freq_factor=4.0))
    with pytest.raises(ValueError, match="disagrees with theta"):
        mk.rotary_cos_sin(8, 64, 10000.0, scaling=GEMMA3_GLOBAL)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        mk.rotary_cos_sin(8, 64, scaling={"rope_type": "default", "partial_rotary_factor": 0.5})
    with pytest.raises(TypeError, match="scaling must be a dict"):
        mk.rotary_cos_sin(8, 64, scaling="llama3")


def test_scaling_positional_as_in_the_contract():
    a = mk.rotary_cos_sin(16, 32, 10000.0, SMALL_LLAMA3)
    b = mk.rotary_cos_sin(16, 32, 10000.0, scaling=SMALL_LLAMA3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_flash_attention_with_scaled_tables_equals_apply_rotary_then_attention():
    # Scaled tables are just tables: the fused-rotary attention reads them as it reads plain ones.
    cos, sin = mk.rotary_cos_sin(64, 32, 10000.0, scaling=SMALL_LLAMA3)
    q, k, v = torch.randn(1, 37, 4, 32), torch.randn(1, 37, 2, 32), torch.randn(1, 37, 2, 32)
    pos = torch.randint(0, 64, (1, 37))
    g = torch.randn(q.shape)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fused = mk.flash_attention(*leaves, causal=True, rotary=(cos, sin), position_ids=pos, backend="triton")
    fused_grads = torch.autograd.grad(fused, leaves, g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    q2, k2 = mk.apply_rotary(leaves[0], leaves[1], cos, sin, pos, backend="triton")
    # position_ids of the keys; the queries are aligned with them (sq == sk), so both read pos
    o = mk.flash_attention(q2, k2, leaves[2], causal=True, backend="triton")
    grads = torch.autograd.grad(o, leaves, g)
    torch.testing.assert_close(fused, o, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
