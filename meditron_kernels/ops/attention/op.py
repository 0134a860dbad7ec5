"""Flash attention in Triton: causal and not, GQA, packed documents, fused rotary, fewer queries than
keys (a KV cache, decoding); forward and backward.

Shapes follow flash-attn. Batched: q (batch, sq, n_heads, d), k and v (batch, sk, n_kv_heads, d),
optionally with LENS_K (seqlens_k) keys per sequence. Packed: q (total_q, n_heads, d), k and v
(total_k, n_kv_heads, d), documents delimited by cu_seqlens (queries) and cu_seqlens_k (keys). Query
head h reads kv head h // (n_heads // n_kv_heads) in place; k and v are never expanded. Causal
attention is bottom-right aligned: query row r of a sequence with Lq queries and Lk keys is key row
r + Lk - Lq and sees the keys up to it.

Three kernels, each an exact online-softmax pass over (query block x key block) tiles:
  _attn_fwd       o, and the log-sum-exp of every query row;
  _attn_bwd_dq    delta = rowsum(o * do) - dlse, kept for the next kernel, and dq;
  _attn_bwd_dkdv  dk and dv: one program owns one key block of one kv head and walks the query heads
                  of its group, so the GQA reduction happens in registers, in a fixed order.
Every output element is written by exactly one program: no atomics, bit-identical reruns. The price
is that the dq program recomputes q k^T and do v^T (7 block matmuls per tile pair instead of 5).
Decoding (a few query rows per kv head) takes two more in the forward: _attn_decode, one program per
(sequence, kv head, key split) with every query row of the group in one tile, and
_attn_decode_reduce, which merges the splits by their log-sum-exps.

Causal blocks above the diagonal are never visited, and only diagonal blocks pay for a mask. In a
pack, every loop is bounded by the program's own document: blocks of other documents are skipped,
not masked.

Rotary: q and k are rotated in registers as they are loaded, as two rotate-half halves that stay
separate tiles (q k^T is the sum of the halves' products, so no register shuffles). The forward
rotates its query block once and every key block it visits. The dq kernel does the same, and hands
the rotated q it has made to the dk/dv kernel, which rotates its one key tile itself and therefore
streams plain query tiles. dq and dk are rotated back (the conjugate rotation) just before their
one store. Position ids index the keys; a query takes the position of its key row.

On sm_90 every q/k/v/do tile comes in through a TMA descriptor made in the kernel, one per
(document, head), whose bounds are the document's: rows past its end arrive as zeros, never as the
next document. On sm_80, for fp32, and where a stride breaks TMA's 16-byte rule, the same kernels
use masked pointer loads (as the decoding kernels always do).

WARP_SPEC (sm_90 candidates the autotuner may pick; docs/attention.md): the same kernels with their
loop warp-specialized by Triton into a TMA producer and two MMA consumer warp groups. Within that
pass's limits each kernel has one loop, every block masked, and the backward reads its statistics
from a first pass, _attn_bwd_stats, through TMA.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary
from triton.runtime.errors import OutOfResources

from ... import _validate as V
from ...backend import register
from .._common import Launch, cast_rtne, device_of, interpreting, unit_stride

LOG2E = 1.4426950408889634
# the same constants, visible inside kernels
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_INTERPRETED = tl.constexpr(interpreting())  # fixed at import, as triton.jit fixes interpreting
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------- kernel helpers
@triton.jit
def _tile_ids(n_heads, n_batch, REVERSE: tl.constexpr):
    # One flat grid, head fastest: the query heads of a GQA group run side by side and share their
    # k/v tiles in L2. Block index slowest; REVERSE hands out the heaviest causal blocks first.
    pid = tl.program_id(0)
    head = pid % n_heads
    rest = pid // n_heads
    bid = rest % n_batch
    blk = rest // n_batch
    if REVERSE:
        blk = tl.num_programs(0) // (n_heads * n_batch) - 1 - blk
    return head, bid, blk


@triton.jit
def _doc_bounds(CU, bid, seqlen, PACKED: tl.constexpr):
    # -> (first token of sequence `bid` along the token axis, as int64; its length)
    if PACKED:
        start = tl.load(CU + bid)
        length = tl.load(CU + bid + 1) - start
        start = start.to(tl.int64)
    else:
        start = bid.to(tl.int64) * 0
        length = seqlen
    return start, length


@triton.jit
def _bounds(CU, CU_K, LENS_K, bid, seqlen_q, seqlen_k, PACKED: tl.constexpr, VAR_K: tl.constexpr):
    # -> (start, length) of sequence `bid`'s queries, then of its keys. Batched keys may be fewer than
    # k's rows (VAR_K: a KV cache filled to LENS_K[bid]).
    start_q, lq = _doc_bounds(CU, bid, seqlen_q, PACKED)
    start_k, lk = _doc_bounds(CU_K, bid, seqlen_k, PACKED)
    if VAR_K:
        lk = tl.load(LENS_K + bid)
    return start_q, lq, start_k, lk


@triton.jit
def _tile_ptrs(base, rows, L, stride_s, WIDTH: tl.constexpr, PAD: tl.constexpr):
    # A [rows, PAD] tile of a [L, WIDTH] slab with unit column stride. Rows past L (the end of the
    # sequence) and columns past WIDTH (padding to a power of two) are masked off.
    cols = tl.arange(0, PAD)
    ptrs = base + rows[:, None] * stride_s + cols[None, :]
    mask = rows[:, None] < L
    if WIDTH != PAD:
        mask = mask & (cols < WIDTH)[None, :]
    return ptrs, mask


@triton.jit
def _make_desc(base, L, WIDTH: tl.constexpr, stride_s, BLOCK: tl.constexpr, BLOCK_W: tl.constexpr,
               USE_TMA: tl.constexpr):
    # A TMA descriptor over one (document, head): [L, WIDTH] rows of stride stride_s. Its bounds are
    # the document's, so a block running past the end reads zeros, never the next document.
    if USE_TMA:
        desc = tl.make_tensor_descriptor(base, shape=[L, WIDTH], strides=[stride_s, 1], block_shape=[BLOCK, BLOCK_W])
    else:
        desc = base
    return desc


@triton.jit
def _load(base, desc, r0, rows, L, stride_s, WIDTH: tl.constexpr, PAD: tl.constexpr,
          USE_TMA: tl.constexpr, DOT_F32: tl.constexpr):
    # A [rows, PAD] tile, zero past the end of the sequence and past WIDTH.
    if USE_TMA:
        x = desc.load([r0, 0])
    else:
        ptrs, mask = _tile_ptrs(base, rows, L, stride_s, WIDTH, PAD)
        x = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _positions(POS, bid, start, rows, L, stride_pb, stride_ps, HAS_POS: tl.constexpr):
    # Rotary position of each row: position_ids, or the row's index inside its own sequence.
    if HAS_POS:
        pos = tl.load(POS + bid.to(tl.int64) * stride_pb + (start + rows) * stride_ps, mask=rows < L, other=0)
    else:
        pos = rows
    return pos


@triton.jit
def _load_qk(base, desc, r0, rows, L, stride_s, pos, COS, SIN, stride_rot, HEAD_DIM: tl.constexpr,
             QK_PAD: tl.constexpr, ROTARY: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr,
             ROTATE: tl.constexpr = True):
    # q or k as the matmuls see it, -> (a, b). Plain: a is the [rows, QK_PAD] tile (b = a, unused).
    # ROTARY: the two rotate-half halves, each [rows, QK_PAD], rotated as loaded:
    # [x1 | x2] -> [x1 c - x2 s | x2 c + x1 s], in fp32 and rounded once to the input dtype, as
    # apply_rotary does. Keeping the halves apart (q k^T = a_q a_k^T + b_q b_k^T) costs no shuffle.
    # ROTATE=False: the halves of a tensor that is already rotated.
    if ROTARY and not ROTATE:
        HALF: tl.constexpr = HEAD_DIM // 2
        if USE_TMA:
            a = desc.load([r0, 0])
            b = desc.load([r0, HALF])
        else:
            ptrs, mask = _tile_ptrs(base, rows, L, stride_s, HALF, QK_PAD)
            a = tl.load(ptrs, mask=mask, other=0.0)
            b = tl.load(ptrs + HALF, mask=mask, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    elif ROTARY:
        HALF: tl.constexpr = HEAD_DIM // 2
        ptrs, mask = _tile_ptrs(base, rows, L, stride_s, HALF, QK_PAD)
        if USE_TMA:
            x1 = desc.load([r0, 0]).to(tl.float32)
            x2 = desc.load([r0, HALF]).to(tl.float32)
        else:
            x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        t = pos[:, None] * stride_rot + tl.arange(0, QK_PAD)[None, :]
        cos = tl.load(COS + t, mask=mask, other=0.0)
        sin = tl.load(SIN + t, mask=mask, other=0.0)
        dtype = base.dtype.element_ty
        a = cast_rtne(x1 * cos - x2 * sin, dtype, _INTERPRETED)
        b = cast_rtne(x2 * cos + x1 * sin, dtype, _INTERPRETED)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    else:
        a = _load(base, desc, r0, rows, L, stride_s, HEAD_DIM, QK_PAD, USE_TMA, DOT_F32)
        b = a
    return a, b


@triton.jit
def _dot_nt(a1, a2, b1, b2, ROTARY: tl.constexpr, PRECISION: tl.constexpr):
    # a b^T over head_dim; with ROTARY the reduction runs over the two halves in turn.
    s = tl.dot(a1, tl.trans(b1), input_precision=PRECISION)
    if ROTARY:
        s = tl.dot(a2, tl.trans(b2), s, input_precision=PRECISION)
    return s


@triton.jit
def _store(base, rows, L, stride_s, x, WIDTH: tl.constexpr, PAD: tl.constexpr):
    ptrs, mask = _tile_ptrs(base, rows, L, stride_s, WIDTH, PAD)
    tl.store(ptrs, cast_rtne(x.to(tl.float32), base.dtype.element_ty, _INTERPRETED), mask=mask)


@triton.jit
def _store_qk_grad(base, rows, L, stride_s, g1, g2, pos, COS, SIN, stride_rot, HEAD_DIM: tl.constexpr,
                   QK_PAD: tl.constexpr, ROTARY: tl.constexpr):
    # dq or dk. With ROTARY, (g1, g2) is the gradient with respect to the rotated halves; the gradient
    # with respect to the input is the conjugate rotation [g1 c + g2 s | g2 c - g1 s].
    if ROTARY:
        HALF: tl.constexpr = HEAD_DIM // 2
        ptrs, mask = _tile_ptrs(base, rows, L, stride_s, HALF, QK_PAD)
        t = pos[:, None] * stride_rot + tl.arange(0, QK_PAD)[None, :]
        cos = tl.load(COS + t, mask=mask, other=0.0)
        sin = tl.load(SIN + t, mask=mask, other=0.0)
        dtype = base.dtype.element_ty
        tl.store(ptrs, cast_rtne(g1 * cos + g2 * sin, dtype, _INTERPRETED), mask=mask)
        tl.store(ptrs + HALF, cast_rtne(g2 * cos - g1 * sin, dtype, _INTERPRETED), mask=mask)
    else:
        _store(base, rows, L, stride_s, g1, HEAD_DIM, QK_PAD)


@triton.jit
def _mm(x, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    # A matmul operand made in registers (p, ds): rounded to the input dtype as the tensor cores see
    # it. DOT_F32 (only under the interpreter, whose bf16 arithmetic is broken) feeds it back as fp32.
    y = cast_rtne(x, DTYPE, _INTERPRETED)
    if DOT_F32:
        y = y.to(tl.float32)
    return y


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


# ---------------------------------------------------------------------------- forward
@triton.jit
def _fwd_blocks(acc, l_i, m_i, q1, q2, last_m, lo, hi, L, qk_scale,
                k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                start, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, QK_PAD: tl.constexpr,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr, HAS_POS: tl.constexpr,
                USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, SCALE_NEG: tl.constexpr,
                WARP_SPEC: tl.constexpr):
    # Key blocks [lo, hi) of the L keys in the online softmax; row r sees keys up to last_m[r] (CAUSAL).
    # Scores live in base 2 (qk_scale carries log2(e)).
    dtype = v_base.dtype.element_ty
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
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
            s = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
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
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q1, q2, last, 0, hi, Lk, qk_scale,
                                    k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                    start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                    BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, True, CAUSAL, ROTARY, HAS_POS, USE_TMA,
                                    DOT_F32, PRECISION, SCALE_NEG, True)
    else:
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q1, q2, rows_m + off, 0, full_end, Lk, qk_scale,
                                    k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                                    start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                                    BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, False, CAUSAL, ROTARY, HAS_POS, USE_TMA,
                                    DOT_F32, PRECISION, SCALE_NEG, False)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q1, q2, rows_m + off, full_end, hi, Lk, qk_scale,
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


# ---------------------------------------------------------------------------- backward: delta and dq
@triton.jit
def _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, last_m, lo, hi, L, qk_scale,
               k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
               start, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, QK_PAD: tl.constexpr,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr, HAS_POS: tl.constexpr,
               USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr):
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
        dq1, dq2 = _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, last, 0, hi, Lk, qk_scale,
                              k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                              start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                              BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, True, CAUSAL, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                              PRECISION, True)
    else:
        dq1, dq2 = _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, rows_m + off, 0, full_end, Lk, qk_scale,
                              k_base, k_desc, stride_ks, v_base, v_desc, stride_vs,
                              start_k, bid, POS, stride_pb, stride_ps, COS, SIN, stride_rot,
                              BLOCK_N, HEAD_DIM, D_PAD, QK_PAD, False, CAUSAL, ROTARY, HAS_POS, USE_TMA, DOT_F32,
                              PRECISION, False)
        dq1, dq2 = _dq_blocks(dq1, dq2, q1, q2, do, lse2, delta, rows_m + off, full_end, hi, Lk, qk_scale,
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
                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    # Query blocks [lo, hi) of the L queries against one key block, transposed (keys on rows) so that
    # dk and dv accumulate without a transpose. Query rows past L load as zeros (q, do, lse, delta),
    # which makes their contribution exactly zero: only the causal diagonal needs a mask (query row r
    # sees keys up to r + off). With ROTARY, q_base points at the queries _attn_bwd_dq already
    # rotated: no rotation in this loop.
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
        if MASK:
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
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q, i + off, lo, full_end, Lk, qk_scale,
                                k_base, k_base, stride_ks, v_base, v_base, stride_vs,
                                start_k, bid, LENS_K, 0, 0, LENS_K, LENS_K, 0,
                                BLOCK_N, HEAD_DIM, D_PAD, D_PAD, False, CAUSAL, False, False, False,
                                DOT_F32, PRECISION, SCALE_NEG, False)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q, i + off, full_end, hi, Lk, qk_scale,
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
    m = tl.max(lse_s, 0)  # finite: the first split is never empty
    w = tl.exp(lse_s - m)
    total = tl.sum(w, 0)
    cols = tl.arange(0, D_PAD)
    o_s = tl.load(O_PART + part[:, None] * HEAD_DIM + cols[None, :], mask=(s < n_splits)[:, None] &
                  (cols < HEAD_DIM)[None, :], other=0.0)
    o = tl.sum(w[:, None] * o_s, 0) / total
    b64 = bid.to(tl.int64)
    tl.store(O + b64 * stride_ob + (start_q + i) * stride_os + head * stride_oh + cols,
             cast_rtne(o, O.dtype.element_ty, _INTERPRETED), mask=cols < HEAD_DIM)
    tl.store(LSE + b64 * stride_lb + head * stride_lh + start_q + i, m + tl.log(total))


# ---------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class Config:
    """Tile shape and launch options of one kernel. block_m: query rows; block_n: key rows."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_spec: bool = False


