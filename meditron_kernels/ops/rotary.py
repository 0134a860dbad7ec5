"""Rotary position embedding: q and k rotated in one launch, forward and backward.

A rotation by angle a maps the pair (x1, x2) to (x1 cos a - x2 sin a, x2 cos a + x1 sin a);
its gradient is the rotation by -a, so the backward is this same kernel with sin negated.
The angles come from tables (n_positions, head_dim // 2) read at each token's position, or
per token (batch or 1, seq, head_dim) as transformers' rotary embeddings hand them over, where
each element of a pair reads its own column (x1 c1 - x2 s1, x2 c2 + x1 s2); transposing that
map swaps and negates the sines, so the backward is again this kernel.

Bytes per token at Llama-2-70B shapes (64 q heads, 8 kv heads, head_dim 128, bf16):
16 KiB of q + 2 KiB of k read, the same written, and one 512-byte row of cos/sin that
is L2-resident (a 4096-position table is 2 MiB). At 16k tokens that is 604 MB, a floor
of 0.20 ms at the H100's 3.0 TB/s copy bandwidth. The kernel reads each input byte once,
writes each output byte once, and issues 128-bit accesses wherever alignment allows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _validate as V
from ..backend import register
from ._common import Launch, cast_rtne, soft_bf16, unit_stride

MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------- kernel
@triton.jit
def _rotary_tile(
    x_ptr,          # q or k; heads stride_xh apart, head_dim contiguous
    o_ptr,          # the matching dense output (tokens, heads, head_dim)
    x_tok,          # (BLOCK_T,) int64 offset of each token's first element in x
    o_tok,          # (BLOCK_T,) int64 offset of each token's first element in the output
    tok_ok,         # (BLOCK_T,) the token exists (the last token block is ragged)
    stride_xh,      # elements between consecutive heads of x
    n_heads,        # heads of x (q heads or kv heads)
    head_block,     # which BLOCK_H heads this program rotates
    c1, s1,         # (BLOCK_T, BLOCK_HALF) float32 cos, sin for the first element of each pair
    c2, s2,         # the same for the second element (equal to c1, s1 unless angles are per token)
    HALF: tl.constexpr,        # head_dim // 2: the number of rotated pairs
    BLOCK_HALF: tl.constexpr,  # HALF rounded up to a power of two
    BLOCK_H: tl.constexpr,     # heads per program
    INTERLEAVED: tl.constexpr,  # pairs are (2i, 2i + 1) instead of (i, i + HALF)
    SOFT_BF16: tl.constexpr,   # round bf16 outputs by hand (interpreter only, see cast_rtne)
):
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = (tok_ok[:, None] & (heads < n_heads)[None, :])[:, :, None]    # (BLOCK_T, BLOCK_H, 1)
    x_row = (x_tok[:, None] + heads[None, :] * stride_xh)[:, :, None]
    o_row = (o_tok[:, None] + heads[None, :] * (2 * HALF))[:, :, None]
    c1, s1 = c1[:, None, :], s1[:, None, :]
    c2, s2 = c2[:, None, :], s2[:, None, :]
    out_ty = o_ptr.dtype.element_ty
    if INTERLEAVED:
        # Load whole contiguous rows (full-width vector loads), then split the pairs in registers.
        j = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
        mask = row_ok & (j < 2 * HALF)
        x = tl.load(x_ptr + x_row + j, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (x.shape[0], BLOCK_H, BLOCK_HALF, 2)))
        o = tl.join(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2)
        o = tl.reshape(o, (x.shape[0], BLOCK_H, 2 * BLOCK_HALF))
        tl.store(o_ptr + o_row + j, cast_rtne(o, out_ty, SOFT_BF16), mask=mask)
    else:
        # Each half is HALF contiguous elements: two independent full-width loads per row.
        i = tl.arange(0, BLOCK_HALF)[None, None, :]
        mask = row_ok & (i < HALF)
        x1 = tl.load(x_ptr + x_row + i, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_row + HALF + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + o_row + i, cast_rtne(x1 * c1 - x2 * s1, out_ty, SOFT_BF16), mask=mask)
        tl.store(o_ptr + o_row + HALF + i, cast_rtne(x2 * c2 + x1 * s2, out_ty, SOFT_BF16), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,          # (batch, seq, n_heads_q, head_dim), any strides but a unit head_dim stride
    k_ptr,          # (batch, seq, n_heads_k, head_dim), likewise
    qo_ptr,         # (batch, seq, n_heads_q, head_dim) contiguous output
    ko_ptr,         # (batch, seq, n_heads_k, head_dim) contiguous output
    cos_ptr,        # (n_positions, HALF) table, or per token (batch or 1, seq, 2 * HALF); unit column stride
    sin_ptr,        # the same layout as cos
    pos_ptr,        # (batch or 1, seq) integer positions; unused unless HAS_POS
    n_tokens,       # batch * seq
    seq_len,        # seq: splits the flat token index into (batch, seq)
    n_heads_q,
    n_heads_k,
    n_positions,    # rows of the tables; positions are clamped into [0, n_positions)
    stride_qb, stride_qs, stride_qh,  # q strides in elements
    stride_kb, stride_ks, stride_kh,  # k strides in elements
    stride_cb, stride_cs,  # cos strides: (0, row) for a table; (batch, token) per token, batch 0 if broadcast
    stride_sb, stride_ss,  # sin strides, likewise
    stride_pb, stride_ps,  # position_ids strides (0 allowed: broadcast positions)
    HALF: tl.constexpr,        # head_dim // 2
    BLOCK_HALF: tl.constexpr,  # HALF rounded up to a power of two
    BLOCK_T: tl.constexpr,     # tokens per program (>1 only when a token's heads are a small tile)
    BLOCK_HQ: tl.constexpr,    # q heads per program
    BLOCK_HK: tl.constexpr,    # k heads per program (its own size: GQA has 8x fewer kv heads)
    INTERLEAVED: tl.constexpr,  # Meta's adjacent-pair layout instead of HF's rotate-half
    CONJUGATE: tl.constexpr,   # apply the transpose (rotate by -angle): the backward
    HAS_POS: tl.constexpr,     # read positions from pos_ptr, else position = index in seq
    PER_TOKEN: tl.constexpr,   # cos/sin hold each token's 2 * HALF angles (transformers' layout), not a table
    SOFT_BF16: tl.constexpr,   # round bf16 outputs by hand (interpreter only, see cast_rtne)
):
    # Grid: (token blocks, q head blocks + k head blocks). One launch covers q and k, and
    # each program reads the angle rows of its own BLOCK_T tokens only.
    token = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    head_block = tl.program_id(1)
    tok_ok = token < n_tokens
    b = token // seq_len
    t = token % seq_len
    i = tl.arange(0, BLOCK_HALF)
    cs_mask = tok_ok[:, None] & (i < HALF)[None, :]
    if PER_TOKEN:
        # Each element reads its own column: (i, HALF + i), or (2i, 2i + 1) when interleaved. The
        # interleaved row is loaded whole (one contiguous access) and split in registers.
        c_row = (b * stride_cb + t * stride_cs)[:, None]
        s_row = (b * stride_sb + t * stride_ss)[:, None]
        if INTERLEAVED:
            j = tl.arange(0, 2 * BLOCK_HALF)[None, :]
            row_mask = tok_ok[:, None] & (j < 2 * HALF)
            c = tl.load(cos_ptr + c_row + j, mask=row_mask, other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + s_row + j, mask=row_mask, other=0.0).to(tl.float32)
            c1, c2 = tl.split(tl.reshape(c, (c.shape[0], BLOCK_HALF, 2)))
            s1, s2 = tl.split(tl.reshape(s, (s.shape[0], BLOCK_HALF, 2)))
        else:
            c1 = tl.load(cos_ptr + c_row + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + c_row + HALF + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + s_row + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + s_row + HALF + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
    else:
        if HAS_POS:
            p = tl.load(pos_ptr + b * stride_pb + t * stride_ps, mask=tok_ok, other=0).to(tl.int64)
            # The launcher rejects out-of-range positions in eager mode; the clamp keeps a traced
            # (unchecked) call from ever reading outside the tables.
            p = tl.minimum(tl.maximum(p, 0), n_positions - 1)
        else:
            p = t
        c1 = tl.load(cos_ptr + p[:, None] * stride_cs + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + p[:, None] * stride_ss + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
        c2, s2 = c1, s1
    if CONJUGATE:
        # The transpose of the map (x1, x2) -> (x1 c1 - x2 s1, x2 c2 + x1 s2) is the same map with
        # s1, s2 replaced by -s2, -s1: for a table (s1 = s2) that is the rotation by -angle.
        s1, s2 = -s2, -s1
    n_q_blocks = tl.cdiv(n_heads_q, BLOCK_HQ)
    if head_block < n_q_blocks:
        _rotary_tile(q_ptr, qo_ptr, b * stride_qb + t * stride_qs, token * n_heads_q * (2 * HALF), tok_ok,
                     stride_qh, n_heads_q, head_block, c1, s1, c2, s2,
                     HALF, BLOCK_HALF, BLOCK_HQ, INTERLEAVED, SOFT_BF16)
    else:
        _rotary_tile(k_ptr, ko_ptr, b * stride_kb + t * stride_ks, token * n_heads_k * (2 * HALF), tok_ok,
                     stride_kh, n_heads_k, head_block - n_q_blocks, c1, s1, c2, s2,
                     HALF, BLOCK_HALF, BLOCK_HK, INTERLEAVED, SOFT_BF16)


# ---------------------------------------------------------------------------- config
# Elements per program. 4096 bf16 elements are 8 KiB in and 8 KiB out, 32 values per thread
# at 4 warps. At the 56 registers this compiles to on sm_90, 9 CTAs fit an SM: ~72 KiB of
# loads in flight per SM, ~9.5 MB across 132 SMs, three times what Little's law asks for at
# 3 TB/s and ~1 us of latency. Tokens are grouped only when one token's heads make a smaller
# tile (few or small heads), so that no program moves less than the others.
_TILE_ELEMS = 4096
# One thread moves 8 elements per access: a 128-bit vector of bf16/fp16.
_ELEMS_PER_THREAD = 8


def rotary_config(n_heads_q: int, n_heads_k: int, head_dim: int) -> tuple[dict, int]:
    """Constexprs and num_warps of the rotary kernel: used by the launcher and by static_launches()."""
    block_half = triton.next_power_of_2(head_dim // 2)
    cap = max(1, _TILE_ELEMS // (2 * block_half))
    block_hq = min(triton.next_power_of_2(max(n_heads_q, 1)), cap)
    block_hk = min(triton.next_power_of_2(max(n_heads_k, 1)), cap)
    block_t = max(1, cap // max(block_hq, block_hk))
    tile = block_t * max(block_hq, block_hk) * 2 * block_half
    num_warps = max(1, min(4, tile // (32 * _ELEMS_PER_THREAD)))
    meta = dict(HALF=head_dim // 2, BLOCK_HALF=block_half, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk)
    return meta, num_warps


# ---------------------------------------------------------------------------- launcher
def _launch(q, k, qo, ko, cos, sin, pos, interleaved: bool, conjugate: bool) -> Launch:
    """The launch that rotates q, k into qo, ko (tensors may be on the meta device for static checks)."""
    batch, seq, n_heads_q, head_dim = q.shape
    n_heads_k = k.shape[2]
    meta, num_warps = rotary_config(n_heads_q, n_heads_k, head_dim)
    has_pos = pos is not None
    per_token = cos.dim() == 3
    if per_token:  # (batch or 1, seq, head_dim); batch 1 is broadcast
        cos_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
        sin_strides = (sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1))
    else:  # (n_positions, head_dim // 2), indexed by position
        cos_strides, sin_strides = (0, cos.stride(0)), (0, sin.stride(0))
    args = dict(
        q_ptr=q, k_ptr=k, qo_ptr=qo, ko_ptr=ko, cos_ptr=cos, sin_ptr=sin,
        pos_ptr=pos if has_pos else cos,  # any pointer: never read
        n_tokens=batch * seq, seq_len=seq, n_heads_q=n_heads_q, n_heads_k=n_heads_k,
        n_positions=cos.shape[0] if not per_token else 1,
        stride_qb=q.stride(0), stride_qs=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k.stride(0), stride_ks=k.stride(1), stride_kh=k.stride(2),
        stride_cb=cos_strides[0], stride_cs=cos_strides[1], stride_sb=sin_strides[0], stride_ss=sin_strides[1],
        # position_ids (1, seq) serve every sequence of the batch
        stride_pb=(pos.stride(0) if pos.shape[0] > 1 else 0) if has_pos else 0,
        stride_ps=pos.stride(1) if has_pos else 0,
        INTERLEAVED=interleaved, CONJUGATE=conjugate, HAS_POS=has_pos, PER_TOKEN=per_token, SOFT_BF16=soft_bf16(qo),
        **meta,
    )
    head_blocks = triton.cdiv(n_heads_q, meta["BLOCK_HQ"]) + triton.cdiv(n_heads_k, meta["BLOCK_HK"])
    grid = (triton.cdiv(batch * seq, meta["BLOCK_T"]), head_blocks)
    name = f"rotary_{'interleaved' if interleaved else 'half'}{'_per_token' if per_token else ''}_" \
           f"{'bwd' if conjugate else 'fwd'}"
    return Launch(name, _rotary_kernel, args, num_warps=num_warps, num_stages=1, grid=grid)


def _rotate(q, k, cos, sin, pos, interleaved: bool, conjugate: bool):
    q, k, cos, sin = (unit_stride(t) for t in (q, k, cos, sin))
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, qo, ko, cos, sin, pos, interleaved, conjugate).run()
    return qo, ko


# ---------------------------------------------------------------------------- torch.library
@torch.library.custom_op("meditron_kernels::triton_apply_rotary", mutates_args=())
def _rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor | None, interleaved: bool,
               conjugate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k rotated by the angles at position_ids (by their negatives when conjugate): new contiguous tensors."""
    return _rotate(q, k, cos, sin, position_ids, interleaved, conjugate)


