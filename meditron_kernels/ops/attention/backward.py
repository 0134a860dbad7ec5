"""The backward kernels: _attn_bwd_dq (delta, and dq), then _attn_bwd_dkdv (dk and dv), and for the
warp-specialized candidates a first statistics pass, _attn_bwd_stats; and their launches."""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import Launch
from .configs import Config
from .problem import Problem
from .tiles import (_LOG2E, _bounds, _d_pad, _doc_bounds, _dot_nt, _load, _load_qk, _make_desc, _mm, _positions,
                    _store, _store_qk_grad, _tile_ids, _window_blocks, _window_rows)


# ---------------------------------------------------------------------------- statistics for TMA
@triton.jit
def _stats_desc(STATS, bid, stride_sb, stride_st, n_rows, BLOCK: tl.constexpr, PACKED: tl.constexpr,
                ROWS: tl.constexpr):
    # TMA descriptor over n_rows rows (ROWS; else a 1-D one over the first row) of _attn_bwd_stats's
    # output for sequence bid (the whole pack when PACKED), BLOCK tokens at a time.
    base = STATS
    if not PACKED:
        base += bid.to(tl.int64) * stride_sb
    if not ROWS:
        desc = tl.make_tensor_descriptor(base, shape=[stride_st], strides=[1], block_shape=[BLOCK])
    else:
        desc = tl.make_tensor_descriptor(base, shape=[n_rows, stride_st], strides=[stride_st, 1],
                                         block_shape=[1, BLOCK])
    return desc


@triton.jit
def _stats_col(CU_ST, bid, PACKED: tl.constexpr):
    # column of sequence bid's first token in STATS: 0, or PACKED its document's offset rounded to
    # 16 bytes (a TMA box starts on a 16-byte boundary)
    if PACKED:
        col = tl.load(CU_ST + bid)
    else:
        col = bid * 0
    return col


