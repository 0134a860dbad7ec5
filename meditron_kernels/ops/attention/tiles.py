"""Tile helpers shared by every attention kernel: where a program's sequence and tiles are, how a
q/k/v tile is loaded (masked pointers or a TMA descriptor; q and k rotated as they arrive), and how a
result is stored. Also the tile widths the launchers give the kernels (D_PAD, QK_PAD)."""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import cast_rtne, interpreting

# constants visible inside kernels
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_INTERPRETED = tl.constexpr(interpreting())  # fixed at import, as triton.jit fixes interpreting


def _d_pad(head_dim: int) -> int:
    # tl.dot needs a reduction of at least 16; non-powers of two are padded with zero columns
    return max(16, triton.next_power_of_2(head_dim))


def _qk_pad(head_dim: int, rotary: bool) -> int:
    # width of a q/k tile: rotary keeps the two halves as separate tiles
    return max(16, triton.next_power_of_2(head_dim // 2)) if rotary else _d_pad(head_dim)


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
def _window_blocks(m0, Lq, Lk, off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr):
    # Local attention, the key blocks of query block m0 (query row r sees keys r + off - WIN_LEFT ..
    # r + off + WIN_RIGHT, CAUSAL: .. r + off) -> (lo, a, b, hi): the blocks from lo to hi meet the
    # band, and those in [a, b) lie inside every row's window and the sequence (no mask needed).
    # Blocks outside [lo, hi) are never visited: that is what makes a local layer cheap.
    first = m0 + off  # key aligned with the block's first row, then its last valid row
    last = tl.minimum(m0 + BLOCK_M, Lq) - 1 + off
    if WIN_LEFT >= 0:
        k_lo = tl.maximum(first - WIN_LEFT, 0)
        full_lo = tl.maximum(last - WIN_LEFT, 0)
    else:
        k_lo = first * 0
        full_lo = first * 0
    if WIN_RIGHT >= 0:
        k_hi = tl.minimum(last + WIN_RIGHT + 1, Lk)
        full_hi = tl.minimum(first + WIN_RIGHT + 1, Lk)
    elif CAUSAL:
        k_hi = tl.minimum(last + 1, Lk)
        full_hi = tl.minimum(first + 1, Lk)
    else:
        k_hi = Lk + first * 0
        full_hi = Lk + first * 0
    lo = (k_lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(k_hi, lo)
    a = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo), hi)
    b = tl.minimum(tl.maximum((tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N, a), hi)
    return lo, a, b, hi


@triton.jit
def _window_rows(aligned, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr):
    # -> (first, last) key each query sees, from the key it is aligned with (without a right bound:
    # the aligned key, which is the causal bound and is unused otherwise)
    if WIN_LEFT >= 0:
        first = aligned - WIN_LEFT
    else:
        first = aligned * 0 - 1
    if WIN_RIGHT >= 0:
        last = aligned + WIN_RIGHT
    else:
        last = aligned
    return first, last