@_rotary_op.register_fake
def _(q, k, cos, sin, position_ids, interleaved, conjugate):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, position_ids, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.interleaved, ctx.conjugate = interleaved, conjugate


def _backward(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    dq, dk = _rotary_op(dq, dk, cos, sin, position_ids, ctx.interleaved, not ctx.conjugate)
    return dq, dk, None, None, None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- backend
@register("apply_rotary", "triton")
def apply_rotary(q, k, cos, sin, position_ids=None, interleaved=False):
    """q (batch, seq, n_heads, head_dim), k (batch, seq, n_kv_heads, head_dim) -> rotated q, k.

    cos, sin (max_positions, head_dim // 2), float32 preferred (fp16/bf16 are read as they are).
    Out of place; the outputs are contiguous. head_dim: any even size up to 256.
    """
    V.kernel_dtype(q, "q", "triton")
    V.kernel_dtype(cos, "cos", "triton")
    V.kernel_dtype(sin, "sin", "triton")
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM} for backend='triton', got {head_dim}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("backend='triton' does not differentiate through cos and sin; pass detached tables "
                         "(or use backend='torch' to learn them)")
    # position_ids were range-checked by the public API; under torch.compile, where that check
    # is skipped, the kernel clamps them so that it never reads outside the tables.
    return _rotary_op(q, k, cos, sin, position_ids, interleaved, False)


