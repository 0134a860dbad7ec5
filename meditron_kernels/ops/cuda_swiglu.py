"""SwiGLU on the compiled CUDA extension (csrc/swiglu.cu): the ``cuda`` backend of swiglu and
swiglu_packed.

    torch.ops.meditron_kernels.cuda_swiglu_fwd(gate, up) -> silu(gate) * up
    torch.ops.meditron_kernels.cuda_swiglu_bwd(dout, gate, up) -> (dgate, dup)
    torch.ops.meditron_kernels.cuda_swiglu_packed_fwd(gate_up) -> out      gate_up = [gate | up]
    torch.ops.meditron_kernels.cuda_swiglu_packed_bwd(dout, gate_up) -> dgate_up

Schemas and kernels come from csrc/bindings.cpp; fake kernels and autograd are registered here
once the extension is loaded. The backward recomputes sigmoid(gate); nothing else is stored.
"""
from __future__ import annotations

import torch

from .. import _cuda_ext
from .. import _validate as V
from ..backend import register


# ---------------------------------------------------------------------------- fake kernels
def _fwd_fake(gate, up):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def _bwd_fake(dout, gate, up):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


def _packed_fwd_fake(gate_up):
    return torch.empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=gate_up.dtype, device=gate_up.device)


def _packed_bwd_fake(dout, gate_up):
    return torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)


# ---------------------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.meditron_kernels.cuda_swiglu_bwd(dout.contiguous(), gate, up)
    return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


def _packed_backward(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.meditron_kernels.cuda_swiglu_packed_bwd(dout.contiguous(), gate_up)


def _register() -> None:
    torch.library.register_fake("meditron_kernels::cuda_swiglu_fwd")(_fwd_fake)
    torch.library.register_fake("meditron_kernels::cuda_swiglu_bwd")(_bwd_fake)
    torch.library.register_fake("meditron_kernels::cuda_swiglu_packed_fwd")(_packed_fwd_fake)
    torch.library.register_fake("meditron_kernels::cuda_swiglu_packed_bwd")(_packed_bwd_fake)
    torch.library.register_autograd("meditron_kernels::cuda_swiglu_fwd", _backward, setup_context=_setup)
    torch.library.register_autograd("meditron_kernels::cuda_swiglu_packed_fwd", _packed_backward,
                                    setup_context=_setup)


_cuda_ext.on_load(_register)


# ---------------------------------------------------------------------------- backend entries
@register("swiglu", "cuda")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, any matching shapes; inputs validated by the public API."""
    V.kernel_dtype(gate, "gate", "cuda")
    # Strided views (e.g. halves of a fused GEMM output) are copied once; swiglu_packed avoids that.
    return torch.ops.meditron_kernels.cuda_swiglu_fwd(gate.contiguous(), up.contiguous())


@register("swiglu_packed", "cuda")
def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2 * ffn) = [gate | up] -> (..., ffn)."""
    V.kernel_dtype(gate_up, "gate_up", "cuda")
    return torch.ops.meditron_kernels.cuda_swiglu_packed_fwd(gate_up.contiguous())
