"""SwiGLU, silu(gate) * up, as Triton kernels; also on the packed [gate | up] output of one
fused w1|w3 GEMM.

    out   = silu(g) * u                                   silu(g) = g * sigmoid(g)
    du    = dout * silu(g)
    dg    = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))

Element-wise and memory-bound. Bytes per element in a 16-bit dtype: the forward reads g and u
and writes out (6); the backward reads dout, g and u and writes dg and du (10). Nothing else is
saved or moved: the backward recomputes sigmoid(g) from g, which it reads anyway, and writes
fresh gradient tensors, never into its inputs. The packed entry point reads gate and up as two
column ranges of one (..., 2 * ffn) tensor and its backward writes both halves of one
(..., 2 * ffn) gradient, which is what the fused GEMM's backward consumes; no split or concat
copy is made in either direction.

All arithmetic is float32 with one rounding at the end (torch rounds silu(g) before the
product, and dout * u before the silu backward).

The kernels take the gate's activation as a constexpr: ops/geglu.py launches the same kernels
with GELU_TANH for GeGLU, gelu_tanh(gate) * up (Gemma's MLP), at the same bytes per element.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import _validate as V
from ..backend import register
from ._common import Launch, as_rows, cast_rtne, soft_bf16


# ---------------------------------------------------------------------------- kernels
SILU, GELU_TANH = 0, 1  # the ACT constexpr: the gate's activation (ops/geglu.py launches GELU_TANH)
_GELU_TANH = tl.constexpr(GELU_TANH)
_TWO_SQRT_2_OVER_PI = tl.constexpr(2 * 0.7978845608028654)  # 2 sqrt(2 / pi)
_GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _act_fwd(g, ACT: tl.constexpr):
    """float32 act(g). gelu_tanh(g) = g * (1 + tanh(z)) / 2 = g * sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3):
    one exp, no tanh (triton.language has none; libdevice's is GPU-only), and exact limits: exp overflows to inf (-> -0) for very
    negative g and underflows to 0 (-> g) for large g."""
    if ACT == _GELU_TANH:
        z2 = _TWO_SQRT_2_OVER_PI * (g + _GELU_CUBIC * g * g * g)
        return g / (1.0 + tl.exp(-z2))
    else:
        return g / (1.0 + tl.exp(-g))


@triton.jit
def _act_bwd(g, ACT: tl.constexpr):
    """float32 act(g) and act'(g) as a product of two factors s * t, s the sigmoid: exp(-x) overflows
    to inf for x < -88, s is then exactly 0 and so is the gradient."""
    if ACT == _GELU_TANH:
        z2 = _TWO_SQRT_2_OVER_PI * (g + _GELU_CUBIC * g * g * g)
        s = 1.0 / (1.0 + tl.exp(-z2))
        # d/dg g s(z2) = s (1 + g (1 - s) dz2/dg). Beyond |g| = 100, s is exactly 0 or 1 in float32, so
        # the second term is 0: g is clamped there to keep g^3 (inf from |g| ~ 1e13 on) out of 0 * inf.
        gc = tl.minimum(tl.maximum(g, -100.0), 100.0)
        t = 1.0 + gc * (1.0 - s) * (_TWO_SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * gc * gc))
    else:
        s = 1.0 / (1.0 + tl.exp(-g))
        t = 1.0 + g * (1.0 - s)
    return g * s, s, t


@triton.jit
def _tile(n_rows, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile: int64 row indices, column indices and the bounds
    mask. Column tiles vary fastest across program ids, so neighbouring programs stream
    neighbouring memory."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    rows = (pid // n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64), cols, mask


@triton.jit
def _swiglu_fwd_kernel(
    G,  # (rows, N) gate; unit column stride
    U,  # (rows, N) up; unit column stride
    O,  # (rows, N) out, contiguous
    stride_g,  # elements between rows of G
    stride_u,  # elements between rows of U
    n_rows,  # number of rows
    N,  # columns (ffn)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
    SOFT_BF16: tl.constexpr,  # bfloat16 output under the interpreter: see _common.cast_rtne
    ACT: tl.constexpr,  # the gate's activation: SILU (SwiGLU) or GELU_TANH (GeGLU)
):
    rows, cols, mask = _tile(n_rows, N, BLOCK_M, BLOCK_N)
    # float32 before any arithmetic: the precision we want, and the only correct form for
    # bfloat16 under the Triton interpreter.
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = _act_fwd(g, ACT) * u
    tl.store(O + rows[:, None] * N + cols[None, :], cast_rtne(out, O.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DO,  # (rows, N) gradient of out; unit column stride
    G,  # (rows, N) gate; unit column stride
    U,  # (rows, N) up; unit column stride
    DG,  # (rows, N) out: gradient of gate; unit column stride
    DU,  # (rows, N) out: gradient of up; unit column stride
    stride_do,  # elements between rows of DO
    stride_g,  # elements between rows of G
    stride_u,  # elements between rows of U
    stride_dg,  # elements between rows of DG (2 * N when DG and DU are halves of one packed gradient)
    stride_du,  # elements between rows of DU
    n_rows,  # number of rows
    N,  # columns (ffn)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
    SOFT_BF16: tl.constexpr,  # bfloat16 output under the interpreter: see _common.cast_rtne
    ACT: tl.constexpr,  # the gate's activation: SILU (SwiGLU) or GELU_TANH (GeGLU)
):
    rows, cols, mask = _tile(n_rows, N, BLOCK_M, BLOCK_N)
    do = tl.load(DO + rows[:, None] * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, s, t = _act_bwd(g, ACT)
    du = do * a
    dg = do * u * s * t
    tl.store(DG + rows[:, None] * stride_dg + cols[None, :], cast_rtne(dg, DG.dtype.element_ty, SOFT_BF16), mask=mask)
    tl.store(DU + rows[:, None] * stride_du + cols[None, :], cast_rtne(du, DU.dtype.element_ty, SOFT_BF16), mask=mask)


# ---------------------------------------------------------------------------- configuration
class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 1


# Elements per program: 24 KB of traffic per forward program and 40 KB per backward program
# in 16-bit, large enough that launch and tail costs vanish, small enough for many programs
# per SM (the latency hiding of a loop-free element-wise kernel).
TILE_ELEMS = 4096
ELEMS_PER_THREAD = 16  # two 128-bit vectors per 16-bit tensor per thread, four in float32


def swiglu_config(n_cols: int) -> Config:
    """Tile and warps for rows of ``n_cols`` (ffn) elements, forward and backward alike.
    Short rows are packed several to a tile so every program moves a full TILE_ELEMS."""
    block_n = min(triton.next_power_of_2(n_cols), TILE_ELEMS)
    block_m = TILE_ELEMS // block_n
    num_warps = max(1, min(16, block_m * block_n // (32 * ELEMS_PER_THREAD)))
    return Config(block_m, block_n, num_warps)


# ---------------------------------------------------------------------------- launchers
def _grid(n_rows: int, n_cols: int, cfg: Config) -> tuple[int]:
    return (triton.cdiv(n_rows, cfg.block_m) * triton.cdiv(n_cols, cfg.block_n),)


def _fwd_launch(g2, u2, out2, name: str = "swiglu_fwd", act: int = SILU) -> Launch:
    n_rows, n = g2.shape
    cfg = swiglu_config(n)
    args = dict(G=g2, U=u2, O=out2, stride_g=g2.stride(0), stride_u=u2.stride(0), n_rows=n_rows, N=n,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SOFT_BF16=soft_bf16(g2), ACT=act)
    return Launch(name, _swiglu_fwd_kernel, args, cfg.num_warps, cfg.num_stages, grid=_grid(n_rows, n, cfg))


def _bwd_launch(do2, g2, u2, dg2, du2, name: str = "swiglu_bwd", act: int = SILU) -> Launch:
    n_rows, n = g2.shape
    cfg = swiglu_config(n)
    args = dict(DO=do2, G=g2, U=u2, DG=dg2, DU=du2, stride_do=do2.stride(0), stride_g=g2.stride(0),
                stride_u=u2.stride(0), stride_dg=dg2.stride(0), stride_du=du2.stride(0), n_rows=n_rows, N=n,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SOFT_BF16=soft_bf16(g2), ACT=act)
    return Launch(name, _swiglu_bwd_kernel, args, cfg.num_warps, cfg.num_stages, grid=_grid(n_rows, n, cfg))


def _packed_halves(gate_up: torch.Tensor):
    """(..., 2F) -> gate, up as (rows, F) views of one (rows, 2F) tensor."""
    v = as_rows(gate_up)
    f = v.shape[1] // 2
    return v[:, :f], v[:, f:]


def _check(t: torch.Tensor, name: str) -> None:
    V.kernel_dtype(t, name, "triton")


# ---------------------------------------------------------------------------- torch ops
@torch.library.custom_op("meditron_kernels::triton_swiglu", mutates_args=())
def swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (...) -> silu(gate) * up (...)."""
    _check(gate, "gate")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        g2, u2 = as_rows(gate), as_rows(up)
        _fwd_launch(g2, u2, out.view(g2.shape)).run()
    return out


@swiglu_op.register_fake
def _(gate, up):
    _check(gate, "gate")
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("meditron_kernels::triton_swiglu_backward", mutates_args=())
def swiglu_backward_op(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dout, gate, up (...) -> dgate, dup (...)."""
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if dg.numel():
        g2 = as_rows(gate)
        _bwd_launch(as_rows(dout), g2, as_rows(up), dg.view(g2.shape), du.view(g2.shape)).run()
    return dg, du


@swiglu_backward_op.register_fake
def _(dout, gate, up):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(gate.shape, dtype=gate.dtype, device=gate.device))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dg, du = swiglu_backward_op(dout, gate, up)
    return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


swiglu_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("meditron_kernels::triton_swiglu_packed", mutates_args=())
def swiglu_packed_op(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2F) = [gate | up] -> silu(gate) * up (..., F)."""
    _check(gate_up, "gate_up")
    f = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], f), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        g2, u2 = _packed_halves(gate_up)
        _fwd_launch(g2, u2, out.view(g2.shape), "swiglu_packed_fwd").run()
    return out