# ---------------------------------------------------------------------------- static checks
def static_launches() -> list[Launch]:
    """The run-time launches at Llama-2-70B shapes: 16k bf16 tokens (4 x 4096), 64 q heads,
    8 kv heads, head_dim 128, q and k as views of one fused qkv projection, both layouts,
    forward and backward; angles from fp32 tables, and per token in bf16 as a transformers
    model in bf16 hands them over (one (1, seq, head_dim) row set broadcast over the batch)."""
    batch, seq, hq, hk, d = 4, 4096, 64, 8, 128
    qkv = torch.empty(batch, seq, (hq + 2 * hk) * d, dtype=torch.bfloat16, device="meta")
    q = qkv[..., : hq * d].view(batch, seq, hq, d)
    k = qkv[..., hq * d: (hq + hk) * d].view(batch, seq, hk, d)
    qo = torch.empty(batch, seq, hq, d, dtype=torch.bfloat16, device="meta")
    ko = torch.empty(batch, seq, hk, d, dtype=torch.bfloat16, device="meta")
    cos = torch.empty(seq, d // 2, dtype=torch.float32, device="meta")
    pos = torch.empty(batch, seq, dtype=torch.int64, device="meta")
    cos_tok = torch.empty(1, seq, d, dtype=torch.bfloat16, device="meta")
    return [_launch(q, k, qo, ko, c, c, p, interleaved, conjugate)
            for c, p in ((cos, pos), (cos_tok, None))
            for interleaved in (False, True) for conjugate in (False, True)]
