"""xIELU, Apertus's MLP activation, as Triton kernels with gradients for x and its two learned scalars.

With a_p = softplus(alpha_p) and a_n = beta + softplus(alpha_n) (transformers' XIELUActivation
stores alpha_p, alpha_n before the softplus; beta and eps are fixed buffers):

    y      = a_p x^2 + beta x                         x > 0
           = a_n (expm1(min(x, eps)) - x) + beta x    x <= 0
    dx     = dy (2 a_p x + beta)                      x > 0
           = dy (a_n (exp(x) [x < eps] - 1) + beta)   x <= 0 (half the exp term at x == eps, as torch.minimum)
    da_p   = sum over all elements of dy x^2 [x > 0]
    da_n   = sum over all elements of dy (expm1(min(x, eps)) - x) [x <= 0]

The kernel op takes the effective coefficients (a_p, a_n) as one (2,) float32 tensor; the softplus
and its gradient (one element each) stay in torch, in the backend function at the bottom, so the
op's autograd is the activation's alone. The scalar gradients are reduced deterministically: each
program writes its tile's two sums to its own slot of a (programs, 2) float32 buffer, which the
host sums in a fixed order; no atomics.

Element-wise and memory-bound: in a 16-bit dtype the forward reads x and writes y (4 bytes per
element), the backward reads dy and x and writes dx (6), plus 8 bytes per 4096 elements of partial
sums. x is read as one flat range: a non-contiguous x is copied once. Arithmetic is float32,
rounded once at the store.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _validate as V
from ..backend import register
from ._common import Launch, cast_rtne, soft_bf16


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _expm1(m):
    """float32 exp(m) - 1 without the cancellation of exp near 0: a degree-8 Taylor polynomial for
    |m| < 0.5 (its truncation error is below 2e-8 relative), exp(m) - 1 beyond."""
    p = 1.0 + m * (1.0 / 2 + m * (1.0 / 6 + m * (1.0 / 24 + m * (1.0 / 120 + m * (
        1.0 / 720 + m * (1.0 / 5040 + m * (1.0 / 40320)))))))
    return tl.where(tl.abs(m) < 0.5, m * p, tl.exp(m) - 1.0)


@triton.jit
def _xielu_fwd_kernel(
    X,  # (n,) input, contiguous
    COEF,  # (2,) float32: a_p = softplus(alpha_p), a_n = beta + softplus(alpha_n)
    Y,  # (n,) out, contiguous
    n,  # number of elements
    beta,  # the linear coefficient of both branches
    eps,  # the negative branch's clamp, min(x, eps) (-1e-6 in Apertus)
    BLOCK: tl.constexpr,  # elements per program
    SOFT_BF16: tl.constexpr,  # bfloat16 output under the interpreter: see _common.cast_rtne
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # float32 before any arithmetic: the precision we want, and the only correct form for bfloat16
    # under the Triton interpreter.
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    a_p = tl.load(COEF)
    a_n = tl.load(COEF + 1)
    neg = a_n * (_expm1(tl.minimum(x, eps)) - x)
    y = tl.where(x > 0, a_p * x * x, neg) + beta * x
    tl.store(Y + offs, cast_rtne(y, Y.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _xielu_bwd_kernel(
    DY,  # (n,) gradient of y, contiguous
    X,  # (n,) input, contiguous
    COEF,  # (2,) float32 a_p, a_n
    DX,  # (n,) out: gradient of x, contiguous
    PARTIAL,  # (programs, 2) float32 out: this program's sums for da_p and da_n
    n,  # number of elements
    beta,  # as in the forward
    eps,  # as in the forward
    BLOCK: tl.constexpr,  # elements per program
    SOFT_BF16: tl.constexpr,  # bfloat16 output under the interpreter: see _common.cast_rtne
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    a_p = tl.load(COEF)
    a_n = tl.load(COEF + 1)
    pos = x > 0
    em1 = _expm1(tl.minimum(x, eps))
    # d expm1(min(x, eps)) / dx = exp(x) = em1 + 1 below eps, 0 above, and half of it at x == eps
    # (torch.minimum's tie rule, which transformers' torch.min(x, eps) follows)
    d_min = tl.where(x < eps, 1.0, tl.where(x == eps, 0.5, 0.0))
    d_neg = a_n * (d_min * (em1 + 1.0) - 1.0)
    dx = dy * (tl.where(pos, 2.0 * a_p * x, d_neg) + beta)
    tl.store(DX + offs, cast_rtne(dx, DX.dtype.element_ty, SOFT_BF16), mask=mask)
    # masked lanes load x = dy = 0 and add nothing to either sum
    tl.store(PARTIAL + pid * 2, tl.sum(tl.where(pos, dy * x * x, 0.0), axis=0))
    tl.store(PARTIAL + pid * 2 + 1, tl.sum(tl.where(pos, 0.0, dy * (em1 - x)), axis=0))


# ---------------------------------------------------------------------------- configuration
# Elements per program, as the SwiGLU kernels: 16 KB of 16-bit traffic per forward program, small
# enough for many programs per SM; the backward's partials are then 2 floats per 4096 elements.
BLOCK = 4096
ELEMS_PER_THREAD = 16  # two 128-bit vectors per 16-bit tensor per thread, four in float32
NUM_WARPS = BLOCK // (32 * ELEMS_PER_THREAD)


# ---------------------------------------------------------------------------- launchers
def _fwd_launch(x1, coef, y1, beta: float, eps: float) -> Launch:
    n = x1.numel()
    args = dict(X=x1, COEF=coef, Y=y1, n=n, beta=beta, eps=eps, BLOCK=BLOCK, SOFT_BF16=soft_bf16(x1))
    return Launch("xielu_fwd", _xielu_fwd_kernel, args, NUM_WARPS, 1, grid=(triton.cdiv(n, BLOCK),))


def _bwd_launch(dy1, x1, coef, dx1, beta: float, eps: float) -> tuple[Launch, torch.Tensor]:
    """-> the launch and its (programs, 2) float32 partial sums buffer."""
    n = x1.numel()
    programs = triton.cdiv(n, BLOCK)
    partial = torch.empty((max(programs, 1), 2), dtype=torch.float32, device=x1.device)
    if programs == 0:
        partial.zero_()
    args = dict(DY=dy1, X=x1, COEF=coef, DX=dx1, PARTIAL=partial, n=n, beta=beta, eps=eps, BLOCK=BLOCK,
                SOFT_BF16=soft_bf16(x1))
    return Launch("xielu_bwd", _xielu_bwd_kernel, args, NUM_WARPS, 1, grid=(programs,)), partial


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(...) -> (n,): a view of a contiguous tensor, else one deliberate copy."""
    return t.contiguous().view(-1)