@swiglu_packed_op.register_fake
def _(gate_up):
    _check(gate_up, "gate_up")
    return torch.empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=gate_up.dtype, device=gate_up.device)


@torch.library.custom_op("meditron_kernels::triton_swiglu_packed_backward", mutates_args=())
def swiglu_packed_backward_op(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """dout (..., F), gate_up (..., 2F) -> dgate_up (..., 2F) = [dgate | dup]."""
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dout.numel():
        g2, u2 = _packed_halves(gate_up)
        dg2, du2 = _packed_halves(dgu)
        _bwd_launch(as_rows(dout), g2, u2, dg2, du2, "swiglu_packed_bwd").run()
    return dgu


@swiglu_packed_backward_op.register_fake
def _(dout, gate_up):
    return torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)


def _setup_packed(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward_packed(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    return swiglu_packed_backward_op(dout, gate_up)


swiglu_packed_op.register_autograd(_backward_packed, setup_context=_setup_packed)


@register("swiglu", "triton")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (...) -> silu(gate) * up (...)."""
    return swiglu_op(gate, up)


@register("swiglu_packed", "triton")
def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2 * ffn) -> (..., ffn)."""
    return swiglu_packed_op(gate_up)


# ---------------------------------------------------------------------------- static checks
def static_launches() -> list[Launch]:
    """The launches of a 16k-token bf16 step at ffn 28672 (Llama-2-70B), plain and packed,
    built by the run-time launch functions on meta tensors."""
    rows, f = 16384, 28672

    def t(*shape):
        return torch.empty(shape, dtype=torch.bfloat16, device="meta")

    gu, dgu = t(rows, 2 * f), t(rows, 2 * f)
    g, u = gu[:, :f], gu[:, f:]
    dg, du = dgu[:, :f], dgu[:, f:]
    return [
        _fwd_launch(t(rows, f), t(rows, f), t(rows, f)),
        _bwd_launch(t(rows, f), t(rows, f), t(rows, f), t(rows, f), t(rows, f)),
        _fwd_launch(g, u, t(rows, f), "swiglu_packed_fwd"),
        _bwd_launch(t(rows, f), g, u, dg, du, "swiglu_packed_bwd"),
    ]
