"""GeGLU, gelu_tanh(gate) * up (Gemma's MLP), plain and on the packed [gate | up] output of one
fused GEMM: the SwiGLU kernels of ops/swiglu.py launched with the tanh-GELU gate.

    out   = gelu(g) * u              gelu(g) = g * (1 + tanh(z)) / 2 = g * sigmoid(2z)
                                     z = sqrt(2 / pi) * (g + 0.044715 g^3)
    du    = dout * gelu(g)
    dg    = dout * u * gelu'(g)      gelu'(g) = s * (1 + g * (1 - s) * 2 sqrt(2 / pi) (1 + 3 * 0.044715 g^2)),
                                     s = sigmoid(2z)

torch's ``gelu(approximate="tanh")`` is the same function. Bytes per element are SwiGLU's (a 16-bit
forward moves 6, the backward 10); the extra arithmetic (a cube and one more multiply-add) is
hidden under memory time. There is no CUDA-extension backend: the Triton kernel and the torch
reference are the two implementations.
"""
from __future__ import annotations

import torch

from ..backend import register
from ._common import as_rows
from .swiglu import GELU_TANH, _bwd_launch, _check, _fwd_launch, _packed_halves


# ---------------------------------------------------------------------------- torch ops
@torch.library.custom_op("meditron_kernels::triton_geglu", mutates_args=())
def geglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (...) -> gelu_tanh(gate) * up (...)."""
    _check(gate, "gate")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        g2, u2 = as_rows(gate), as_rows(up)
        _fwd_launch(g2, u2, out.view(g2.shape), "geglu_fwd", GELU_TANH).run()
    return out


@geglu_op.register_fake
def _(gate, up):
    _check(gate, "gate")
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("meditron_kernels::triton_geglu_backward", mutates_args=())
def geglu_backward_op(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dout, gate, up (...) -> dgate, dup (...)."""
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if dg.numel():
        g2 = as_rows(gate)
        _bwd_launch(as_rows(dout), g2, as_rows(up), dg.view(g2.shape), du.view(g2.shape), "geglu_bwd",
                    GELU_TANH).run()
    return dg, du


@geglu_backward_op.register_fake
def _(dout, gate, up):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(gate.shape, dtype=gate.dtype, device=gate.device))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dg, du = geglu_backward_op(dout, gate, up)
    return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


geglu_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("meditron_kernels::triton_geglu_packed", mutates_args=())
def geglu_packed_op(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2F) = [gate | up] -> gelu_tanh(gate) * up (..., F)."""
    _check(gate_up, "gate_up")
    f = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], f), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        g2, u2 = _packed_halves(gate_up)
        _fwd_launch(g2, u2, out.view(g2.shape), "geglu_packed_fwd", GELU_TANH).run()
    return out


@geglu_packed_op.register_fake
def _(gate_up):
    _check(gate_up, "gate_up")
    return torch.empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=gate_up.dtype, device=gate_up.device)


@torch.library.custom_op("meditron_kernels::triton_geglu_packed_backward", mutates_args=())
def geglu_packed_backward_op(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """dout (..., F), gate_up (..., 2F) -> dgate_up (..., 2F) = [dgate | dup]."""
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dout.numel():
        g2, u2 = _packed_halves(gate_up)
        dg2, du2 = _packed_halves(dgu)
        _bwd_launch(as_rows(dout), g2, u2, dg2, du2, "geglu_packed_bwd", GELU_TANH).run()
    return dgu


@geglu_packed_backward_op.register_fake
def _(dout, gate_up):
    return torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)


def _setup_packed(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward_packed(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    return geglu_packed_backward_op(dout, gate_up)


geglu_packed_op.register_autograd(_backward_packed, setup_context=_setup_packed)


@register("geglu", "triton")
def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (...) -> gelu_tanh(gate) * up (...)."""
    return geglu_op(gate, up)


@register("geglu_packed", "triton")
def geglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2 * ffn) -> (..., ffn)."""
    return geglu_packed_op(gate_up)


# ---------------------------------------------------------------------------- static checks
def static_launches():
    """The launches of a 16k-token bf16 step at ffn 15360 (Gemma-3-12B), plain and packed, built by
    the run-time launch functions on meta tensors."""
    rows, f = 16384, 15360

    def t(*shape):
        return torch.empty(shape, dtype=torch.bfloat16, device="meta")

    gu, dgu = t(rows, 2 * f), t(rows, 2 * f)
    g, u = gu[:, :f], gu[:, f:]
    dg, du = dgu[:, :f], dgu[:, f:]
    return [
        _fwd_launch(t(rows, f), t(rows, f), t(rows, f), "geglu_fwd", GELU_TANH),
        _bwd_launch(t(rows, f), t(rows, f), t(rows, f), t(rows, f), t(rows, f), "geglu_bwd", GELU_TANH),
        _fwd_launch(g, u, t(rows, f), "geglu_packed_fwd", GELU_TANH),
        _bwd_launch(t(rows, f), g, u, dg, du, "geglu_packed_bwd", GELU_TANH),
    ]
