"""The Triton flash attention (meditron_kernels/ops/attention.py) under the interpreter.

Accuracy rule (docs/design.md, "Accuracy rule"): max|out - ref64| <= 2 x max|out_torch - ref64| + atol, gradients 3x,
where ref64 is the torch reference in float64 and out_torch the torch reference in the input dtype.
Shapes stay small: the interpreter runs every program in Python. Tiles under the interpreter are
32 query rows x 16 keys (dk/dv: 32 keys x 16 queries), so a sequence of 37 crosses several blocks,
partial ones and the causal diagonal.
"""

import pytest
import torch

import meditron_kernels as mk
from meditron_kernels._static import ARCH_LIMITS, module_reports
from meditron_kernels.ops import attention as A
from helpers import assert_close_rule

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(lead, h, hkv, d, dtype):
    q = torch.randn(*lead, h, d, dtype=dtype)
    k = torch.randn(*lead, hkv, d, dtype=dtype)
    v = torch.randn(*lead, hkv, d, dtype=dtype)
    return q, k, v


def _run(backend, q, k, v, g, **kw):
    """-> output and (dq, dk, dv) of flash_attention on ``backend`` for output gradient g."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if kw.get("cu_seqlens") is not None:  # a fresh offsets tensor per call (see test_cu_seqlens_reused)
        kw = dict(kw, cu_seqlens=kw["cu_seqlens"].clone())
    o = mk.flash_attention(q, k, v, backend=backend, **kw)
    return o.detach(), torch.autograd.grad(o, (q, k, v), g.to(o.dtype))


def _check(q, k, v, **kw):
    """Triton vs the float64 reference, within the accuracy rule, for the output and all gradients."""
    dtype = q.dtype
    g = torch.randn(q.shape, dtype=torch.float64).to(q.dtype).double()  # the same rounded gradient for every way
    o, grads = _run("triton", q, k, v, g, **kw)
    o_t, grads_t = _run("torch", q, k, v, g, **kw)
    o_r, grads_r = _run("torch", q.double(), k.double(), v.double(), g, **kw)
    assert o.dtype == dtype and o.shape == q.shape
    assert_close_rule(o, o_t, o_r, atol=ATOL[dtype], name="o")
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, grads_t, grads_r):
        assert a.dtype == dtype
        assert_close_rule(a, b, c, factor=3.0, atol=ATOL[dtype], name=name)


# ---------------------------------------------------------------------------- batched
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,s,h,hkv,d", [
    (2, 37, 4, 4, 64),  # GQA ratio 1, odd length
    (1, 37, 8, 2, 32),  # ratio 4
    (1, 23, 8, 1, 64),  # ratio 8
    (2, 1, 2, 1, 32),  # a single token
    (1, 19, 2, 1, 96),  # head_dim padded to 128
    (1, 17, 2, 2, 128),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched(b, s, h, hkv, d, causal, dtype):
    _check(*_inputs((b, s), h, hkv, d, dtype), causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_through_fp32_dot_operands(causal):
    # The interpreter's bf16 arithmetic is broken (docs/design.md, platform facts); the kernels switch their matmul
    # operands to fp32 there, after rounding p and ds to bf16 as the tensor cores would see them.
    _check(*_inputs((1, 37), 4, 2, 64, torch.bfloat16), causal=causal)


def test_head_dim_256_and_softmax_scale():
    _check(*_inputs((1, 9), 2, 1, 256, torch.float32), causal=True, softmax_scale=0.3)
    _check(*_inputs((1, 21), 2, 1, 32, torch.float16), causal=False, softmax_scale=-0.2)


def test_log_sum_exp():
    q, k, v = _inputs((2, 37), 4, 2, 32, torch.float32)
    o, lse = A._fwd_op(q, k, v, True, 0.5, None, 0, None, None, None)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, dim=2)) * 0.5
    s = s.masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), float("-inf"))
    assert lse.shape == (2, 4, 37) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, dim=-1), atol=1e-5, rtol=1e-6)


def test_strided_views_of_a_fused_projection():
    # q, k, v as column slices of one (batch, seq, (h + 2 hkv) * d) projection: row strides != h * d
    b, s, h, hkv, d = 2, 29, 4, 2, 32
    qkv = torch.randn(b, s, (h + 2 * hkv) * d)
    q = qkv[..., : h * d].view(b, s, h, d)
    k = qkv[..., h * d: (h + hkv) * d].view(b, s, hkv, d)
    v = qkv[..., (h + hkv) * d:].view(b, s, hkv, d)
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)
    # a non-unit stride along head_dim is copied once, and still right
    _check(*(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _inputs((1, 13), 2, 1, 32, torch.float32)),
           causal=False)


def test_empty_sequence():
    q, k, v = _inputs((2, 0), 4, 2, 32, torch.float32)
    o = mk.flash_attention(q, k, v, backend="triton")
    assert o.shape == q.shape


# ---------------------------------------------------------------------------- packed documents
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_documents(causal, dtype):
    lengths = [5, 1, 37, 1, 20, 3]
    q, k, v = _inputs((sum(lengths),), 8, 2, 32, dtype)
    _check(q, k, v, causal=causal, cu_seqlens=_cu(lengths), max_seqlen=max(lengths))


def test_packed_without_max_seqlen_and_empty_document():
    lengths = [17, 0, 1, 33]
    q, k, v = _inputs((sum(lengths),), 4, 4, 64, torch.float32)
    _check(q, k, v, causal=True, cu_seqlens=_cu(lengths))


def test_packed_equals_separate_sequences():
    # Attention never crosses a document: each document alone gives the same rows, bit for bit
    # where the tiles line up (every document starts a tile).
    lengths = [32, 7, 19]
    q, k, v = _inputs((sum(lengths),), 4, 2, 32, torch.float16)
    o = mk.flash_attention(q, k, v, cu_seqlens=_cu(lengths), max_seqlen=32, backend="triton")
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = mk.flash_attention(q[None, sl], k[None, sl], v[None, sl], backend="triton")[0]
        assert torch.equal(o[sl], alone)
        start += n


# ---------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("d,dtype", [(32, torch.float32), (64, torch.float16), (96, torch.float32)])
def test_rotary_batched(d, dtype, with_pos):
    b, s = 2, 37
    q, k, v = _inputs((b, s), 4, 2, d, dtype)
    cos, sin = mk.rotary_cos_sin(64, d)
    pos = torch.randint(0, 64, (b, s)) if with_pos else None
    _check(q, k, v, causal=True, rotary=(cos, sin), position_ids=pos)


def test_rotary_equals_apply_rotary_then_attention():
    q, k, v = _inputs((1, 37), 4, 1, 64, torch.float16)
    cos, sin = mk.rotary_cos_sin(37, 64)
    g = torch.randn(q.shape, dtype=torch.float64).to(q.dtype).double()  # the same rounded gradient for every way
    fused, fused_grads = _run("triton", q, k, v, g, rotary=(cos, sin))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    q2, k2 = mk.apply_rotary(qq, kk, cos, sin, backend="torch")
    o = mk.flash_attention(q2, k2, vv, backend="triton")
    grads = torch.autograd.grad(o, (qq, kk, vv), g.to(o.dtype))
    # the kernel rotates exactly as apply_rotary (fp32, one rounding), so the forward agrees closely;
    # the backward's conjugate rotation runs in fp32 before its rounding, so it may differ by a rounding
    torch.testing.assert_close(fused, o.detach(), atol=2e-3, rtol=0)
    for a, b_ in zip(fused_grads, grads):
        torch.testing.assert_close(a, b_, atol=4e-3, rtol=1e-2)


@pytest.mark.parametrize("with_pos", [False, True])
def test_rotary_packed(with_pos):
    lengths = [9, 1, 30, 4]
    total = sum(lengths)
    q, k, v = _inputs((total,), 4, 2, 32, torch.float32)
    cos, sin = mk.rotary_cos_sin(48, 32)
    pos = torch.randint(0, 48, (total,)) if with_pos else None  # default: restarts in every document
    _check(q, k, v, causal=True, cu_seqlens=_cu(lengths), max_seqlen=30, rotary=(cos, sin), position_ids=pos)


# ---------------------------------------------------------------------------- TMA descriptors
@pytest.mark.parametrize("case", ["batched", "packed", "rotary"])
def test_descriptor_path(monkeypatch, case):
    # The sm_90 path (tensor descriptors) under the interpreter, which enforces TMA's alignment rules.
    monkeypatch.setattr(A, "_INTERPRET_TMA", True)
    if case == "packed":
        lengths = [13, 1, 40]
        _check(*_inputs((54,), 4, 2, 32, torch.float16), causal=True, cu_seqlens=_cu(lengths), max_seqlen=40)
    elif case == "rotary":
        cos, sin = mk.rotary_cos_sin(37, 64)
        _check(*_inputs((2, 37), 4, 1, 64, torch.float32), causal=True, rotary=(cos, sin))
    else:
        _check(*_inputs((2, 37), 4, 2, 32, torch.float16), causal=False)


def test_descriptor_eligibility():
    q = torch.randn(2, 8, 4, 64, dtype=torch.float16)
    assert A.use_tma(90, 64, False, q) and not A.use_tma(80, 64, False, q)
    assert not A.use_tma(90, 96, False, torch.randn(2, 8, 4, 96, dtype=torch.float16))  # not a power of two
    odd = torch.randn(2, 8, 4 * 64 + 4, dtype=torch.float16)[..., : 4 * 64].view(2, 8, 4, 64)
    assert not A.use_tma(90, 64, False, odd)  # row stride of 520 bytes is not a multiple of 16
    assert not A.use_tma(90, 64, False, q.float())  # fp32 runs on CUDA cores


# ---------------------------------------------------------------------------- determinism
def test_backward_is_bitwise_deterministic():
    lengths = [37, 1, 26]
    q, k, v = _inputs((64,), 8, 1, 32, torch.float16)
    g = torch.randn(q.shape, dtype=torch.float64).to(q.dtype).double()  # the same rounded gradient for every way
    kw = dict(causal=True, cu_seqlens=_cu(lengths), max_seqlen=37)
    first = _run("triton", q, k, v, g, **kw)
    second = _run("triton", q, k, v, g, **kw)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_before_launch():
    q, k, v = _inputs((1, 8), 4, 2, 32, torch.float32)
    with pytest.raises(TypeError, match="float64"):
        mk.flash_attention(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(ValueError, match="head_dim up to 256"):
        mk.flash_attention(*_inputs((1, 4), 2, 1, 320, torch.float16), backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        mk.flash_attention(q, k[..., :16], v[..., :16], backend="triton")
    with pytest.raises(ValueError, match="divisible"):
        mk.flash_attention(q, k[:, :, :1].expand(1, 8, 3, 32), v[:, :, :1].expand(1, 8, 3, 32), backend="triton")
    qp, kp, vp = _inputs((10,), 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        mk.flash_attention(qp, kp, vp, cu_seqlens=_cu([3, 4]), backend="triton")
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.flash_attention(qp, kp, vp, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32), backend="triton")
    with pytest.raises(ValueError, match="max_seqlen"):
        mk.flash_attention(qp, kp, vp, cu_seqlens=_cu([3, 7]), max_seqlen=5, backend="triton")
    cos, sin = mk.rotary_cos_sin(8, 32)
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 8\)"):
        mk.flash_attention(q, k, v, rotary=(cos, sin), position_ids=torch.full((1, 8), 8), backend="triton")
    with pytest.raises(ValueError, match="cover 8 positions"):
        mk.flash_attention(qp, kp, vp, cu_seqlens=_cu([10]), rotary=(cos, sin), backend="triton")
    with pytest.raises(ValueError, match="detached"):
        mk.flash_attention(q, k, v, rotary=(cos.requires_grad_(), sin), backend="triton")


# ---------------------------------------------------------------------------- integration
def test_opcheck():
    q, k, v = _inputs((1, 19), 4, 2, 32, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(A._fwd_op, (q, k, v, True, 0.25, None, 0, None, None, None))
    lengths = [7, 1, 11]
    qp, kp, vp = (t.detach()[0].clone().requires_grad_() for t in (q, k, v))
    cos, sin = mk.rotary_cos_sin(19, 32)
    torch.library.opcheck(A._fwd_op, (qp, kp, vp, False, 0.25, _cu(lengths), 11, cos, sin, None))
    o, lse = A._fwd_op(q.detach(), k.detach(), v.detach(), True, 0.25, None, 0, None, None, None)
    torch.library.opcheck(A._bwd_op, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, True, 0.25,
                                      None, 0, None, None, None))


def test_torch_compile_fullgraph():
    lengths = [9, 1, 14]
    q, k, v = _inputs((24,), 4, 2, 32, torch.float32)
    cu = _cu(lengths)
    cos, sin = mk.rotary_cos_sin(16, 32)

    def f(q, k, v):
        return mk.flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=14, rotary=(cos, sin),
                                  backend="triton").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    args_e = [t.clone().requires_grad_() for t in (q, k, v)]
    loss_e = f(*args_e)
    grads_e = torch.autograd.grad(loss_e, args_e)
    assert torch.equal(loss, loss_e)
    for a, b in zip(grads, grads_e):
        assert torch.equal(a, b)


def test_cu_seqlens_reused_across_calls():
    # a trainer passes the same offsets to every layer
    lengths = [5, 9]
    cu = _cu(lengths)
    q, k, v = _inputs((14,), 2, 1, 32, torch.float32)
    first = mk.flash_attention(q, k, v, cu_seqlens=cu, backend="triton")
    assert torch.equal(first, mk.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=9, backend="triton"))


# ---------------------------------------------------------------------------- configuration and static report
def test_config_table_invariants():
    tables = [A._TABLE, A._TABLE_PADDED, {k: [c] for k, c in A._TABLE_F32.items()}]
    for table in tables:
        for key, cfgs in table.items():
            for c in cfgs:
                if key[0] in ("fwd", "dq"):  # the causal diagonal must start on a key block
                    assert c.block_m % c.block_n == 0, (key, c)
                assert c.block_m >= 16 and c.block_n >= 16 and c.num_warps in (4, 8), (key, c)
    for kernel in ("fwd", "dq", "dkdv"):
        c = A._INTERPRETER[kernel]
        assert kernel == "dkdv" or c.block_m % c.block_n == 0


@pytest.fixture(scope="module")
def static_reports():
    reports = module_reports("meditron_kernels.ops.attention")
    return {cc: [r for r in reports.values() if r["arch"] == f"sm_{cc}"] for cc in (80, 90)}


@pytest.mark.parametrize("cc", [80, 90])
def test_static_report(static_reports, cc):
    """bf16, head_dim 128, 64/8 heads, seq 4096, batch 4, causal, with the run-time configs."""
    reports = static_reports[cc]
    assert [r["kernel"].split("@")[0] for r in reports] == ["attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"]
    for r in reports:
        assert r["spill_bytes"] == 0, r
        assert r["shared_bytes"] <= ARCH_LIMITS[cc]["smem_per_block"], r
        assert r["mma"] == ("HGMMA" if cc == 90 else "HMMA"), r
        if cc == 90:
            assert r["tma"], r  # the k/v (and q/do) tiles come in through TMA