@triton.jit
def _load_stat(desc, row, col, ok, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    # BLOCK statistics of one row (ROWS: of a 2-D descriptor) from column col on; zero where not ok
    # (past the document, where the buffer holds the next document's values or padding)
    if ROWS:
        x = tl.reshape(desc.load([row, col.to(tl.int32)]), [BLOCK])
    else:
        x = desc.load([col.to(tl.int32)])
    return tl.where(ok, x, 0.0)


# ---------------------------------------------------------------------------- backward: delta and dq
@triton.jit
def _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, first_m, last_m, lo, hi, L, qk_scale,
               k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
               start, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, QK_PAD: tl.constexpr,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr, HAS_POS: tl.constexpr,
               USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr,
               WINDOW: tl.constexpr = False):
    # (WINDOW: row r also sees no key before first_m[r])
    dtype = v_base.dtype.element_ty
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        rows_n = n0 + tl.arange(0, BLOCK_N)
        pos_n = _positions(POS, bid, start, rows_n, L, stride_pb, stride_ps, HAS_POS)
        k1, k2 = _load_qk(k_base, k_desc, n0, rows_n, L, stride_ks, pos_n, COS, SIN, stride_rot,
                          HEAD_DIM, QK_PAD, ROTARY, USE_TMA, DOT_F32)
        v = _load(v_base, v_desc, n0, rows_n, L, stride_vs, HEAD_DIM, D_PAD, USE_TMA, DOT_F32)
        s = _dot_nt(q1, q2, k1, k2, ROTARY, PRECISION) * qk_scale
        if MASK:
            if WARP_SPEC:  # last_m also bounds the sequence
                keep = rows_n[None, :] <= last_m[:, None]
            else:
                keep = rows_n[None, :] < L
                if CAUSAL:
                    keep = keep & (rows_n[None, :] <= last_m[:, None])
                if WINDOW:
                    keep = keep & (rows_n[None, :] >= first_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = _mm(p * (dp - delta[:, None]), dtype, DOT_F32)
        dq1 = tl.dot(ds, k1, dq1, input_precision=PRECISION)
        if ROTARY:
            dq2 = tl.dot(ds, k2, dq2, input_precision=PRECISION)
    return dq1, dq2


@triton.jit
def _attn_bwd_stats(
    O, DO, LSE, DLSE,  # as in _attn_bwd_dq
    DELTA,  # out: as in _attn_bwd_dq
    STATS,  # out: (n_batch, 2 * n_heads, stride_st) fp32, or (1, ...) PACKED: row 2 h is head h's lse * log2(e),
    #         row 2 h + 1 its delta, by token; rows padded to a multiple of 16 bytes for TMA
    CU,  # as in _attn_fwd
    CU_ST,  # PACKED: (n_docs,) int32 column of each document's first token in STATS, a multiple of 4
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, stride_sb, stride_st,
    seqlen_q, n_heads, n_batch,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, PACKED: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    # The warp-specialized backward's first pass: its dq loop cannot take delta from a reduction in the
    # same kernel, so delta (and the scaled lse) are written here for both kernels to read through TMA.
    head, bid, blk = _tile_ids(n_heads, n_batch, False)
    start_q, Lq = _doc_bounds(CU, bid, seqlen_q, PACKED)
    m0 = blk * BLOCK_M
    if m0 >= Lq:
        return
    b64 = bid.to(tl.int64)
    h64 = head.to(tl.int64)
    rows_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows_m < Lq
    o_base = O + b64 * stride_ob + start_q * stride_os + h64 * stride_oh
    do_base = DO + b64 * stride_dob + start_q * stride_dos + h64 * stride_doh
    o = _load(o_base, o_base, m0, rows_m, Lq, stride_os, HEAD_DIM, D_PAD, False, False)
    do = _load(do_base, do_base, m0, rows_m, Lq, stride_dos, HEAD_DIM, D_PAD, False, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stat = b64 * stride_lb + h64 * stride_lh + start_q + rows_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + stat, mask=row_ok, other=0.0)
    tl.store(DELTA + stat, delta, mask=row_ok)
    row = STATS + 2 * h64 * stride_st + _stats_col(CU_ST, bid, PACKED) + rows_m
    if not PACKED:
        row += b64 * stride_sb
    tl.store(row, tl.load(LSE + stat, mask=row_ok, other=0.0) * _LOG2E, mask=row_ok)
    tl.store(row + stride_st, delta, mask=row_ok)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, O, DO,  # forward inputs, output and its gradient (DO: unit stride along d)
    LSE,  # forward log-sum-exp
    DLSE,  # gradient of the log-sum-exp, LSE's layout (HAS_DLSE only)
    DELTA,  # out: rowsum(o * do) - dlse in fp32, LSE's layout, read by _attn_bwd_dkdv
    DQ,  # out: gradient of q, Q's shape, contiguous
    QROT,  # out (ROTARY only): the rotated queries, DQ's shape and strides, for _attn_bwd_dkdv
    STATS, CU_ST,  # WARP_SPEC only: as in _attn_bwd_stats, which wrote them; read instead of LSE, DLSE, O
    CU, CU_K, LENS_K, COS, SIN, POS,  # as in _attn_fwd
    qk_scale,  # softmax_scale * log2(e)
    sm_scale,  # softmax_scale: the chain-rule factor of dq
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,  # shared by LSE, DLSE and DELTA
    stride_sb, stride_st,  # STATS strides of a sequence and of a row
    stride_rot, stride_pb, stride_ps,
    seqlen_q, seqlen_k, n_heads, n_batch, group,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, QK_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PACKED: tl.constexpr, ROTARY: tl.constexpr,
    HAS_POS: tl.constexpr, VAR_K: tl.constexpr, HAS_DLSE: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    WARP_SPEC: tl.constexpr,  # as in _attn_fwd
    WIN_LEFT: tl.constexpr = -1, WIN_RIGHT: tl.constexpr = -1,  # as in _attn_fwd
):
    head, bid, blk = _tile_ids(n_heads, n_batch, CAUSAL)
    start_q, Lq, start_k, Lk = _bounds(CU, CU_K, LENS_K, bid, seqlen_q, seqlen_k, PACKED, VAR_K)
    m0 = blk * BLOCK_M
    if not WARP_SPEC:  # as in _attn_fwd
        if m0 >= Lq:
            return
    off = Lk - Lq
    kvh = head // group
    b64 = bid.to(tl.int64)
    h64 = head.to(tl.int64)
    q_base = Q + b64 * stride_qb + start_q * stride_qs + h64 * stride_qh
    k_base = K + b64 * stride_kb + start_k * stride_ks + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + start_k * stride_vs + kvh.to(tl.int64) * stride_vh
    o_base = O + b64 * stride_ob + start_q * stride_os + h64 * stride_oh
    do_base = DO + b64 * stride_dob + start_q * stride_dos + h64 * stride_doh
    rows_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows_m < Lq

    pos_m = _positions(POS, bid, start_k, rows_m + off, Lk, stride_pb, stride_ps, HAS_POS)
    if WARP_SPEC:
        # Everything the loop reads comes through TMA (the statistics too): a warp-specialized loop
        # takes no value from a pointer load or a reduction.
        # (1-D descriptors: the consumers split the rows, and a [1, BLOCK_M] box would not split with them)
        lse_desc = _stats_desc(STATS + 2 * h64 * stride_st, bid, stride_sb, stride_st, 1, BLOCK_M, PACKED, False)
        delta_desc = _stats_desc(STATS + (2 * h64 + 1) * stride_st, bid, stride_sb, stride_st, 1, BLOCK_M, PACKED,
                                 False)
        col = _stats_col(CU_ST, bid, PACKED) + m0
        lse2 = _load_stat(lse_desc, 0, col, row_ok, BLOCK_M, False)
        delta = _load_stat(delta_desc, 0, col, row_ok, BLOCK_M, False)
        do = _load(do_base, _make_desc(do_base, Lq, HEAD_DIM, stride_dos, BLOCK_M, D_PAD, True), m0, rows_m, Lq,
                   stride_dos, HEAD_DIM, D_PAD, True, DOT_F32)
        q1, q2 = _load_qk(q_base, _make_desc(q_base, Lq, HEAD_DIM, stride_qs, BLOCK_M, QK_PAD, True), m0, rows_m,
                          Lq, stride_qs, pos_m, COS, SIN, stride_rot, HEAD_DIM, QK_PAD, ROTARY, True, DOT_F32)
    else:
        do = _load(do_base, do_base, m0, rows_m, Lq, stride_dos, HEAD_DIM, D_PAD, False, False)
        o = _load(o_base, o_base, m0, rows_m, Lq, stride_os, HEAD_DIM, D_PAD, False, False)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        stat = b64 * stride_lb + h64 * stride_lh + start_q + rows_m
        if HAS_DLSE:
            # d lse / d s = p: a log-sum-exp gradient enters every score's gradient as -dlse * p, exactly
            # where -delta * p does
            delta -= tl.load(DLSE + stat, mask=row_ok, other=0.0)
        tl.store(DELTA + stat, delta, mask=row_ok)
        lse2 = tl.load(LSE + stat, mask=row_ok, other=0.0) * _LOG2E
        if DOT_F32:
            do = do.to(tl.float32)
        q1, q2 = _load_qk(q_base, q_base, m0, rows_m, Lq, stride_qs, pos_m, COS, SIN, stride_rot,
                          HEAD_DIM, QK_PAD, ROTARY, False, DOT_F32)
    dq_base = DQ + b64 * stride_dqb + start_q * stride_dqs + h64 * stride_dqh
    if ROTARY:
        # Rotated once here, so that the dk/dv kernel streams them instead of rotating each tile
        # group * (seq / BLOCK_N) times.
        qrot_base = QROT + b64 * stride_dqb + start_q * stride_dqs + h64 * stride_dqh
        _store(qrot_base, rows_m, Lq, stride_dqs, q1, HEAD_DIM // 2, QK_PAD)
        _store(qrot_base + HEAD_DIM // 2, rows_m, Lq, stride_dqs, q2, HEAD_DIM // 2, QK_PAD)
    k_desc = _make_desc(k_base, Lk, HEAD_DIM, stride_ks, BLOCK_N, QK_PAD, USE_TMA)
    v_desc = _make_desc(v_base, Lk, HEAD_DIM, stride_vs, BLOCK_N, D_PAD, USE_TMA)

    dq1 = tl.zeros([BLOCK_M, QK_PAD], dtype=tl.float32)
    if ROTARY:
        dq2 = tl.zeros([BLOCK_M, QK_PAD], dtype=tl.float32)
    else:
        dq2 = tl.zeros([1], dtype=tl.float32)  # unused
    WINDOW: tl.constexpr = WIN_LEFT >= 0 or WIN_RIGHT >= 0
    if WINDOW:
        # the key blocks of the forward's band, masked at its edges (as in _attn_fwd); a row that sees
        # no key has lse = -inf, and every score of it is masked: its p is exp2(-inf - 0) = 0
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
        lo, a, b, hi = _window_blocks(m0, Lq, Lk, off, BLOCK_M, BLOCK_N, CAUSAL, WIN_LEFT, WIN_RIGHT)
        first, last = _window_rows(rows_m + off, WIN_LEFT, WIN_RIGHT)
        UPPER: tl.constexpr = CAUSAL or WIN_RIGHT >= 0
        dq1, dq2 = _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, first, last, lo, a, Lk, qk_scale,
                              k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                              start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                              BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, True, UPPER, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                              PRECISION, False, True)
        dq1, dq2 = _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, first, last, a, b, Lk, qk_scale,
                              k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                              start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                              BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, False, UPPER, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                              PRECISION, False, True)
        dq1, dq2 = _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, first, last, b, hi, Lk, qk_scale,
                              k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                              start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                              BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, True, UPPER, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                              PRECISION, False, True)
    else:
        if CAUSAL:
            full_end = ((m0 + off + 1) // BLOCK_N) * BLOCK_N
            hi = tl.minimum(m0 + BLOCK_M + off, Lk)
        else:
            full_end = (Lk // BLOCK_N) * BLOCK_N
            hi = Lk
        if WARP_SPEC:  # one masked loop, as in _attn_fwd
            last = tl.zeros([BLOCK_M], tl.int32) + (Lk - 1)
            if CAUSAL:
                last = tl.minimum(rows_m + off, last)
            hi = tl.where(m0 < Lq, hi, 0)
            dq1, dq2 = _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, last, last, 0, hi, Lk, qk_scale,
                                  k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                  start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                  BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, True, CAUSAL, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                                  PRECISION, True)
        else:
            dq1, dq2 = _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, rows_m, rows_m + off, 0, full_end, Lk, qk_scale,
                                  k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                  start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                  BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, False, CAUSAL, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                                  PRECISION, False)
            dq1, dq2 = _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, rows_m, rows_m + off, full_end, hi, Lk, qk_scale,
                                  k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                  start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                  BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, True, CAUSAL, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                                  PRECISION, False)
    _store_qk_grad(dq_base, rows_m, Lq, stride_dqs, dq1 * sm_scale, dq2 * sm_scale, pos_m, COS, SIN, stride_rot,
                   HEAD_DIM, QK_PAD, ROTARY)


