"""Rotary embedding on the compiled CUDA extension (csrc/rotary.cu): the ``cuda`` backend of
apply_rotary.

    torch.ops.meditron_kernels.cuda_apply_rotary(q, k, cos, sin, position_ids?, interleaved, conjugate)
        -> (q_rotated, k_rotated)

One launch rotates q and k (GQA: k has its own head count). conjugate=True rotates by the
negative angle, which is the backward: the rotation is orthogonal, so its transpose is its
inverse, and the op's gradient is the op itself with conjugate flipped (so it is also
differentiable twice). q and k may be strided views (e.g. of a fused qkv projection) as long
as head_dim is contiguous; outputs are contiguous. A position outside the tables yields NaN.
"""
from __future__ import annotations

import torch

from .. import _cuda_ext
from .. import _validate as V
from ..backend import register


# ---------------------------------------------------------------------------- fake kernel
def _fake(q, k, cos, sin, position_ids, interleaved, conjugate):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


# ---------------------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    q, k, cos, sin, position_ids, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.interleaved, ctx.conjugate = interleaved, conjugate
    ctx.shapes = (q.shape, k.shape)


def _backward(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    ref = dq if dq is not None else dk
    dq = torch.zeros(ctx.shapes[0], dtype=ref.dtype, device=ref.device) if dq is None else dq
    dk = torch.zeros(ctx.shapes[1], dtype=ref.dtype, device=ref.device) if dk is None else dk
    gq, gk = torch.ops.meditron_kernels.cuda_apply_rotary(
        _last_dim_contiguous(dq), _last_dim_contiguous(dk), cos, sin, position_ids, ctx.interleaved,
        not ctx.conjugate)
    return gq, gk, None, None, None, None, None


def _register() -> None:
    torch.library.register_fake("meditron_kernels::cuda_apply_rotary")(_fake)
    torch.library.register_autograd("meditron_kernels::cuda_apply_rotary", _backward, setup_context=_setup)


_cuda_ext.on_load(_register)


# ---------------------------------------------------------------------------- backend entry
def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernel follows batch/seq/head strides; only head_dim must be dense.
    return t if t.stride(-1) == 1 else t.contiguous()


@register("apply_rotary", "cuda")
def apply_rotary(q, k, cos, sin, position_ids=None, interleaved=False):
    """q (batch, seq, n_heads, head_dim), k (batch, seq, n_kv_heads, head_dim) -> rotated q, k.

    The tables get no gradient (they are constants of the model). They are read as float32:
    other dtypes are converted once, as the reference converts them to float32 for every op.
    """
    V.kernel_dtype(q, "q", "cuda")
    if cos.dim() == 3:
        raise NotImplementedError("apply_rotary: backend='cuda' reads 2-D tables (max_positions, head_dim // 2); "
                                  "per-token cos and sin (batch, seq, head_dim) run on backend='triton' or 'torch'")
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    if position_ids is not None:
        # (1, seq) positions serve the whole batch; the kernel indexes (batch, seq).
        position_ids = position_ids.expand(q.shape[0], q.shape[1]).contiguous()
    return torch.ops.meditron_kernels.cuda_apply_rotary(
        _last_dim_contiguous(q), _last_dim_contiguous(k), cos, sin, position_ids, interleaved, False)
