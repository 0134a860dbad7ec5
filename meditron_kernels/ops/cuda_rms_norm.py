"""RMSNorm on the compiled CUDA extension (csrc/rms_norm.cu): the ``cuda`` backend of rms_norm.

The op schemas and CUDA kernels come from csrc/bindings.cpp (``meditron_kernels._C``). This
module adds what torch needs around them, fake kernels and autograd, once the extension is
loaded, and registers the backend entry either way: without the extension, backend="cuda"
fails in the dispatcher with a message saying how to build it.

    torch.ops.meditron_kernels.cuda_rms_norm_fwd(x, weight, eps) -> y
    torch.ops.meditron_kernels.cuda_rms_norm_residual_fwd(x, residual, weight, eps) -> (y, h)
    torch.ops.meditron_kernels.cuda_rms_norm_bwd(dy, h, weight, dh?, eps, need_dweight) -> (dx, dweight)

The backward recomputes rstd from h (the forward stores nothing but its outputs) and reduces
dweight deterministically: fp32 partials per block, then a fixed-order sum.
"""
from __future__ import annotations

import torch

from .. import _cuda_ext
from .. import _validate as V
from ..backend import register

# Mirrors rms_norm_max_hidden() in csrc/kernels.h: a row is held in registers by at most 512
# threads, 16 registers per operand each, so 16-byte rows (hidden * itemsize % 16 == 0) reach
# 16384 elements in 16-bit dtypes and 8192 in fp32; other rows go element by element, 8192.
_MAX_THREADS = 512
_REGS_PER_OPERAND = 16


def max_hidden(dtype: torch.dtype, hidden: int) -> int:
    """Largest hidden size the CUDA kernels take for rows of ``hidden`` elements of ``dtype``."""
    size = dtype.itemsize
    vectorized = hidden * size % 16 == 0
    return _MAX_THREADS * _REGS_PER_OPERAND * (4 // size if vectorized else 1)


# ---------------------------------------------------------------------------- fake kernels
def _fwd_fake(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _residual_fwd_fake(x, residual, weight, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


def _bwd_fake(dy, h, weight, dh, eps, need_dweight):
    return (torch.empty(h.shape, dtype=h.dtype, device=h.device),
            torch.empty((weight.shape[0] if need_dweight else 0,), dtype=weight.dtype, device=weight.device))


# ---------------------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = torch.ops.meditron_kernels.cuda_rms_norm_bwd(
        dy.contiguous(), x, weight, None, ctx.eps, ctx.needs_input_grad[1])
    return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None


def _residual_setup(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)  # h = x + residual: the normalised input
    ctx.eps = eps


def _residual_backward(ctx, dy, dh):
    h, weight = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dw = torch.ops.meditron_kernels.cuda_rms_norm_bwd(
        dy.contiguous(), h, weight, None if dh is None else dh.contiguous(), ctx.eps, ctx.needs_input_grad[2])
    dx = dx if need_dx else None
    return (dx if ctx.needs_input_grad[0] else None, dx if ctx.needs_input_grad[1] else None,
            dw if ctx.needs_input_grad[2] else None, None)


def _register() -> None:
    torch.library.register_fake("meditron_kernels::cuda_rms_norm_fwd")(_fwd_fake)
    torch.library.register_fake("meditron_kernels::cuda_rms_norm_residual_fwd")(_residual_fwd_fake)
    torch.library.register_fake("meditron_kernels::cuda_rms_norm_bwd")(_bwd_fake)
    torch.library.register_autograd("meditron_kernels::cuda_rms_norm_fwd", _backward, setup_context=_setup)
    torch.library.register_autograd("meditron_kernels::cuda_rms_norm_residual_fwd", _residual_backward,
                                    setup_context=_residual_setup)


_cuda_ext.on_load(_register)


# ---------------------------------------------------------------------------- backend entry
@register("rms_norm", "cuda")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None):
    """x (..., hidden), weight (hidden,) -> y, or (y, h) with residual; inputs validated by the public API."""
    V.kernel_dtype(x, "x", "cuda")
    V.kernel_dtype(weight, "weight", "cuda")
    hidden = x.shape[-1]
    limit = max_hidden(x.dtype, hidden)
    if hidden > limit:
        raise ValueError(f"x: backend='cuda' supports hidden <= {limit} for {x.dtype} rows of {hidden} elements "
                         "(a row is held in registers); use backend='triton' or 'torch'")
    ops = torch.ops.meditron_kernels
    # Strided inputs are copied once here; the kernels read rows of contiguous memory.
    if residual is None:
        return ops.cuda_rms_norm_fwd(x.contiguous(), weight.contiguous(), float(eps))
    return ops.cuda_rms_norm_residual_fwd(x.contiguous(), residual.contiguous(), weight.contiguous(), float(eps))
