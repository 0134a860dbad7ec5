"""Decoding (a few query rows against a long key cache): _attn_decode, one program per (sequence,
kv head, key split) holding every query row of the group, and _attn_decode_reduce, which merges the
splits by their log-sum-exps; and their launches."""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import Launch, cast_rtne
from .configs import Config
from .forward import _fwd_blocks
from .problem import Problem
from .tiles import _INTERPRETED, _LN2, _bounds, _d_pad, _doc_bounds, _window_blocks, _window_rows


# ---------------------------------------------------------------------------- decoding (split-KV)
@triton.jit
def _attn_decode(
    Q, K, V,  # as in _attn_fwd
    O, LSE,  # out when not SPLIT: as in _attn_fwd
    O_PART, LSE_PART,  # out when SPLIT: fp32 partial results of each key split, contiguous,
    #                    (n_batch, n_heads, n_splits, seqlen_q, HEAD_DIM) and (n_batch, n_heads, n_splits, seqlen_q)
    CU, CU_K, LENS_K,  # as in _attn_fwd
    qk_scale,  # softmax_scale * log2(e)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k,  # batched lengths (PACKED: the longest query document, for O_PART's layout)
    n_kv_heads, n_batch, group, n_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # group * seqlen_q query rows (every query head of one kv head), padded
    BLOCK_N: tl.constexpr,  # key rows per step
    CAUSAL: tl.constexpr, PACKED: tl.constexpr, VAR_K: tl.constexpr,
    SPLIT: tl.constexpr,  # n_splits > 1: write partial results for _attn_decode_reduce
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, SCALE_NEG: tl.constexpr,
    WIN_LEFT: tl.constexpr = -1, WIN_RIGHT: tl.constexpr = -1,  # as in _attn_fwd
):
    # One program: one kv head of one sequence, all its query heads and rows at once (so the cache is
    # read once per kv head, not once per query head), over one split of the keys.
    pid = tl.program_id(0)
    split = pid % n_splits
    kvh = (pid // n_splits) % n_kv_heads
    bid = pid // (n_splits * n_kv_heads)
    start_q, Lq, start_k, Lk = _bounds(CU, CU_K, LENS_K, bid, seqlen_q, seqlen_k, PACKED, VAR_K)
    if Lq == 0:
        return
    off = Lk - Lq
    WINDOW: tl.constexpr = WIN_LEFT >= 0 or WIN_RIGHT >= 0
    if WINDOW:
        # Local attention: the splits cut the band of keys some row sees, the rest of the cache is never
        # read; every block is masked (a few rows: the mask is cheap), and a split may be empty for a row.
        band_lo, _a, _b, span = _window_blocks(0, Lq, Lk, off, BLOCK_M, BLOCK_N, CAUSAL, WIN_LEFT, WIN_RIGHT)
        chunk = tl.cdiv(tl.cdiv(span - band_lo, n_splits), BLOCK_N) * BLOCK_N
        lo = band_lo + split * chunk
        hi = tl.minimum(lo + chunk, span)
        full_end = lo
    else:
        # Splits cut the keys every row sees (causal: 0 .. off); the split holding the last of them also
        # takes the causal tail. So each split's first key is visible to all rows and its maxima are finite.
        span = off + 1 if CAUSAL else Lk
        chunk = tl.cdiv(tl.cdiv(span, n_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, span)
        hi = tl.where(hi >= span, Lk, hi)
        hi = tl.where(lo >= span, lo, hi)  # nothing left for this split
        full_end = lo + ((tl.maximum(tl.minimum(hi, span) - lo, 0)) // BLOCK_N) * BLOCK_N

    r = tl.arange(0, BLOCK_M)
    g = r // seqlen_q  # query head within the group
    i = r % seqlen_q  # query row within the sequence
    row_ok = (g < group) & (i < Lq)
    head = (kvh * group + g).to(tl.int64)
    b64 = bid.to(tl.int64)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < HEAD_DIM
    q = tl.load(Q + b64 * stride_qb + (start_q + i)[:, None] * stride_qs + head[:, None] * stride_qh + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + start_k * stride_ks + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + start_k * stride_vs + kvh.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if WINDOW:
        first, last = _window_rows(i + off, WIN_LEFT, WIN_RIGHT)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q, first, last, lo, hi, Lk, qk_scale,
                                    k_base, k_base, stride_ks, v_base, v_base, stride_vs,
                                    start_k, bid, LENS_K, 0, 0, LENS_K, LENS_K, 0,
                                    BLOCK_N, HEAD_DIM, D_PAD, D_PAD, True, CAUSAL or WIN_RIGHT >= 0, False, False,
                                    False, DOT_F32, PRECISION, SCALE_NEG, False, True)
    else:
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q, i, i + off, lo, full_end, Lk, qk_scale,
                                    k_base, k_base, stride_ks, v_base, v_base, stride_vs,
                                    start_k, bid, LENS_K, 0, 0, LENS_K, LENS_K, 0,
                                    BLOCK_N, HEAD_DIM, D_PAD, D_PAD, False, CAUSAL, False, False, False,
                                    DOT_F32, PRECISION, SCALE_NEG, False)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q, i, i + off, full_end, hi, Lk, qk_scale,
                                    k_base, k_base, stride_ks, v_base, v_base, stride_vs,
                                    start_k, bid, LENS_K, 0, 0, LENS_K, LENS_K, 0,
                                    BLOCK_N, HEAD_DIM, D_PAD, D_PAD, True, CAUSAL, False, False, False,
                                    DOT_F32, PRECISION, SCALE_NEG, False)
    lse = tl.where(l_i > 0, (m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))) * _LN2, float("-inf"))  # empty split
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        n_heads = n_kv_heads * group
        part = ((b64 * n_heads + head) * n_splits + split) * seqlen_q + i
        tl.store(O_PART + part[:, None] * HEAD_DIM + cols[None, :], o, mask=mask)
        tl.store(LSE_PART + part, lse, mask=row_ok)
    else:
        o_ptrs = O + b64 * stride_ob + (start_q + i)[:, None] * stride_os + head[:, None] * stride_oh + cols[None, :]
        tl.store(o_ptrs, cast_rtne(o, O.dtype.element_ty, _INTERPRETED), mask=mask)
        tl.store(LSE + b64 * stride_lb + head * stride_lh + start_q + i, lse, mask=row_ok)