def _d_pad(head_dim: int) -> int:
    # tl.dot needs a reduction of at least 16; non-powers of two are padded with zero columns
    return max(16, triton.next_power_of_2(head_dim))


def _qk_pad(head_dim: int, rotary: bool) -> int:
    # width of a q/k tile: rotary keeps the two halves as separate tiles
    return max(16, triton.next_power_of_2(head_dim // 2)) if rotary else _d_pad(head_dim)


# Every tile shape lives here: {(kernel, arch, head_dim class, rotary): [default, other candidates]}.
# The autotuner (on a GPU) times the candidates; the default runs everywhere else, and is what the
# static report compiles. Every 16-bit default compiles without spills for sm_80 and sm_90.
# Reasoning, bf16/fp16 at d = 128: a 128-row query tile makes each k/v tile fetched from L2 feed
# 128 x 128 x 4 flops per pair of elements; its fp32 accumulators (o, and the scores) take 8 warps
# to stay in registers. On Hopper, wgmma reads k and v straight from shared memory, and 3 stages of
# 64 KB k+v tiles plus the 32 KB q tile fit in 227 KB. Ampere's mma.sync pulls operands through
# registers, so its tiles are half as wide. The dk/dv program holds two fp32 key-block accumulators,
# which caps it at 128 keys x 32 queries per step on sm_90 (64 keys on sm_80). Rotary tiles carry the
# fp32 cos/sin tiles of every key block too, so they use half the key rows.
_C = Config
_TABLE = {
    ("fwd", 90, 64, False): [_C(128, 128, 8, 3), _C(128, 64, 4, 3), _C(128, 128, 8, 4), _C(64, 64, 4, 3)],
    ("fwd", 90, 128, False): [_C(128, 128, 8, 3), _C(128, 128, 8, 2), _C(128, 64, 8, 3), _C(64, 64, 4, 3)],
    ("fwd", 90, 256, False): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(64, 32, 4, 3)],
    ("fwd", 80, 64, False): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(128, 64, 4, 2)],
    ("fwd", 80, 128, False): [_C(128, 64, 8, 2), _C(128, 32, 8, 3), _C(64, 64, 4, 2)],
    ("fwd", 80, 256, False): [_C(64, 32, 8, 2), _C(32, 32, 4, 2), _C(64, 64, 8, 2)],
    ("dq", 90, 64, False): [_C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(64, 64, 4, 3)],
    ("dq", 90, 128, False): [_C(128, 64, 8, 3), _C(128, 32, 8, 3), _C(64, 64, 4, 3)],
    ("dq", 90, 256, False): [_C(64, 32, 4, 2), _C(64, 64, 8, 2), _C(32, 32, 4, 2)],
    ("dq", 80, 64, False): [_C(128, 64, 8, 2), _C(64, 64, 4, 3), _C(128, 32, 4, 3)],
    ("dq", 80, 128, False): [_C(128, 32, 8, 2), _C(64, 32, 4, 2), _C(128, 32, 8, 3)],
    ("dq", 80, 256, False): [_C(64, 32, 8, 2), _C(32, 32, 4, 2), _C(64, 16, 4, 2)],
    ("dkdv", 90, 64, False): [_C(32, 128, 8, 3), _C(64, 128, 8, 3), _C(64, 64, 4, 3)],
    # 16 queries, 2 stages: Triton 3.6 (the GPU machines') spills 96 bytes at 32 x 128 x 3 stages and 24 at
    # 16 x 128 x 3 once the kernel rotates its own key tile; 3.9 spills at neither.
    ("dkdv", 90, 128, False): [_C(16, 128, 8, 2), _C(16, 128, 8, 3), _C(32, 128, 8, 3), _C(32, 128, 8, 2)],
    ("dkdv", 90, 256, False): [_C(32, 32, 8, 2), _C(32, 64, 8, 2), _C(16, 64, 8, 2)],
    ("dkdv", 80, 64, False): [_C(32, 128, 8, 2), _C(32, 64, 4, 2), _C(64, 64, 4, 2)],
    ("dkdv", 80, 128, False): [_C(32, 64, 8, 2), _C(16, 128, 8, 2), _C(32, 64, 4, 1)],
    ("dkdv", 80, 256, False): [_C(32, 32, 8, 2), _C(16, 64, 8, 2), _C(16, 32, 4, 2)],
    ("fwd", 90, 64, True): [_C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(64, 64, 4, 3)],
    ("fwd", 90, 128, True): [_C(128, 64, 8, 2), _C(128, 64, 8, 3), _C(128, 128, 8, 2)],
    ("fwd", 90, 256, True): [_C(64, 32, 8, 2), _C(64, 64, 8, 2)],
    ("fwd", 80, 64, True): [_C(64, 32, 4, 2), _C(128, 32, 8, 2)],
    ("fwd", 80, 128, True): [_C(64, 32, 4, 2), _C(64, 16, 4, 2)],
    ("fwd", 80, 256, True): [_C(32, 32, 4, 2), _C(64, 16, 4, 2)],
    ("dq", 90, 64, True): [_C(128, 64, 8, 2), _C(128, 32, 8, 3)],
    ("dq", 90, 128, True): [_C(128, 32, 8, 3), _C(128, 64, 8, 2)],
    ("dq", 90, 256, True): [_C(32, 32, 8, 2), _C(16, 16, 4, 2)],
    ("dq", 80, 64, True): [_C(64, 32, 4, 2), _C(32, 32, 4, 2)],
    ("dq", 80, 128, True): [_C(32, 32, 4, 2), _C(64, 16, 4, 2)],
    ("dq", 80, 256, True): [_C(32, 16, 8, 2), _C(16, 16, 4, 2)],
    ("dkdv", 90, 64, True): [_C(32, 128, 8, 3), _C(32, 64, 4, 3)],
    ("dkdv", 90, 128, True): [_C(32, 128, 8, 3), _C(16, 128, 8, 3)],
    ("dkdv", 90, 256, True): [_C(32, 32, 8, 2), _C(16, 16, 4, 2)],
    ("dkdv", 80, 64, True): [_C(32, 64, 8, 2), _C(32, 32, 4, 2)],
    ("dkdv", 80, 128, True): [_C(32, 32, 4, 2), _C(16, 64, 8, 2)],
    ("dkdv", 80, 256, True): [_C(16, 32, 8, 2), _C(16, 16, 4, 2)],
}
# Warp-specialized candidates (sm_90, TMA, no rotary; docs/attention.md): tried by the autotuner beside
# the table above, never a default until a GPU measurement picks them. Triton splits a program into a
# TMA producer warp group and two consumer warp groups that each own half of the rows (num_warps=4
# becomes 12 warps; at 8 Triton does not specialize), so block_m / block_n = 128 gives each consumer
# the 64-row wgmma tile of FlashAttention-3.
_TABLE_WS = {
    ("fwd", 90, 64, False): [_C(128, 128, 4, 3, True), _C(128, 128, 4, 2, True)],
    ("fwd", 90, 128, False): [_C(128, 128, 4, 2, True), _C(128, 64, 4, 3, True)],
    ("dq", 90, 64, False): [_C(128, 64, 4, 3, True), _C(128, 128, 4, 2, True)],
    ("dq", 90, 128, False): [_C(128, 64, 4, 2, True), _C(128, 64, 4, 3, True)],
    ("dkdv", 90, 64, False): [_C(64, 128, 4, 3, True), _C(32, 128, 4, 3, True)],
    ("dkdv", 90, 128, False): [_C(64, 128, 4, 2, True), _C(32, 128, 4, 3, True)],
}
# Head dims that are not a power of two load through masked pointers rather than TMA; where that
# costs registers, they get their own entry.
_TABLE_PADDED = {
    ("dkdv", 90, 128, False): [_C(16, 128, 8, 3)],
    ("dkdv", 90, 128, True): [_C(16, 128, 8, 3)],
}
# fp32 inputs run the "ieee" dot, on CUDA cores: a correctness path, in small tiles (one config).
# Its dq kernel keeps q, do and dq whole per thread and spills under 1 KB even so.
_TABLE_F32 = {
    ("fwd", 128): _C(32, 16, 4, 1), ("fwd", 256): _C(16, 16, 4, 1),
    ("dq", 128): _C(16, 16, 4, 1), ("dq", 256): _C(16, 16, 8, 1),
    ("dkdv", 128): _C(16, 32, 4, 1), ("dkdv", 256): _C(16, 16, 4, 1),
}

