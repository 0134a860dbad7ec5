"""Sliding-window (local) attention in the Triton flash attention, under the interpreter: window=(left,
right) with FlashAttention's semantics against the float64 torch reference, within the accuracy rule of
tests/ops/test_attention.py (outputs 2x, gradients 3x the torch reference's own error).

Interpreter tiles: forward and dq 32 query rows x 16 keys, dk/dv 32 keys x 16 queries, so windows of a
few keys fall inside one tile and windows of tens of keys cross several, with whole tiles outside.
"""

import math

import pytest
import torch

import meditron_kernels as mk
from meditron_kernels.ops import attention as A
from helpers import assert_close_rule

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4}
FWD_OP = torch.ops.meditron_kernels.triton_flash_attention_fwd
BWD_OP = torch.ops.meditron_kernels.triton_flash_attention_bwd


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(lead_q, lead_k, h, hkv, d, dtype):
    return (torch.randn(*lead_q, h, d, dtype=dtype), torch.randn(*lead_k, hkv, d, dtype=dtype),
            torch.randn(*lead_k, hkv, d, dtype=dtype))


def _run(backend, q, k, v, g, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = mk.flash_attention(q, k, v, backend=backend, **kw)
    return o.detach(), torch.autograd.grad(o, (q, k, v), g.to(o.dtype))


def _check(q, k, v, **kw):
    """Triton vs the float64 reference, within the accuracy rule, for the output and every gradient."""
    dtype = q.dtype
    g = torch.randn(q.shape, dtype=torch.float64).to(dtype).double()
    o, grads = _run("triton", q, k, v, g, **kw)
    o_t, grads_t = _run("torch", q, k, v, g, **kw)
    o_r, grads_r = _run("torch", q.double(), k.double(), v.double(), g, **kw)
    assert_close_rule(o, o_t, o_r, atol=ATOL[dtype], name="o")
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, grads_t, grads_r):
        assert a.dtype == dtype
        assert_close_rule(a, b, c, factor=3.0, atol=ATOL[dtype], name=name)


# ---------------------------------------------------------------------------- batched, every gradient
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,window", [
    (True, (5, 0)),  # a window inside one key tile
    (True, (36, 0)),  # equal to the sequence: every key, as plain causal
    (True, (100, 0)),  # larger than the sequence
    (True, (20, 7)),  # causal caps the right side at 0
    (False, (4, 9)),  # both sides
    (False, (-1, 3)),  # right only
    (False, (13, -1)),  # left only
])
def test_batched_window(causal, window, dtype):
    # GQA 4:1, an odd length: partial tiles at both ends of each band
    _check(*_inputs((1, 37), (1, 37), 8, 2, 32, dtype), causal=causal, window=window)