@triton.jit
def _attn_decode_reduce(
    O_PART, LSE_PART,  # _attn_decode's partial results
    O, LSE,  # out: as in _attn_fwd
    CU,  # as in _attn_fwd
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, n_heads, n_batch, n_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # n_splits rounded up to a power of two
    PACKED: tl.constexpr,
    WINDOW: tl.constexpr = False,  # local attention: a row may have no key in any split
):
    # One program per query row of one head: the splits' softmaxes merged by their log-sum-exps.
    pid = tl.program_id(0)
    i = pid % seqlen_q
    head = ((pid // seqlen_q) % n_heads).to(tl.int64)
    bid = pid // (seqlen_q * n_heads)
    start_q, Lq = _doc_bounds(CU, bid, seqlen_q, PACKED)
    if i >= Lq:
        return
    s = tl.arange(0, SPLITS_PAD)
    part = ((bid.to(tl.int64) * n_heads + head) * n_splits + s) * seqlen_q + i
    lse_s = tl.load(LSE_PART + part, mask=s < n_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)  # finite: the first split is never empty (but for a window)
    if WINDOW:
        m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m)
    total = tl.sum(w, 0)
    cols = tl.arange(0, D_PAD)
    o_s = tl.load(O_PART + part[:, None] * HEAD_DIM + cols[None, :], mask=(s < n_splits)[:, None] &
                  (cols < HEAD_DIM)[None, :], other=0.0)
    if WINDOW:  # a row that sees no key: o = 0, lse = -inf
        o = tl.sum(w[:, None] * o_s, 0) / tl.where(total > 0, total, 1.0)
    else:
        o = tl.sum(w[:, None] * o_s, 0) / total
    b64 = bid.to(tl.int64)
    tl.store(O + b64 * stride_ob + (start_q + i) * stride_os + head * stride_oh + cols,
             cast_rtne(o, O.dtype.element_ty, _INTERPRETED), mask=cols < HEAD_DIM)
    tl.store(LSE + b64 * stride_lb + head * stride_lh + start_q + i, m + tl.log(total))


# ---------------------------------------------------------------------------- launches
def decode_launch(P: Problem, q, k, v, o, lse, o_part, lse_part, cfg: Config, n_splits: int,
                  flags: dict) -> Launch:
    c = P.kernel_args(q)
    bq, bk, bv, bo = P.strides(q), P.strides(k), P.strides(v), P.strides(o)
    rows = P.group * P.seqlen_q
    args = dict(
        Q=q, K=k, V=v, O=o, LSE=lse, O_PART=o_part, LSE_PART=lse_part, CU=c["CU"], CU_K=c["CU_K"],
        LENS_K=c["LENS_K"], qk_scale=P.qk_scale,
        stride_qb=bq[0], stride_qs=bq[1], stride_qh=bq[2], stride_kb=bk[0], stride_ks=bk[1], stride_kh=bk[2],
        stride_vb=bv[0], stride_vs=bv[1], stride_vh=bv[2], stride_ob=bo[0], stride_os=bo[1], stride_oh=bo[2],
        **P.lse_strides(lse), seqlen_q=P.seqlen_q, seqlen_k=c["seqlen_k"], n_kv_heads=P.n_kv, n_batch=P.n_batch,
        group=P.group, n_splits=n_splits, HEAD_DIM=P.head_dim, D_PAD=_d_pad(P.head_dim),
        BLOCK_M=max(cfg.block_m, triton.next_power_of_2(rows)), BLOCK_N=cfg.block_n, CAUSAL=P.causal,
        PACKED=P.packed, VAR_K=P.lens_k is not None, SPLIT=n_splits > 1, DOT_F32=flags["DOT_F32"],
        PRECISION=flags["PRECISION"], SCALE_NEG=P.scale < 0, WIN_LEFT=P.window_left, WIN_RIGHT=P.window_right)
    return Launch("attention_decode", _attn_decode, args, cfg.num_warps, cfg.num_stages,
                  (P.n_batch * P.n_kv * n_splits,))


def reduce_launch(P: Problem, o, lse, o_part, lse_part, n_splits: int) -> Launch:
    bo = P.strides(o)
    args = dict(O_PART=o_part, LSE_PART=lse_part, O=o, LSE=lse, CU=P.cu if P.packed else lse,
                stride_ob=bo[0], stride_os=bo[1], stride_oh=bo[2], **P.lse_strides(lse), seqlen_q=P.seqlen_q,
                n_heads=P.n_heads, n_batch=P.n_batch, n_splits=n_splits, HEAD_DIM=P.head_dim,
                D_PAD=_d_pad(P.head_dim), SPLITS_PAD=max(2, triton.next_power_of_2(n_splits)), PACKED=P.packed,
                WINDOW=P.windowed)
    return Launch("attention_decode_reduce", _attn_decode_reduce, args, 4, 1, (P.n_batch * P.n_heads * P.seqlen_q,))