# Under the interpreter every program runs in Python: small tiles, with block_m != block_n so that
# the causal diagonal spans several key blocks and a sequence of 37 spans several of each.
_INTERPRETER = {"fwd": Config(32, 16, 4, 1), "dq": Config(32, 16, 4, 1), "dkdv": Config(16, 32, 4, 1)}


def candidates(kernel: str, cc: int | None, dtype: torch.dtype, head_dim: int, rotary: bool = False,
               warp_spec: bool = False) -> list[Config]:
    """The configurations of ``kernel`` ("fwd", "dq" or "dkdv"); the first is the default.
    cc None: the interpreter. warp_spec: the call can take warp-specialized configurations
    (see warp_spec_ok); without it they are left out."""
    if cc is None:
        cfg = _INTERPRETER[kernel]
        return [cfg if warp_spec or not cfg.warp_spec else dataclasses.replace(cfg, warp_spec=False)]
    width = _d_pad(head_dim)
    if dtype == torch.float32:
        return [_TABLE_F32[(kernel, 128 if width <= 128 else 256)]]
    key = (kernel, 90 if cc >= 90 else 80, min(max(width, 64), 256), rotary)
    if head_dim != width and key in _TABLE_PADDED:
        return _TABLE_PADDED[key]
    # (only Hopper: Blackwell's warp specialization is another compiler pass, never compiled here)
    warp_spec = warp_spec and cc == 90
    return [c for c in _TABLE[key] + _TABLE_WS.get(key, []) if warp_spec or not c.warp_spec]