def _check(x: torch.Tensor, coef: torch.Tensor) -> None:
    V.kernel_dtype(x, "x", "triton")
    if coef.dtype != torch.float32 or coef.shape != (2,):
        raise ValueError(f"coef must be a (2,) float32 tensor (a_p, a_n), got {coef.dtype} {tuple(coef.shape)}")


# ---------------------------------------------------------------------------- torch ops
@torch.library.custom_op("meditron_kernels::triton_xielu", mutates_args=())
def xielu_op(x: torch.Tensor, coef: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """x (...), coef (2,) float32 = (a_p, a_n) -> y (...) in x.dtype."""
    _check(x, coef)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        _fwd_launch(_flat(x), coef.contiguous(), y.view(-1), beta, eps).run()
    return y


@xielu_op.register_fake
def _(x, coef, beta, eps):
    _check(x, coef)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("meditron_kernels::triton_xielu_backward", mutates_args=())
def xielu_backward_op(dy: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, beta: float,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x (...), coef (2,) -> dx (...) in x.dtype, dcoef (2,) float32."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch, partial = _bwd_launch(_flat(dy), _flat(x), coef.contiguous(), dx.view(-1), beta, eps)
    launch.run()
    return dx, partial.sum(0)


@xielu_backward_op.register_fake
def _(dy, x, coef, beta, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), coef.new_empty(2)


def _setup(ctx, inputs, output):
    x, coef, beta, eps = inputs
    ctx.save_for_backward(x, coef)
    ctx.beta, ctx.eps = beta, eps


def _backward(ctx, dy):
    x, coef = ctx.saved_tensors
    dx, dcoef = xielu_backward_op(dy, x, coef, ctx.beta, ctx.eps)
    return (dx if ctx.needs_input_grad[0] else None), (dcoef if ctx.needs_input_grad[1] else None), None, None


xielu_op.register_autograd(_backward, setup_context=_setup)


@register("xielu", "triton")
def xielu(x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """x (...), the raw one-element alpha_p, alpha_n -> (...); softplus on the scalars in torch."""
    coef = torch.cat((F.softplus(alpha_p.float().reshape(1)), beta + F.softplus(alpha_n.float().reshape(1))))
    return xielu_op(x, coef, beta, eps)


# ---------------------------------------------------------------------------- static checks
def static_launches() -> list[Launch]:
    """The launches of a 16k-token bf16 step at ffn 21504 (Apertus-8B), on meta tensors."""
    n = 16384 * 21504

    def t():
        return torch.empty(n, dtype=torch.bfloat16, device="meta")

    coef = torch.empty(2, dtype=torch.float32, device="meta")
    return [_fwd_launch(t(), coef, t(), 0.5, -1e-6), _bwd_launch(t(), t(), coef, t(), 0.5, -1e-6)[0]]
