"""The forward kernel: o and the log-sum-exp of every query row, one program per (query block, head,
sequence), an online softmax over the key blocks it can see; and its launch."""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import Launch
from .configs import Config
from .problem import Problem
from .tiles import (_LN2, _bounds, _dot_nt, _load, _load_qk, _make_desc, _mm, _positions, _store, _tile_ids,
                    _window_blocks, _window_rows)


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q1, q2, first_m, last_m, lo, hi, L, qk_scale,
                k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                start, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, QK_PAD: tl.constexpr,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr, HAS_POS: tl.constexpr,
                USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, SCALE_NEG: tl.constexpr,
                WARP_SPEC: tl.constexpr, WINDOW: tl.constexpr = False, gap_lo=0, gap_hi=0):
    # Key blocks [lo, hi) of the L keys in the online softmax; row r sees keys up to last_m[r] (CAUSAL),
    # and (WINDOW) from first_m[r] on. WINDOW and MASK: the blocks [gap_lo, gap_hi) are jumped over (the
    # band's inside, which an unmasked loop takes), so that one masked loop walks both of its edges.
    # Scores live in base 2 (qk_scale carries log2(e)).
    dtype = v_base.dtype.element_ty
    if WINDOW and MASK:
        gap = gap_hi - gap_lo
    else:
        gap = 0
    for it in tl.range(lo, hi - gap, BLOCK_N, warp_specialize=WARP_SPEC):
        if WINDOW and MASK:
            n0 = tl.where(it >= gap_lo, it + gap, it)
        else:
            n0 = it
        rows_n = n0 + tl.arange(0, BLOCK_N)
        pos_n = _positions(POS, bid, start, rows_n, L, stride_pb, stride_ps, HAS_POS)
        k1, k2 = _load_qk(k_base, k_desc, n0, rows_n, L, stride_ks, pos_n, COS, SIN, stride_rot,
                          HEAD_DIM, QK_PAD, ROTARY, USE_TMA, DOT_F32)
        qk = _dot_nt(q1, q2, k1, k2, ROTARY, PRECISION)
        # Key 0 of the sequence is visited first and is visible to every row, so m_new is finite.
        if MASK:
            if WARP_SPEC:  # last_m also bounds the sequence
                keep = rows_n[None, :] <= last_m[:, None]
            else:
                keep = rows_n[None, :] < L
                if CAUSAL:
                    keep = keep & (rows_n[None, :] <= last_m[:, None])
                if WINDOW:
                    keep = keep & (rows_n[None, :] >= first_m[:, None])
            s = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if WINDOW:
                # A window may hide every key so far from a row (key 0 is no longer everyone's): its
                # maximum stays -inf, and a finite stand-in keeps p and alpha at 0 instead of NaN.
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(s - m_sub[:, None])
                alpha = tl.math.exp2(m_i - m_sub)
            else:
                p = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
        else:
            # The row maximum is scaled after the reduction, and the scale folds into one FMA per score.
            if SCALE_NEG:
                m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base, v_desc, n0, rows_n, L, stride_vs, HEAD_DIM, D_PAD, USE_TMA, DOT_F32)
        acc = acc * alpha[:, None]
        acc = tl.dot(_mm(p, dtype, DOT_F32), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V,  # inputs: (batch, seq, heads, d) or packed (total, heads, d); unit stride along d
    O,  # output, Q's shape, contiguous
    LSE,  # (batch, n_heads, sq) or packed (n_heads, total_q) fp32: natural log-sum-exp of each row's scores
    CU,  # (n_docs + 1,) int32 document offsets of the queries (PACKED only)
    CU_K,  # (n_docs + 1,) int32 document offsets of the keys (PACKED only; CU itself when they are equal)
    LENS_K,  # (batch,) int32 keys per sequence (VAR_K only)
    COS, SIN,  # (max_pos, d // 2) fp32 rotary tables, unit column stride (ROTARY only)
    POS,  # position ids of the keys, (batch, sk) or (total_k,) (HAS_POS only); queries take the last ones
    qk_scale,  # softmax_scale * log2(e): the softmax runs on exp2
    stride_qb, stride_qs, stride_qh,  # strides of Q in elements; the batch stride is 0 when PACKED
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,  # LSE strides of a sequence and of a head; a row's offset adds its token index
    stride_rot,  # row stride of COS and SIN
    stride_pb, stride_ps,  # POS strides (batch stride 0 when PACKED)
    seqlen_q, seqlen_k,  # batched: the query and key lengths (PACKED: unused, lengths come from CU, CU_K)
    n_heads, n_batch,  # query heads; batch size or number of documents
    group,  # n_heads // n_kv_heads
    HEAD_DIM: tl.constexpr,  # d
    D_PAD: tl.constexpr,  # d rounded up to a power of two (>= 16): the width of v and o tiles
    QK_PAD: tl.constexpr,  # width of q and k tiles: D_PAD, or with ROTARY that of one half (>= 16)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per step; divides BLOCK_M, so the causal diagonal starts on a block
    CAUSAL: tl.constexpr, PACKED: tl.constexpr, ROTARY: tl.constexpr, HAS_POS: tl.constexpr,
    VAR_K: tl.constexpr,  # batched keys counted by LENS_K
    USE_TMA: tl.constexpr,  # tiles through TMA descriptors (sm_90)
    DOT_F32: tl.constexpr,  # interpreter only: bf16 matmul operands upcast to fp32
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent tf32), else unused
    SCALE_NEG: tl.constexpr,  # softmax_scale < 0: the row maximum of the scaled scores is the scaled minimum
    WARP_SPEC: tl.constexpr,  # sm_90, USE_TMA, no ROTARY: the key loop warp-specialized (TMA producer, MMA consumers)
    WIN_LEFT: tl.constexpr = -1,  # local attention: query row r sees keys r + off - WIN_LEFT .. (-1: unbounded)
    WIN_RIGHT: tl.constexpr = -1,  # .. r + off + WIN_RIGHT (-1: unbounded; CAUSAL: -1, the diagonal bounds it)
):
    head, bid, blk = _tile_ids(n_heads, n_batch, CAUSAL)
    start_q, Lq, start_k, Lk = _bounds(CU, CU_K, LENS_K, bid, seqlen_q, seqlen_k, PACKED, VAR_K)
    m0 = blk * BLOCK_M
    if not WARP_SPEC:  # (a warp-specialized loop cannot follow an early return: its block is emptied below)
        if m0 >= Lq:
            return
    off = Lk - Lq  # bottom-right alignment: query row r is key row r + off, and (CAUSAL) sees keys 0 .. r + off
    kvh = head // group
    b64 = bid.to(tl.int64)
    q_base = Q + b64 * stride_qb + start_q * stride_qs + head.to(tl.int64) * stride_qh
    k_base = K + b64 * stride_kb + start_k * stride_ks + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + start_k * stride_vs + kvh.to(tl.int64) * stride_vh
    rows_m = m0 + tl.arange(0, BLOCK_M)
    pos_m = _positions(POS, bid, start_k, rows_m + off, Lk, stride_pb, stride_ps, HAS_POS)
    q_desc = _make_desc(q_base, Lq, HEAD_DIM, stride_qs, BLOCK_M, QK_PAD, USE_TMA)
    q1, q2 = _load_qk(q_base, q_desc, m0, rows_m, Lq, stride_qs, pos_m, COS, SIN, stride_rot,
                      HEAD_DIM, QK_PAD, ROTARY, USE_TMA, DOT_F32)
    k_desc = _make_desc(k_base, Lk, HEAD_DIM, stride_ks, BLOCK_N, QK_PAD, USE_TMA)
    v_desc = _make_desc(v_base, Lk, HEAD_DIM, stride_vs, BLOCK_N, D_PAD, USE_TMA)

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    WINDOW: tl.constexpr = WIN_LEFT >= 0 or WIN_RIGHT >= 0
    if WINDOW:
        # Local attention: only the key blocks that meet the block's band are visited. First those
        # every row sees in full, unmasked; then one masked loop over the band's two edges.
        lo, a, b, hi = _window_blocks(m0, Lq, Lk, off, BLOCK_M, BLOCK_N, CAUSAL, WIN_LEFT, WIN_RIGHT)
        first, last = _window_rows(rows_m + off, WIN_LEFT, WIN_RIGHT)
        UPPER: tl.constexpr = CAUSAL or WIN_RIGHT >= 0
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q1, q2, first, last, a, b, Lk, qk_scale,
                                    k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                    start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                    BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, False, UPPER, ROTARY, HAS_POS, USE_TMA,
                                    DOT_F32, PRECISION, SCALE_NEG, False, True)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q1, q2, first, last, lo, hi, Lk, qk_scale,
                                    k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                    start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                    BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, True, UPPER, ROTARY, HAS_POS, USE_TMA,
                                    DOT_F32, PRECISION, SCALE_NEG, False, True, a, b)
        # a row that sees no key (more queries than keys) gets o = 0 and lse = -inf, as FlashAttention
        l_i = tl.where(l_i > 0, l_i, 1.0)
    else:
        if CAUSAL:
            # every key block up to the block's first row's last key is visible to all its rows
            full_end = ((m0 + off + 1) // BLOCK_N) * BLOCK_N
            hi = tl.minimum(m0 + BLOCK_M + off, Lk)
        else:
            full_end = (Lk // BLOCK_N) * BLOCK_N
            hi = Lk
        if WARP_SPEC:
            # Triton's Hopper warp specialization takes one loop per kernel: every key block goes through
            # the masked step, with the sequence end folded into each row's last key (one compare per
            # score). Key 0 is visible to every row, so the maxima stay finite.
            last = tl.zeros([BLOCK_M], tl.int32) + (Lk - 1)
            if CAUSAL:
                last = tl.minimum(rows_m + off, last)
            hi = tl.where(m0 < Lq, hi, 0)
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q1, q2, last, last, 0, hi, Lk, qk_scale,
                                        k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                        start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                        BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, True, CAUSAL, ROTARY, HAS_POS, USE_TMA,
                                        DOT_F32, PRECISION, SCALE_NEG, True)
        else:
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q1, q2, rows_m, rows_m + off, 0, full_end, Lk, qk_scale,
                                        k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                        start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                        BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, False, CAUSAL, ROTARY, HAS_POS, USE_TMA,
                                        DOT_F32, PRECISION, SCALE_NEG, False)
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q1, q2, rows_m, rows_m + off, full_end, hi, Lk, qk_scale,
                                        k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                        start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                        BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, True, CAUSAL, ROTARY, HAS_POS, USE_TMA,
                                        DOT_F32, PRECISION, SCALE_NEG, False)
    if WARP_SPEC:  # an emptied program (past its document's end) has l_i = 0 and stores nothing
        l_i = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_i[:, None]
    o_base = O + b64 * stride_ob + start_q * stride_os + head.to(tl.int64) * stride_oh
    _store(o_base, rows_m, Lq, stride_os, o, HEAD_DIM, D_PAD)
    lse_base = LSE + b64 * stride_lb + head.to(tl.int64) * stride_lh + start_q
    tl.store(lse_base + rows_m, (m_i + tl.math.log2(l_i)) * _LN2, mask=rows_m < Lq)