def default_config(kernel: str, cc: int | None, dtype: torch.dtype, head_dim: int, rotary: bool = False) -> Config:
    """The deterministic configuration: what runs without autotuning and what the static report compiles."""
    return candidates(kernel, cc, dtype, head_dim, rotary)[0]


# Decoding: a few query rows (group * sq <= DECODE_MAX_ROWS) against a long cache is bound by reading
# the cache once. One program per (sequence, kv head) holds every query row of the group, so a
# 16-row tile, padded where the group is smaller, feeds the matmuls. When those programs would not
# fill the GPU (fewer than its SMs), the keys are split among more programs (flash-decoding), each at
# least DECODE_MIN_SPLIT keys so that its partial result (d fp32 per row) stays small next to the
# keys it reads, up to two programs per SM; a small kernel merges the splits by their log-sum-exps.
# Key tiles: 64 rows of 128-wide bf16 k and v are 32 KB per stage, so three stages fit either part;
# the fp32 accumulator is at most 64 x 128 over 4 warps.
DECODE_MAX_ROWS = 64
DECODE_MIN_SPLIT = 256
_DECODE = {64: _C(16, 128, 4, 3), 128: _C(16, 64, 4, 3), 256: _C(16, 32, 4, 2)}
_DECODE_F32 = {64: _C(16, 32, 4, 2), 128: _C(16, 32, 4, 2), 256: _C(16, 16, 4, 1)}
# Under the interpreter: small key tiles and splits, and a pretend GPU of 4 SMs, so that tests cross
# both paths.
_INTERPRETER_DECODE = (Config(16, 16, 4, 1), 16, 4)  # (config, least keys per split, SMs)


def decode_config(cc: int | None, dtype: torch.dtype, head_dim: int) -> Config:
    """The decoding kernel's key tile (block_n) and launch options (block_m is the least row tile)."""
    if cc is None:
        return _INTERPRETER_DECODE[0]
    width = min(max(_d_pad(head_dim), 64), 256)
    return (_DECODE_F32 if dtype == torch.float32 else _DECODE)[width]


def decode_splits(n_programs: int, seqlen_k: int, n_sm: int, min_split: int = DECODE_MIN_SPLIT) -> int:
    """Key splits per (sequence, kv head): enough programs for two per SM, each with >= min_split keys."""
    if n_programs >= n_sm:
        return 1
    return max(1, min(triton.cdiv(2 * n_sm, n_programs), triton.cdiv(seqlen_k, min_split), 128))


# Tests flip this to run the descriptor path under the interpreter (which checks TMA's alignment rules).
_INTERPRET_TMA = False
# Benchmarks and tests: {kernel: Config} runs that candidate (when the call can take it) instead of tuning.
_FORCE_CONFIG: dict[str, Config | None] = {}


def use_tma(cc: int | None, head_dim: int, rotary: bool, *tensors: torch.Tensor) -> bool:
    """TMA descriptors on sm_90 when every (document, head) slab satisfies TMA's rules: 16-byte
    aligned base and row stride, unit stride along d; and d a power of two (with rotary, whose
    tiles are half as wide, at least 32) so that a tile is exactly a box."""
    if cc is None:
        if not _INTERPRET_TMA:
            return False
    elif cc < 90 or tensors[0].dtype == torch.float32:  # fp32 runs on CUDA cores: nothing to feed
        return False
    if head_dim != _d_pad(head_dim) or (rotary and head_dim < 32):
        return False
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
        if t.stride(-3) == 0:  # the row stride of a descriptor cannot be 0 (broadcast tokens)
            return False
    return True


def warp_spec_ok(tma: bool, rotary: bool, *all_heads: torch.Tensor, var_k: bool = False) -> bool:
    """Whether a call can take the warp-specialized configurations: every tile through TMA (rotary
    tables come through pointers), and for ``all_heads`` (q and do of the dk/dv kernel, read through one
    descriptor spanning a token's heads) the heads of a token side by side. Keys counted per sequence
    (var_k, a KV cache) stay on the default kernels: that variant was never compiled specialized, and a
    failing compile would abort the autotuner."""
    return tma and not rotary and not var_k and all(t.stride(-2) == t.shape[-1] for t in all_heads)