def test_window_equal_to_or_larger_than_the_sequence_is_global():
    q, k, v = _inputs((1, 29), (1, 29), 4, 2, 64, torch.float32)
    full = mk.flash_attention(q, k, v, causal=False, backend="triton")
    for window in ((28, 28), (64, 100)):
        torch.testing.assert_close(mk.flash_attention(q, k, v, causal=False, window=window, backend="triton"), full,
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal,window", [(True, (9, 0)), (False, (6, 2))])
def test_fewer_queries_than_keys(causal, window):
    # bottom-right aligned: query i sits at key i + sk - sq
    _check(*_inputs((2, 20), (2, 45), 8, 2, 32, torch.float32), causal=causal, window=window)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents(causal):
    # the window applies inside each document; documents shorter and longer than it
    lengths = [5, 1, 40, 3, 21]
    q, k, v = _inputs((sum(lengths),), (sum(lengths),), 4, 2, 32, torch.float32)
    _check(q, k, v, causal=causal, cu_seqlens=_cu(lengths), max_seqlen=40, window=(7, -1 if causal else 3))
    lq, lk = [3, 20, 9], [10, 33, 9]  # different query and key documents
    q, k, v = _inputs((sum(lq),), (sum(lk),), 8, 2, 32, torch.float16)
    _check(q, k, v, causal=causal, cu_seqlens=_cu(lq), cu_seqlens_k=_cu(lk), window=(11, 0 if causal else 4))


def test_rows_that_see_no_key():
    # More queries than keys, not causal: the first rows' windows lie before key 0. As FlashAttention:
    # o = 0 and lse = -inf there, and no gradient flows through them (the torch reference gives NaN).
    q, k, v = _inputs((1, 45), (1, 20), 4, 2, 32, torch.float64)
    window = (3, 1)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    o, lse = mk.flash_attention(qf, kf, vf, causal=False, window=window, return_lse=True, backend="triton")
    g = torch.randn(o.shape)
    grads = torch.autograd.grad(o, (qf, kf, vf), g)
    # query i at key i - 25 sees keys i - 28 .. i - 24: rows 0..23 see none
    assert torch.all(o[:, :24] == 0) and torch.all(lse[:, :, :24] == float("-inf"))
    # float64 by hand, with empty rows as zeros
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) / math.sqrt(32)
    at = torch.arange(45)[:, None] - 25
    keep = (torch.arange(20)[None, :] >= at - 3) & (torch.arange(20)[None, :] <= at + 1)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True).detach().nan_to_num(neginf=0.0)
    e = torch.exp(s - m)
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    ref = torch.einsum("bhqk,bkhd->bqhd", p, v.repeat_interleave(2, dim=2))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    torch.testing.assert_close(o.double(), ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- decoding (split-KV)
@pytest.mark.parametrize("splits", [None, 3])
def test_decode_with_a_window(splits):
    # group * sq <= 64: the decoding kernel, its key splits cut from the band only
    lens = torch.tensor([70, 5, 33], dtype=torch.int32)
    with A.overrides(splits=splits):
        _check(*_inputs((3, 2), (3, 70), 4, 2, 32, torch.float32), causal=True, seqlens_k=lens, window=(10, 0))
        _check(*_inputs((3, 1), (3, 70), 8, 1, 64, torch.float16), causal=False, seqlens_k=lens, window=(40, 2))
        lq, lk = [1, 2, 1], [40, 2, 17]  # varlen decoding
        _check(*_inputs((sum(lq),), (sum(lk),), 4, 1, 32, torch.float32), causal=True, cu_seqlens=_cu(lq),
               cu_seqlens_k=_cu(lk), window=(6, 0))


# ---------------------------------------------------------------------------- tiles outside the band are skipped
def _poisoned(q, k, v, do, n):
    # NaN in the first n rows: a tile holding any of them, once loaded, puts NaN in whatever it touches,
    # masked or not (0 * NaN = NaN)
    for t in (q, k, v, do):
        t[:, :n] = float("nan")
    return q, k, v, do


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the poisoned rows themselves are NaN
def test_tiles_outside_the_window_are_not_visited():
    # causal, window (7, 0), 96 tokens. Query rows 64..95 (the forward's and dq's third 32-row block) see
    # keys 57..95, in the 16-key blocks from 48 on; key rows 64..95 (dk/dv's third 32-key block) are
    # seen by query rows 64..95, in the 16-query blocks from 64 on. Rows 0..47 of q, k, v and do are NaN:
    # those blocks' outputs stay finite, and exact, only if no tile of rows 0..47 is ever loaded.
    q, k, v = _inputs((1, 96), (1, 96), 2, 1, 32, torch.float32)
    do = torch.randn(q.shape)
    kw = dict(causal=True, window=(7, 0))
    clean = _run("triton", q, k, v, do, **kw)
    qp, kp, vp, dop = _poisoned(q.clone(), k.clone(), v.clone(), do.clone(), 48)
    dirty = _run("triton", qp, kp, vp, dop, **kw)
    for a, b in zip((clean[0],) + clean[1], (dirty[0],) + dirty[1]):
        assert torch.isfinite(b[:, 64:]).all()
        assert torch.equal(a[:, 64:], b[:, 64:])
    # the same poison reaches every block of global causal attention, which visits key 0 from every row
    assert torch.isnan(mk.flash_attention(qp, kp, vp, causal=True, backend="triton")[:, 64:]).all()


def test_decode_reads_only_the_band():
    lens = torch.tensor([70], dtype=torch.int32)
    q, k, v = _inputs((1, 2), (1, 70), 4, 2, 32, torch.float32)
    kp, vp = k.clone(), v.clone()
    kp[:, :48], vp[:, :48] = float("nan"), float("nan")  # the band is keys 58..69, in the 16-key blocks from 48
    for splits in (1, 2):
        with A.overrides(splits=splits):
            want = mk.flash_attention(q, k, v, causal=True, seqlens_k=lens, window=(10, 0), backend="triton")
            got = mk.flash_attention(q, kp, vp, causal=True, seqlens_k=lens, window=(10, 0), backend="triton")
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------- integration
def test_opcheck():
    q, k, v = _inputs((1, 19), (1, 19), 4, 2, 32, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(FWD_OP, (q, k, v, True, 0.25, None, 0, None, None, None, None, 0, None, 5, -1))
    lengths = [7, 1, 11]
    qp, kp, vp = (t.detach()[0].clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(FWD_OP, (qp, kp, vp, False, 0.25, _cu(lengths), 11, None, None, None, None, 0, None, 3, 2))
    o, lse = FWD_OP(q.detach(), k.detach(), v.detach(), True, 0.25, None, 0, None, None, None, None, 0, None, 5, -1)
    torch.library.opcheck(BWD_OP, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, True, 0.25,
                                      None, 0, None, None, None, None, None, 0, None, 5, -1))


def test_torch_compile_fullgraph():
    lengths = [9, 1, 14]
    q, k, v = _inputs((24,), (24,), 4, 2, 32, torch.float32)
    cu = _cu(lengths)

    def f(q, k, v):
        return mk.flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=14, window=(4, 0),
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


def test_backward_is_bitwise_deterministic():
    q, k, v = _inputs((1, 53), (1, 53), 8, 2, 32, torch.float32)
    g = torch.randn(q.shape)
    first = _run("triton", q, k, v, g, causal=True, window=(11, 0))[1]
    second = _run("triton", q, k, v, g, causal=True, window=(11, 0))[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_benchmark_counts_the_band():
    from benchmarks import bench_attention as B

    assert B.visible_pairs(8, True, (2, 0)) == 1 + 2 + 3 * 6 and B.visible_pairs(8, False, (-1, -1)) == 64
    assert B.visible_pairs(8, False, (-1, 1)) == sum(min(i + 2, 8) for i in range(8))
    rows = [dict(op="flash_attention", status="ok", shape=shape, dtype="bf16", direction="forward", provider="triton",
                 ms=ms) for shape, ms in (("7b 1x8192", 4.0), ("7b 1x8192 window1024", 1.0))]
    assert B.local_fractions(rows) == {("7b 1x8192 window1024", "bf16", "forward", "triton"): 0.25}