# ---------------------------------------------------------------------------- backward: dk and dv
@triton.jit
def _dkdv_blocks(dk1, dk2, dv, k1, k2, v, rows_n, off, lo, hi, L, qk_scale,
                 q_base, q_desc, stride_qs, do_base, do_desc, stride_dos, lse_base, delta_base,
                 start, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, QK_PAD: tl.constexpr,
                 MASK: tl.constexpr, ROTARY: tl.constexpr, HAS_POS: tl.constexpr, USE_TMA: tl.constexpr,
                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr, WIN_LEFT: tl.constexpr = -1,
                 WIN_RIGHT: tl.constexpr = -1, UPPER: tl.constexpr = True):
    # Query blocks [lo, hi) of the L queries against one key block, transposed (keys on rows) so that
    # dk and dv accumulate without a transpose. Query rows past L load as zeros (q, do, lse, delta),
    # which makes their contribution exactly zero: only the causal diagonal needs a mask (query row r
    # sees keys up to r + off). With ROTARY, q_base points at the queries _attn_bwd_dq already
    # rotated: no rotation in this loop. With a window (WIN_LEFT, WIN_RIGHT as in _attn_fwd; UPPER: a
    # right bound, causal or WIN_RIGHT) the mask is the band's, and a query row that sees no key
    # (lse = -inf) has every score masked: its pt is exp2(-inf - 0) = 0.
    WINDOW: tl.constexpr = WIN_LEFT >= 0 or WIN_RIGHT >= 0
    dtype = q_base.dtype.element_ty
    for m0 in range(lo, hi, BLOCK_M):
        rows_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows_m < L
        q1, q2 = _load_qk(q_base, q_desc, m0, rows_m, L, stride_qs, rows_m, COS, SIN, stride_rot,
                          HEAD_DIM, QK_PAD, ROTARY, USE_TMA, DOT_F32, False)
        do = _load(do_base, do_desc, m0, rows_m, L, stride_dos, HEAD_DIM, D_PAD, USE_TMA, DOT_F32)
        lse2 = tl.load(lse_base + rows_m, mask=row_ok, other=0.0) * _LOG2E
        delta = tl.load(delta_base + rows_m, mask=row_ok, other=0.0)
        st = _dot_nt(k1, k2, q1, q2, ROTARY, PRECISION) * qk_scale
        if WINDOW:
            lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
            if MASK:
                first, last = _window_rows(rows_m + off, WIN_LEFT, WIN_RIGHT)
                keep = rows_n[:, None] >= first[None, :]
                if UPPER:
                    keep = keep & (rows_n[:, None] <= last[None, :])
                st = tl.where(keep, st, float("-inf"))
        elif MASK:
            st = tl.where(rows_m[None, :] + off >= rows_n[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - lse2[None, :])
        dv = tl.dot(_mm(pt, dtype, DOT_F32), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = _mm(pt * (dpt - delta[None, :]), dtype, DOT_F32)
        dk1 = tl.dot(dst, q1, dk1, input_precision=PRECISION)
        if ROTARY:
            dk2 = tl.dot(dst, q2, dk2, input_precision=PRECISION)
    return dk1, dk2, dv


@triton.jit
def _dkdv_blocks_ws(dk, dv, k, v, rows_n, off, lo, n_blk, L, qk_scale, q_desc, do_desc, st_desc, head0, group,
                    start, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                    DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    # _dkdv_blocks for WARP_SPEC: the group's query heads and their blocks [lo, L) in one loop (Triton's
    # Hopper warp specialization takes one loop per kernel), every step masked; q and do tiles of head
    # head0 + g sit at column (head0 + g) * HEAD_DIM of descriptors spanning every head of a token.
    for it in tl.range(0, n_blk * group, warp_specialize=True):
        g = it // n_blk
        m0 = lo + (it % n_blk) * BLOCK_M
        h = head0 + g
        rows_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows_m < L
        q = q_desc.load([m0, h * HEAD_DIM])
        do = do_desc.load([m0, h * HEAD_DIM])
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = _load_stat(st_desc, 2 * h, start + m0, row_ok, BLOCK_M, True)
        delta = _load_stat(st_desc, 2 * h + 1, start + m0, row_ok, BLOCK_M, True)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if CAUSAL:
            st = tl.where(rows_m[None, :] + off >= rows_n[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - lse2[None, :])
        dv = tl.dot(_mm(pt, DTYPE, DOT_F32), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = _mm(pt * (dpt - delta[None, :]), DTYPE, DOT_F32)
        dk = tl.dot(dst, q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,  # queries; with ROTARY, the rotated ones _attn_bwd_dq wrote (QROT)
    K, V, DO,  # forward keys and values, and the output gradient
    LSE, DELTA,  # forward log-sum-exp and _attn_bwd_dq's rowsum(o * do) - dlse, same layout
    DK, DV,  # out: gradients of k and v, K's shape, contiguous
    STATS, CU_ST,  # WARP_SPEC only: as in _attn_bwd_dq, read instead of LSE and DELTA
    CU, CU_K, LENS_K, COS, SIN, POS,  # as in _attn_fwd
    qk_scale, sm_scale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,  # shared by DK and DV (both contiguous, same shape)
    stride_lb, stride_lh,
    stride_sb, stride_st,  # as in _attn_bwd_dq
    stride_rot, stride_pb, stride_ps,
    seqlen_q, seqlen_k, n_kv_heads, n_batch, group,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, QK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step
    BLOCK_N: tl.constexpr,  # key rows per program
    CAUSAL: tl.constexpr, PACKED: tl.constexpr, ROTARY: tl.constexpr, HAS_POS: tl.constexpr,
    VAR_K: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    WARP_SPEC: tl.constexpr,  # as in _attn_fwd; also needs each token's heads side by side (stride_qh == HEAD_DIM)
    WIN_LEFT: tl.constexpr = -1, WIN_RIGHT: tl.constexpr = -1,  # as in _attn_fwd
):
    # Causal: the first key blocks carry the most work, and they come first in the flat grid.
    kvh, bid, blk = _tile_ids(n_kv_heads, n_batch, False)
    start_q, Lq, start_k, Lk = _bounds(CU, CU_K, LENS_K, bid, seqlen_q, seqlen_k, PACKED, VAR_K)
    n0 = blk * BLOCK_N
    if not WARP_SPEC:  # as in _attn_fwd
        if n0 >= Lk:
            return
    off = Lk - Lq
    b64 = bid.to(tl.int64)
    rows_n = n0 + tl.arange(0, BLOCK_N)
    k_base = K + b64 * stride_kb + start_k * stride_ks + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + start_k * stride_vs + kvh.to(tl.int64) * stride_vh
    pos_n = _positions(POS, bid, start_k, rows_n, Lk, stride_pb, stride_ps, HAS_POS)
    if WARP_SPEC:
        k1 = _load(k_base, _make_desc(k_base, Lk, HEAD_DIM, stride_ks, BLOCK_N, QK_PAD, True), n0, rows_n, Lk,
                   stride_ks, HEAD_DIM, QK_PAD, True, DOT_F32)
        k2 = k1
        v = _load(v_base, _make_desc(v_base, Lk, HEAD_DIM, stride_vs, BLOCK_N, D_PAD, True), n0, rows_n, Lk,
                  stride_vs, HEAD_DIM, D_PAD, True, DOT_F32)
    else:
        # the program's one key tile is rotated here (the query tiles it streams come rotated)
        k1, k2 = _load_qk(k_base, k_base, n0, rows_n, Lk, stride_ks, pos_n, COS, SIN, stride_rot,
                          HEAD_DIM, QK_PAD, ROTARY, False, DOT_F32)
        v = _load(v_base, v_base, n0, rows_n, Lk, stride_vs, HEAD_DIM, D_PAD, False, DOT_F32)

    dk1 = tl.zeros([BLOCK_N, QK_PAD], dtype=tl.float32)
    if ROTARY:
        dk2 = tl.zeros([BLOCK_N, QK_PAD], dtype=tl.float32)
    else:
        dk2 = tl.zeros([1], dtype=tl.float32)  # unused
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    if CAUSAL:
        # first query block that sees any of these keys; from `mid` on, every query sees all of them
        lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M, Lq)
    else:
        lo = 0
        mid = 0
    if WARP_SPEC:
        n_heads = n_kv_heads * group
        q_desc = tl.make_tensor_descriptor(Q + b64 * stride_qb + start_q * stride_qs, shape=[Lq, n_heads * HEAD_DIM],
                                           strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM])
        do_desc = tl.make_tensor_descriptor(DO + b64 * stride_dob + start_q * stride_dos,
                                            shape=[Lq, n_heads * HEAD_DIM], strides=[stride_dos, 1],
                                            block_shape=[BLOCK_M, HEAD_DIM])
        st_desc = _stats_desc(STATS, bid, stride_sb, stride_st, 2 * n_heads, BLOCK_M, PACKED, True)
        n_blk = tl.where(n0 < Lk, tl.cdiv(Lq - lo, BLOCK_M), 0)
        dk1, dv = _dkdv_blocks_ws(dk1, dv, k1, v, rows_n, off, lo, n_blk, Lq, qk_scale, q_desc, do_desc, st_desc,
                                  kvh * group, group, _stats_col(CU_ST, bid, PACKED), DK.dtype.element_ty, BLOCK_M,
                                  HEAD_DIM, CAUSAL,
                                  DOT_F32, PRECISION)
    elif WIN_LEFT >= 0 or WIN_RIGHT >= 0:
        # Local attention: only the query blocks whose band meets this key block, masked at its edges.
        # Key j is seen by query rows j - off - right .. j - off + left: the forward's band transposed.
        if CAUSAL:
            lo, a, b, hi = _window_blocks(n0, Lk, Lq, -off, BLOCK_N, BLOCK_M, False, 0, WIN_LEFT)
        else:
            lo, a, b, hi = _window_blocks(n0, Lk, Lq, -off, BLOCK_N, BLOCK_M, False, WIN_RIGHT, WIN_LEFT)
        UPPER: tl.constexpr = CAUSAL or WIN_RIGHT >= 0
        for g in range(group):
            h64 = (kvh * group + g).to(tl.int64)
            q_base = Q + b64 * stride_qb + start_q * stride_qs + h64 * stride_qh
            do_base = DO + b64 * stride_dob + start_q * stride_dos + h64 * stride_doh
            lse_base = LSE + b64 * stride_lb + h64 * stride_lh + start_q
            delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + start_q
            q_desc = _make_desc(q_base, Lq, HEAD_DIM, stride_qs, BLOCK_M, QK_PAD, USE_TMA)
            do_desc = _make_desc(do_base, Lq, HEAD_DIM, stride_dos, BLOCK_M, D_PAD, USE_TMA)
            # the band's leading edge (masked), its inside, its trailing edge (masked)
            dk1, dk2, dv = _dkdv_blocks(dk1, dk2, dv, k1, k2, v, rows_n, off, lo, a, Lq, qk_scale,
                                        q_base, q_desc, stride_qs, do_base, do_desc, stride_dos, lse_base, delta_base,
                                        start_q, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                        BLOCK_M, HEAD_DIM, D_PAD, QK_PAD, True, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                                        PRECISION, WIN_LEFT, WIN_RIGHT, UPPER)
            dk1, dk2, dv = _dkdv_blocks(dk1, dk2, dv, k1, k2, v, rows_n, off, a, b, Lq, qk_scale,
                                        q_base, q_desc, stride_qs, do_base, do_desc, stride_dos, lse_base, delta_base,
                                        start_q, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                        BLOCK_M, HEAD_DIM, D_PAD, QK_PAD, False, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                                        PRECISION, WIN_LEFT, WIN_RIGHT, UPPER)
            dk1, dk2, dv = _dkdv_blocks(dk1, dk2, dv, k1, k2, v, rows_n, off, b, hi, Lq, qk_scale,
                                        q_base, q_desc, stride_qs, do_base, do_desc, stride_dos, lse_base, delta_base,
                                        start_q, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                        BLOCK_M, HEAD_DIM, D_PAD, QK_PAD, True, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                                        PRECISION, WIN_LEFT, WIN_RIGHT, UPPER)
    else:
        for g in range(group):
            h64 = (kvh * group + g).to(tl.int64)
            q_base = Q + b64 * stride_qb + start_q * stride_qs + h64 * stride_qh
            do_base = DO + b64 * stride_dob + start_q * stride_dos + h64 * stride_doh
            lse_base = LSE + b64 * stride_lb + h64 * stride_lh + start_q
            delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + start_q
            q_desc = _make_desc(q_base, Lq, HEAD_DIM, stride_qs, BLOCK_M, QK_PAD, USE_TMA)
            do_desc = _make_desc(do_base, Lq, HEAD_DIM, stride_dos, BLOCK_M, D_PAD, USE_TMA)
            dk1, dk2, dv = _dkdv_blocks(dk1, dk2, dv, k1, k2, v, rows_n, off, lo, mid, Lq, qk_scale,
                                        q_base, q_desc, stride_qs, do_base, do_desc, stride_dos, lse_base, delta_base,
                                        start_q, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                        BLOCK_M, HEAD_DIM, D_PAD, QK_PAD, True, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                                        PRECISION)
            dk1, dk2, dv = _dkdv_blocks(dk1, dk2, dv, k1, k2, v, rows_n, off, mid, Lq, Lq, qk_scale,
                                        q_base, q_desc, stride_qs, do_base, do_desc, stride_dos, lse_base, delta_base,
                                        start_q, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                        BLOCK_M, HEAD_DIM, D_PAD, QK_PAD, False, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                                        PRECISION)
    dk_base = DK + b64 * stride_dkb + start_k * stride_dks + kvh.to(tl.int64) * stride_dkh
    dv_base = DV + b64 * stride_dkb + start_k * stride_dks + kvh.to(tl.int64) * stride_dkh
    _store_qk_grad(dk_base, rows_n, Lk, stride_dks, dk1 * sm_scale, dk2 * sm_scale, pos_n, COS, SIN, stride_rot,
                   HEAD_DIM, QK_PAD, ROTARY)
    _store(dv_base, rows_n, Lk, stride_dks, dv, HEAD_DIM, D_PAD)


# ---------------------------------------------------------------------------- launches
def _bwd_args(P: Problem, q, k, v, do, lse, delta, cfg: Config, flags: dict, stats=None, cu_st=None) -> dict:
    bq, bk, bv, bdo = P.strides(q), P.strides(k), P.strides(v), P.strides(do)
    st = stats if stats is not None else lse
    return dict(
        Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, STATS=st, CU_ST=cu_st if cu_st is not None else lse,
        stride_sb=st.stride(0) if stats is not None else 0,
        stride_st=st.stride(1) if stats is not None else 0, **P.kernel_args(q), qk_scale=P.qk_scale, sm_scale=P.scale,
        stride_qb=bq[0], stride_qs=bq[1], stride_qh=bq[2], stride_kb=bk[0], stride_ks=bk[1], stride_kh=bk[2],
        stride_vb=bv[0], stride_vs=bv[1], stride_vh=bv[2], stride_dob=bdo[0], stride_dos=bdo[1], stride_doh=bdo[2],
        **P.lse_strides(lse), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, WARP_SPEC=cfg.warp_spec, **flags)


def dq_launch(P: Problem, q, k, v, o, do, lse, delta, dq, qrot, dlse, cfg: Config, flags: dict, stats=None,
              cu_st=None) -> Launch:
    """delta (lse's layout) and qrot (q rotated, for the dk/dv kernel; dq itself without rotary) are written.
    stats, cu_st: what _attn_bwd_stats wrote, for a warp-specialized cfg."""
    bo, bdq = P.strides(o), P.strides(dq)
    args = dict(_bwd_args(P, q, k, v, do, lse, delta, cfg, flags, stats, cu_st), O=o, DQ=dq, QROT=qrot,
                DLSE=dlse if dlse is not None else lse, HAS_DLSE=dlse is not None,
                stride_ob=bo[0], stride_os=bo[1], stride_oh=bo[2], stride_dqb=bdq[0], stride_dqs=bdq[1],
                stride_dqh=bdq[2], n_heads=P.n_heads)
    return Launch("attention_bwd_dq", _attn_bwd_dq, args, cfg.num_warps, cfg.num_stages,
                  P.grid(P.seqlen_q, cfg.block_m, P.n_heads))


def dkdv_launch(P: Problem, q, k, v, do, lse, delta, dk, dv, cfg: Config, flags: dict, stats=None,
                cu_st=None) -> Launch:
    """q: the rotated q the dq kernel wrote when rotary, else q itself; delta from the dq kernel (or the
    statistics pass)."""
    bdk = P.strides(dk)
    args = dict(_bwd_args(P, q, k, v, do, lse, delta, cfg, flags, stats, cu_st), DK=dk, DV=dv,
                stride_dkb=bdk[0], stride_dks=bdk[1], stride_dkh=bdk[2], n_kv_heads=P.n_kv)
    return Launch("attention_bwd_dkdv", _attn_bwd_dkdv, args, cfg.num_warps, cfg.num_stages,
                  P.grid(P.seqlen_k, cfg.block_n, P.n_kv))


def stats_launch(P: Problem, o, do, lse, dlse, delta, stats, cu_st) -> Launch:
    """The warp-specialized backward's first pass: delta, and the scaled lse and delta laid out for TMA
    in stats ((n_seq, 2 * n_heads, tokens); packed documents start on a multiple of 4 columns, cu_st)."""
    bo, bdo = P.strides(o), P.strides(do)
    block = 64
    args = dict(O=o, DO=do, LSE=lse, DLSE=dlse if dlse is not None else lse, DELTA=delta, STATS=stats,
                CU=P.cu if P.packed else lse, CU_ST=cu_st if P.packed else lse, stride_ob=bo[0], stride_os=bo[1],
                stride_oh=bo[2], stride_dob=bdo[0], stride_dos=bdo[1], stride_doh=bdo[2], **P.lse_strides(lse),
                stride_sb=stats.stride(0), stride_st=stats.stride(1), seqlen_q=P.seqlen_q, n_heads=P.n_heads,
                n_batch=P.n_batch, HEAD_DIM=P.head_dim, D_PAD=_d_pad(P.head_dim), BLOCK_M=block, PACKED=P.packed,
                HAS_DLSE=dlse is not None)
    return Launch("attention_bwd_stats", _attn_bwd_stats, args, 4, 2, P.grid(P.seqlen_q, block, P.n_heads))