def _autotune_enabled(x: torch.Tensor) -> bool:
    return (x.is_cuda and os.environ.get("MEDITRON_KERNELS_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


_CHOSEN: dict[tuple, Config] = {}


def _run_tuned(kernel: str, cc: int | None, x: torch.Tensor, head_dim: int, rotary: bool, key: tuple, run,
               warp_spec: bool = False) -> None:
    """run(config) with this call's configuration: on a GPU, the fastest candidate for ``key`` (head_dim
    and the sequence-length bucket among it), timed once per process; else the default. A candidate
    the part cannot hold (shared memory differs a little between Triton versions) yields to the next."""
    cands = candidates(kernel, cc, x.dtype, head_dim, rotary, warp_spec)
    if _FORCE_CONFIG.get(kernel) is not None:
        cands = [c for c in cands if c == _FORCE_CONFIG[kernel]] or cands
    key = (kernel, cc, x.dtype, head_dim, rotary, warp_spec, _FORCE_CONFIG.get(kernel)) + key
    cfg = _CHOSEN.get(key)
    if cfg is None:
        if len(cands) > 1 and _autotune_enabled(x):
            timed = []
            for c in cands:
                try:
                    timed.append((triton.testing.do_bench(lambda: run(c), warmup=5, rep=25), cands.index(c)))
                except OutOfResources:
                    continue
            cands = [cands[i] for _, i in sorted(timed)] or cands
        for c in cands:
            try:
                run(c)
            except OutOfResources:
                if c is cands[-1]:
                    raise
                continue
            _CHOSEN[key] = c
            return
    run(cfg)


def _ensure_allocator() -> None:
    # Descriptors made in the kernel live in a per-launch global scratch buffer that Triton asks an
    # allocator for. The allocator is a context variable: set it where it is still the null default
    # (autograd runs the backward on its own thread, with its own context).
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


# ---------------------------------------------------------------------------- launchers
def _cc(x: torch.Tensor) -> int | None:
    if x.is_cuda:
        major, minor = torch.cuda.get_device_capability(x.device)
        return major * 10 + minor
    return None


def _bsh(x: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(sequence, token, head) strides in elements; a pack is one sequence axis, so its first is 0."""
    return (0, x.stride(0), x.stride(1)) if packed else (x.stride(0), x.stride(1), x.stride(2))


# The longest document per cu_seqlens version: a trainer passes the same offsets to every layer,
# so the host sync this costs happens once per step.
_longest = WeakIdKeyDictionary()


def _longest_document(cu: torch.Tensor) -> int:
    hit = _longest.get(cu)
    if hit is None or hit[0] != cu._version:
        hit = (cu._version, int((cu[1:] - cu[:-1]).max().item()))
        _longest[cu] = hit
    return hit[1]


def _check_positions(position_ids: torch.Tensor | None, n_table: int, longest: int) -> None:
    # A position outside the tables would read out of bounds in the kernel: refuse it before launch.
    # This runs inside the op, so also under torch.compile, where the public API's check is skipped.
    if position_ids is None:
        if longest > n_table:
            raise ValueError(f"cos and sin cover {n_table} positions but a sequence has {longest} tokens; "
                             "pass position_ids or longer tables")
        return
    V.position_range(position_ids, n_table)


@dataclasses.dataclass
class _Problem:
    """Everything the three kernels share about one call."""
    packed: bool
    n_batch: int  # batch size, or number of documents
    seqlen_q: int  # query length, or the longest query document
    seqlen_k: int  # key length (k's rows when batched), or the longest key document
    n_heads: int
    n_kv: int
    head_dim: int
    causal: bool
    scale: float
    cu: torch.Tensor | None
    cu_k: torch.Tensor | None  # None: the queries' offsets
    lens_k: torch.Tensor | None  # batched: keys per sequence
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    pos: torch.Tensor | None

    def common(self, dummy: torch.Tensor) -> dict:
        rot = self.cos is not None
        pos = self.pos
        if pos is None:
            pstrides = (0, 0)
        elif self.packed:
            pstrides = (0, pos.stride(0))
        else:
            # (1, sk) position ids are shared by every sequence
            pstrides = (pos.stride(0) if pos.shape[0] > 1 else 0, pos.stride(1))
        cu = self.cu if self.packed else dummy
        return dict(
            CU=cu, CU_K=self.cu_k if self.cu_k is not None else cu,
            LENS_K=self.lens_k if self.lens_k is not None else dummy,
            COS=self.cos if rot else dummy, SIN=self.sin if rot else dummy,
            POS=pos if pos is not None else dummy, stride_rot=self.cos.stride(0) if rot else 0,
            stride_pb=pstrides[0], stride_ps=pstrides[1], seqlen_q=0 if self.packed else self.seqlen_q,
            seqlen_k=0 if self.packed else self.seqlen_k,
            n_batch=self.n_batch, group=self.n_heads // self.n_kv, HEAD_DIM=self.head_dim,
            D_PAD=_d_pad(self.head_dim), QK_PAD=_qk_pad(self.head_dim, rot), CAUSAL=self.causal,
            PACKED=self.packed, ROTARY=rot, HAS_POS=pos is not None, VAR_K=self.lens_k is not None)

    def lse_strides(self, lse: torch.Tensor) -> dict:
        if self.packed:  # (n_heads, total_q)
            return dict(stride_lb=0, stride_lh=lse.stride(0))
        return dict(stride_lb=lse.stride(0), stride_lh=lse.stride(1))  # (batch, n_heads, sq)


def _problem(q, k, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids,
             cu_seqlens_k=None, max_seqlen_k=0, seqlens_k=None) -> _Problem:
    packed = cu_seqlens is not None
    head_dim = q.shape[-1]
    if packed:
        n_batch = cu_seqlens.shape[0] - 1
        seqlen_q = _document_bound(cu_seqlens, max_seqlen, "max_seqlen")
        seqlen_k = seqlen_q if cu_seqlens_k is None else _document_bound(cu_seqlens_k, max_seqlen_k, "max_seqlen_k")
    else:
        n_batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    if cos is not None:
        cos, sin = cos.float(), sin.float()
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        _check_positions(position_ids, cos.shape[0], seqlen_k)
    return _Problem(packed, n_batch, seqlen_q, seqlen_k, q.shape[-2], k.shape[-2], head_dim, causal, softmax_scale,
                    cu_seqlens, cu_seqlens_k, seqlens_k, cos, sin, position_ids)


def _document_bound(cu: torch.Tensor, given: int, name: str) -> int:
    if given > 0 and (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return given  # no host sync inside a CUDA graph capture: trusted as given
    # The grid covers this many rows per document: a smaller value would leave rows unwritten,
    # and the public API's check does not run under torch.compile. One sync per offsets tensor.
    longest = _longest_document(cu)
    if 0 < given < longest:
        raise ValueError(f"{name}={given} is smaller than the longest document ({longest} tokens)")
    return longest


def _flags(q: torch.Tensor, cc: int | None, tma: bool) -> dict:
    return dict(USE_TMA=tma, DOT_F32=(cc is None and q.dtype == torch.bfloat16),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _fwd_args(P: _Problem, q, k, v, o, lse, cfg: Config, flags: dict) -> dict:
    bq, bk, bv, bo = _bsh(q, P.packed), _bsh(k, P.packed), _bsh(v, P.packed), _bsh(o, P.packed)
    return dict(
        Q=q, K=k, V=v, O=o, LSE=lse, **P.common(q), qk_scale=P.scale * LOG2E,
        stride_qb=bq[0], stride_qs=bq[1], stride_qh=bq[2], stride_kb=bk[0], stride_ks=bk[1], stride_kh=bk[2],
        stride_vb=bv[0], stride_vs=bv[1], stride_vh=bv[2], stride_ob=bo[0], stride_os=bo[1], stride_oh=bo[2],
        **P.lse_strides(lse), n_heads=P.n_heads, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SCALE_NEG=P.scale < 0,
        WARP_SPEC=cfg.warp_spec, **flags)


def _bwd_args(P: _Problem, q, k, v, do, lse, delta, cfg: Config, flags: dict, stats=None, cu_st=None) -> dict:
    bq, bk, bv, bdo = _bsh(q, P.packed), _bsh(k, P.packed), _bsh(v, P.packed), _bsh(do, P.packed)
    st = stats if stats is not None else lse
    return dict(
        Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, STATS=st, CU_ST=cu_st if cu_st is not None else lse,
        stride_sb=st.stride(0) if stats is not None else 0,
        stride_st=st.stride(1) if stats is not None else 0, **P.common(q), qk_scale=P.scale * LOG2E, sm_scale=P.scale,
        stride_qb=bq[0], stride_qs=bq[1], stride_qh=bq[2], stride_kb=bk[0], stride_ks=bk[1], stride_kh=bk[2],
        stride_vb=bv[0], stride_vs=bv[1], stride_vh=bv[2], stride_dob=bdo[0], stride_dos=bdo[1], stride_doh=bdo[2],
        **P.lse_strides(lse), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, WARP_SPEC=cfg.warp_spec, **flags)


def _grid(seqlen: int, n_batch: int, block: int, heads: int) -> tuple[int]:
    return (triton.cdiv(seqlen, block) * n_batch * heads,)


# One launch builder per kernel, used by the run-time path and by static_launches() alike.
def _fwd_launch(P: _Problem, q, k, v, o, lse, cfg: Config, flags: dict) -> Launch:
    return Launch("attention_fwd", _attn_fwd, _fwd_args(P, q, k, v, o, lse, cfg, flags), cfg.num_warps,
                  cfg.num_stages, _grid(P.seqlen_q, P.n_batch, cfg.block_m, P.n_heads))


def _dq_launch(P: _Problem, q, k, v, o, do, lse, delta, dq, qrot, dlse, cfg: Config, flags: dict, stats=None,
               cu_st=None) -> Launch:
    """delta (lse's layout) and qrot (q rotated, for the dk/dv kernel; dq itself without rotary) are written.
    stats, cu_st: what _attn_bwd_stats wrote, for a warp-specialized cfg."""
    bo, bdq = _bsh(o, P.packed), _bsh(dq, P.packed)
    args = dict(_bwd_args(P, q, k, v, do, lse, delta, cfg, flags, stats, cu_st), O=o, DQ=dq, QROT=qrot,
                DLSE=dlse if dlse is not None else lse, HAS_DLSE=dlse is not None,
                stride_ob=bo[0], stride_os=bo[1], stride_oh=bo[2], stride_dqb=bdq[0], stride_dqs=bdq[1],
                stride_dqh=bdq[2], n_heads=P.n_heads)
    return Launch("attention_bwd_dq", _attn_bwd_dq, args, cfg.num_warps, cfg.num_stages,
                  _grid(P.seqlen_q, P.n_batch, cfg.block_m, P.n_heads))


def _dkdv_launch(P: _Problem, q, k, v, do, lse, delta, dk, dv, cfg: Config, flags: dict, stats=None,
                 cu_st=None) -> Launch:
    """q: the rotated q the dq kernel wrote when rotary, else q itself; delta from the dq kernel (or the
    statistics pass)."""
    bdk = _bsh(dk, P.packed)
    args = dict(_bwd_args(P, q, k, v, do, lse, delta, cfg, flags, stats, cu_st), DK=dk, DV=dv,
                stride_dkb=bdk[0], stride_dks=bdk[1], stride_dkh=bdk[2], n_kv_heads=P.n_kv)
    return Launch("attention_bwd_dkdv", _attn_bwd_dkdv, args, cfg.num_warps, cfg.num_stages,
                  _grid(P.seqlen_k, P.n_batch, cfg.block_n, P.n_kv))


def _stats_launch(P: _Problem, o, do, lse, dlse, delta, stats, cu_st) -> Launch:
    """The warp-specialized backward's first pass: delta, and the scaled lse and delta laid out for TMA
    in stats ((n_seq, 2 * n_heads, tokens); packed documents start on a multiple of 4 columns, cu_st)."""
    bo, bdo = _bsh(o, P.packed), _bsh(do, P.packed)
    block = 64
    args = dict(O=o, DO=do, LSE=lse, DLSE=dlse if dlse is not None else lse, DELTA=delta, STATS=stats,
                CU=P.cu if P.packed else lse, CU_ST=cu_st if P.packed else lse, stride_ob=bo[0], stride_os=bo[1],
                stride_oh=bo[2], stride_dob=bdo[0], stride_dos=bdo[1], stride_doh=bdo[2], **P.lse_strides(lse),
                stride_sb=stats.stride(0), stride_st=stats.stride(1), seqlen_q=P.seqlen_q, n_heads=P.n_heads,
                n_batch=P.n_batch, HEAD_DIM=P.head_dim, D_PAD=_d_pad(P.head_dim), BLOCK_M=block, PACKED=P.packed,
                HAS_DLSE=dlse is not None)
    return Launch("attention_bwd_stats", _attn_bwd_stats, args, 4, 2, _grid(P.seqlen_q, P.n_batch, block, P.n_heads))


def _lse_empty(q: torch.Tensor, packed: bool) -> torch.Tensor:
    if packed:
        return torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    return torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)


def _tune_key(P: _Problem, tma: bool) -> tuple:
    return (P.causal, P.packed, tma, triton.next_power_of_2(max(P.seqlen_q, 1)),
            triton.next_power_of_2(max(P.seqlen_k, 1)))


def attention_forward(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids,
                      cu_seqlens_k=None, max_seqlen_k=0, seqlens_k=None):
    """-> o (q's shape), lse (fp32: (batch, n_heads, sq), or (n_heads, total_q) when packed)."""
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    packed = cu_seqlens is not None
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _lse_empty(q, packed)
    if q.numel() == 0:
        return o, lse.fill_(float("-inf"))
    P = _problem(q, k, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids,
                 cu_seqlens_k, max_seqlen_k, seqlens_k)
    cc = _cc(q)
    tma = use_tma(cc, P.head_dim, cos is not None, q, k, v)
    if tma and q.is_cuda:
        _ensure_allocator()
    flags = _flags(q, cc, tma)

    if _is_decode(P):
        _decode(P, q, k, v, o, lse, cc)
        return o, lse

    _run_tuned("fwd", cc, q, P.head_dim, cos is not None, _tune_key(P, tma),
               lambda cfg: _fwd_launch(P, q, k, v, o, lse, cfg, flags).run(),
               warp_spec_ok(tma, cos is not None, var_k=P.lens_k is not None))
    return o, lse


def _is_decode(P: _Problem) -> bool:
    # Rotary calls take the general kernel: the model's cache holds keys already rotated.
    return P.cos is None and (P.n_heads // P.n_kv) * P.seqlen_q <= DECODE_MAX_ROWS


def _sm_count(x: torch.Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return _INTERPRETER_DECODE[2]


def _decode_launch(P: _Problem, q, k, v, o, lse, o_part, lse_part, cfg: Config, n_splits: int,
                   flags: dict) -> Launch:
    c = P.common(q)
    bq, bk, bv, bo = _bsh(q, P.packed), _bsh(k, P.packed), _bsh(v, P.packed), _bsh(o, P.packed)
    rows = (P.n_heads // P.n_kv) * P.seqlen_q
    args = dict(
        Q=q, K=k, V=v, O=o, LSE=lse, O_PART=o_part, LSE_PART=lse_part, CU=c["CU"], CU_K=c["CU_K"],
        LENS_K=c["LENS_K"], qk_scale=P.scale * LOG2E,
        stride_qb=bq[0], stride_qs=bq[1], stride_qh=bq[2], stride_kb=bk[0], stride_ks=bk[1], stride_kh=bk[2],
        stride_vb=bv[0], stride_vs=bv[1], stride_vh=bv[2], stride_ob=bo[0], stride_os=bo[1], stride_oh=bo[2],
        **P.lse_strides(lse), seqlen_q=P.seqlen_q, seqlen_k=c["seqlen_k"], n_kv_heads=P.n_kv, n_batch=P.n_batch,
        group=P.n_heads // P.n_kv, n_splits=n_splits, HEAD_DIM=P.head_dim, D_PAD=_d_pad(P.head_dim),
        BLOCK_M=max(cfg.block_m, triton.next_power_of_2(rows)), BLOCK_N=cfg.block_n, CAUSAL=P.causal,
        PACKED=P.packed, VAR_K=P.lens_k is not None, SPLIT=n_splits > 1, DOT_F32=flags["DOT_F32"],
        PRECISION=flags["PRECISION"], SCALE_NEG=P.scale < 0)
    return Launch("attention_decode", _attn_decode, args, cfg.num_warps, cfg.num_stages,
                  (P.n_batch * P.n_kv * n_splits,))


def _reduce_launch(P: _Problem, o, lse, o_part, lse_part, n_splits: int) -> Launch:
    bo = _bsh(o, P.packed)
    args = dict(O_PART=o_part, LSE_PART=lse_part, O=o, LSE=lse, CU=P.cu if P.packed else lse,
                stride_ob=bo[0], stride_os=bo[1], stride_oh=bo[2], **P.lse_strides(lse), seqlen_q=P.seqlen_q,
                n_heads=P.n_heads, n_batch=P.n_batch, n_splits=n_splits, HEAD_DIM=P.head_dim,
                D_PAD=_d_pad(P.head_dim), SPLITS_PAD=max(2, triton.next_power_of_2(n_splits)), PACKED=P.packed)
    return Launch("attention_decode_reduce", _attn_decode_reduce, args, 4, 1, (P.n_batch * P.n_heads * P.seqlen_q,))


def _decode(P: _Problem, q, k, v, o, lse, cc: int | None) -> None:
    """The decoding path of the forward: _attn_decode over key splits, then (if split) the merge."""
    cfg = decode_config(cc, q.dtype, P.head_dim)
    min_split = DECODE_MIN_SPLIT if cc is not None else _INTERPRETER_DECODE[1]
    n_splits = _FORCE_SPLITS or decode_splits(P.n_batch * P.n_kv, P.seqlen_k, _sm_count(q), min_split)
    o_part = lse_part = lse
    if n_splits > 1:
        o_part = torch.empty(P.n_batch, P.n_heads, n_splits, P.seqlen_q, P.head_dim, dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty(o_part.shape[:-1], dtype=torch.float32, device=q.device)
    _decode_launch(P, q, k, v, o, lse, o_part, lse_part, cfg, n_splits, _flags(q, cc, False)).run()
    if n_splits > 1:
        _reduce_launch(P, o, lse, o_part, lse_part, n_splits).run()


_FORCE_SPLITS = None  # tests: a fixed number of key splits for the decoding kernel


def attention_backward(do, q, k, v, o, lse, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids,
                       dlse=None, cu_seqlens_k=None, max_seqlen_k=0, seqlens_k=None):
    """-> dq, dk, dv (contiguous, shaped like q, k, v)."""
    q, k, v, o, do = (unit_stride(t) for t in (q, k, v, o, do))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # rows of k past a sequence's seqlens_k are never visited: their gradient is zero
    new = torch.zeros if seqlens_k is not None else torch.empty
    dk = new(k.shape, dtype=k.dtype, device=k.device)
    dv = new(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    if dlse is not None:
        dlse = dlse.float().expand(lse.shape).contiguous()  # LSE's layout, which the kernel indexes
    P = _problem(q, k, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids,
                 cu_seqlens_k, max_seqlen_k, seqlens_k)
    cc = _cc(q)
    tma = use_tma(cc, P.head_dim, cos is not None, q, k, v, do, dq)
    if tma and q.is_cuda:
        _ensure_allocator()
    flags = _flags(q, cc, tma)
    delta = torch.empty_like(lse)
    qrot = torch.empty_like(dq) if cos is not None else dq  # the dq kernel writes q rotated for the dk/dv kernel
    ws_dq = warp_spec_ok(tma, cos is not None, var_k=P.lens_k is not None)
    ws_dkdv = warp_spec_ok(tma, cos is not None, q, do, var_k=P.lens_k is not None)
    stats = cu_st = None
    if ws_dq:  # (n_seq, 2 * n_heads, tokens): what _attn_bwd_stats writes for the warp-specialized kernels
        n_tok = P.seqlen_q
        if P.packed:  # each document starts on a multiple of 4 columns
            cu_st = torch.nn.functional.pad(torch.cumsum((P.cu[1:] - P.cu[:-1] + 3) // 4 * 4, 0), (1, 0))
            cu_st, n_tok = cu_st.to(torch.int32), q.shape[0] + 3 * P.n_batch
        stats = torch.empty(1 if P.packed else P.n_batch, 2 * P.n_heads, -(-n_tok // 4) * 4, dtype=torch.float32,
                            device=q.device)
    state = {"stats": False}  # whether stats holds this call's statistics
    rotary = cos is not None

    def run_dq(cfg: Config):
        if cfg.warp_spec:  # the statistics pass also writes delta, for a dk/dv kernel that is not specialized
            _stats_launch(P, o, do, lse, dlse, delta, stats, cu_st).run()
        state["stats"] = cfg.warp_spec
        _dq_launch(P, q, k, v, o, do, lse, delta, dq, qrot, dlse, cfg, flags, stats, cu_st).run()

    def run_dkdv(cfg: Config):
        if cfg.warp_spec and not state["stats"]:
            _stats_launch(P, o, do, lse, dlse, delta, stats, cu_st).run()
        _dkdv_launch(P, qrot if rotary else q, k, v, do, lse, delta, dk, dv, cfg, flags, stats, cu_st).run()

    key = _tune_key(P, tma)
    # the dq kernel writes delta (and qrot), which the dk/dv kernel reads
    _run_tuned("dq", cc, q, P.head_dim, rotary, key, run_dq, ws_dq)
    _run_tuned("dkdv", cc, q, P.head_dim, rotary, key, run_dkdv, ws_dkdv)
    return dq, dk, dv


# ---------------------------------------------------------------------------- torch.library registration
@torch.library.custom_op("meditron_kernels::triton_flash_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
            cu_seqlens: Optional[torch.Tensor], max_seqlen: int, cos: Optional[torch.Tensor],
            sin: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_k: int = 0,
            seqlens_k: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    # max_seqlen(_k) 0: unknown, measured from the offsets inside (a host sync a traced graph must not see)
    with device_of(q.device):  # the descriptors' scratch is allocated there too
        return attention_forward(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids,
                                 cu_seqlens_k, max_seqlen_k, seqlens_k)


@_fwd_op.register_fake
def _(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids, cu_seqlens_k=None,
      max_seqlen_k=0, seqlens_k=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), _lse_empty(q, cu_seqlens is not None)


@torch.library.custom_op("meditron_kernels::triton_flash_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, causal: bool, softmax_scale: float, cu_seqlens: Optional[torch.Tensor],
            max_seqlen: int, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
            position_ids: Optional[torch.Tensor], dlse: Optional[torch.Tensor] = None,
            cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_k: int = 0,
            seqlens_k: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_of(q.device):
        return attention_backward(do, q, k, v, o, lse, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin,
                                  position_ids, dlse, cu_seqlens_k, max_seqlen_k, seqlens_k)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids, dlse=None,
      cu_seqlens_k=None, max_seqlen_k=0, seqlens_k=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    (q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids, cu_seqlens_k, max_seqlen_k,
     seqlens_k) = inputs
    o, lse = output
    # an unused log-sum-exp then reaches the backward as None, not as zeros: nothing to add, and no
    # plain-tensor zeros beside DTensor inputs under tensor parallelism
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, cos, sin, position_ids, cu_seqlens_k, seqlens_k)
    ctx.causal, ctx.softmax_scale, ctx.max_seqlen, ctx.max_seqlen_k = causal, softmax_scale, max_seqlen, max_seqlen_k


def _backward(ctx, do, dlse):
    # dlse: None when the caller did not use the log-sum-exp (the public API returns it only with
    # return_lse=True); do: None when only the log-sum-exp was used
    q, k, v, o, lse, cu_seqlens, cos, sin, position_ids, cu_seqlens_k, seqlens_k = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.softmax_scale, cu_seqlens, ctx.max_seqlen, cos, sin,
                         position_ids, dlse, cu_seqlens_k, ctx.max_seqlen_k, seqlens_k)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- backend registration
def _check_kernel_limits(q: torch.Tensor, rotary) -> None:
    V.kernel_dtype(q, "q", "triton")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q: backend='triton' supports head_dim up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if rotary is not None and (rotary[0].requires_grad or rotary[1].requires_grad):
        raise ValueError("rotary: backend='triton' does not differentiate the cos/sin tables; pass them detached")


@register("flash_attention", "triton")
def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                    rotary=None, position_ids=None, cu_seqlens_k=None, max_seqlen_k=None, seqlens_k=None,
                    return_lse=False):
    """Batched: q (batch, sq, n_heads, d), k, v (batch, sk, n_kv_heads, d) -> (batch, sq, n_heads, d).
    Packed: q (total_q, n_heads, d), k, v (total_k, n_kv_heads, d), cu_seqlens (and cu_seqlens_k)
    (n_docs + 1,) -> (total_q, n_heads, d). return_lse: also the fp32 log-sum-exp, (batch, n_heads, sq)
    or (n_heads, total_q)."""
    _check_kernel_limits(q, rotary)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cos, sin = rotary if rotary is not None else (None, None)
    o, lse = _fwd_op(q, k, v, causal, scale, cu_seqlens, max_seqlen or 0, cos, sin, position_ids, cu_seqlens_k,
                     max_seqlen_k or 0, seqlens_k)
    return (o, lse) if return_lse else o


# ---------------------------------------------------------------------------- static report
def _launches(arch: int, dtype: torch.dtype, b: int, s: int, h: int, hkv: int, d: int, causal: bool = True,
              rotary: bool = False, configs: dict | None = None, prefix: str = "attention") -> list[Launch]:
    """The three launches of one batched call, configured as they run on ``arch`` (default configs, or
    ``configs`` {kernel: Config}: those kernels only). Tensors live on the meta device: the compiler
    reads only their dtype and alignment."""
    meta = dict(dtype=dtype, device="meta")
    q, o, do = (torch.empty(b, s, h, d, **meta) for _ in range(3))
    k, v = torch.empty(b, s, hkv, d, **meta), torch.empty(b, s, hkv, d, **meta)
    lse = torch.empty(b, h, s, dtype=torch.float32, device="meta")
    stats = torch.empty(b, 2 * h, -(-s // 4) * 4, dtype=torch.float32, device="meta")
    cos = sin = torch.empty(s, d // 2, dtype=torch.float32, device="meta") if rotary else None
    P = _Problem(False, b, s, s, h, hkv, d, causal, 1.0 / math.sqrt(d), None, None, None, cos, sin, None)
    flags = _flags(q, arch, use_tma(arch, d, rotary, q, k, v, do))
    if configs is None:
        configs = {kernel: default_config(kernel, arch, dtype, d, rotary) for kernel in ("fwd", "dq", "dkdv")}
    out = []
    for kernel, cfg in configs.items():
        if kernel == "fwd":
            launch = _fwd_launch(P, q, k, v, o, lse, cfg, flags)
        elif kernel == "dq":
            launch = _dq_launch(P, q, k, v, o, do, lse, lse, q, do, None, cfg, flags, stats)
        else:
            launch = _dkdv_launch(P, q, k, v, do, lse, lse, k, v, cfg, flags, stats)
        tag = f"_{cfg.block_m}x{cfg.block_n}_w{cfg.num_warps}_s{cfg.num_stages}" if cfg.warp_spec else ""
        launch.name = launch.name.replace("attention", prefix, 1) + f"{tag}@sm_{arch}"
        out.append(launch)
    return out


def _ws_launches(dtype: torch.dtype, b: int, s: int, h: int, hkv: int, d: int) -> list[Launch]:
    """Every warp-specialized sm_90 candidate for head_dim d (named by its tile), and the statistics
    pass the backward ones need."""
    meta = dict(dtype=dtype, device="meta")
    o, do = torch.empty(b, s, h, d, **meta), torch.empty(b, s, h, d, **meta)
    lse = torch.empty(b, h, s, dtype=torch.float32, device="meta")
    stats = torch.empty(b, 2 * h, -(-s // 4) * 4, dtype=torch.float32, device="meta")
    out = [launch for kernel in ("fwd", "dq", "dkdv") for cfg in _TABLE_WS[(kernel, 90, d, False)]
           for launch in _launches(90, dtype, b, s, h, hkv, d, configs={kernel: cfg}, prefix="attention_ws")]
    P = _Problem(False, b, s, s, h, hkv, d, True, 1.0 / math.sqrt(d), None, None, None, None, None, None)
    stats_launch = _stats_launch(P, o, do, lse, None, lse, stats, None)
    stats_launch.name = "attention_ws_bwd_stats@sm_90"
    return out + [stats_launch]


def _decode_launches(arch: int, dtype: torch.dtype, b: int, s: int, h: int, hkv: int, d: int) -> list[Launch]:
    """One decoding step (one query per sequence) against a cache of ``s`` keys with per-sequence
    lengths, split as it is on a GPU of 132 SMs, and the merge of the splits."""
    meta = dict(dtype=dtype, device="meta")
    q, o = torch.empty(b, 1, h, d, **meta), torch.empty(b, 1, h, d, **meta)
    k, v = torch.empty(b, s, hkv, d, **meta), torch.empty(b, s, hkv, d, **meta)
    lens = torch.empty(b, dtype=torch.int32, device="meta")
    lse = torch.empty(b, h, 1, dtype=torch.float32, device="meta")
    P = _Problem(False, b, 1, s, h, hkv, d, True, 1.0 / math.sqrt(d), None, None, lens, None, None, None)
    cfg = decode_config(arch, dtype, d)
    n_splits = decode_splits(b * hkv, s, 132)
    o_part = torch.empty(b, h, n_splits, 1, d, dtype=torch.float32, device="meta")
    lse_part = torch.empty(b, h, n_splits, 1, dtype=torch.float32, device="meta")
    launches = [_decode_launch(P, q, k, v, o, lse, o_part, lse_part, cfg, n_splits, _flags(q, arch, False)),
                _reduce_launch(P, o, lse, o_part, lse_part, n_splits)]
    for launch in launches:
        launch.name += f"@sm_{arch}"
    return launches


def static_launches(cc: int | None = None) -> list[Launch]:
    """The forward and backward launches of a Llama-2-70B layer (bf16, 64 query and 8 kv heads,
    head_dim 128, seq 4096, batch 4, causal), then a decoding step of the same layer (batch 1 against
    a 4096-token cache, split over the keys), configured as they run on ``cc`` (80 or 90; None: both;
    each launch's name ends in the architecture it is configured for). On sm_90 also the warp-specialized
    candidates of the same layer (named attention_ws_*)."""
    return [launch for arch in ((80, 90) if cc is None else (cc,))
            for launch in _launches(arch, torch.bfloat16, 4, 4096, 64, 8, 128)
            + _decode_launches(arch, torch.bfloat16, 1, 4096, 64, 8, 128)
            + (_ws_launches(torch.bfloat16, 4, 4096, 64, 8, 128) if arch == 90 else [])]