# ---------------------------------------------------------------------------- launch
# One launch builder per kernel (here and beside each kernel), used by the run-time path and by
# static_launches() alike.
def _fwd_args(P: Problem, q, k, v, o, lse, cfg: Config, flags: dict) -> dict:
    bq, bk, bv, bo = P.strides(q), P.strides(k), P.strides(v), P.strides(o)
    return dict(
        Q=q, K=k, V=v, O=o, LSE=lse, **P.kernel_args(q), qk_scale=P.qk_scale,
        stride_qb=bq[0], stride_qs=bq[1], stride_qh=bq[2], stride_kb=bk[0], stride_ks=bk[1], stride_kh=bk[2],
        stride_vb=bv[0], stride_vs=bv[1], stride_vh=bv[2], stride_ob=bo[0], stride_os=bo[1], stride_oh=bo[2],
        **P.lse_strides(lse), n_heads=P.n_heads, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SCALE_NEG=P.scale < 0,
        WARP_SPEC=cfg.warp_spec, **flags)


def fwd_launch(P: Problem, q, k, v, o, lse, cfg: Config, flags: dict) -> Launch:
    return Launch("attention_fwd", _attn_fwd, _fwd_args(P, q, k, v, o, lse, cfg, flags), cfg.num_warps,
                  cfg.num_stages, P.grid(P.seqlen_q, cfg.block_m, P.n_heads))
