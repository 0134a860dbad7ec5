"""Pieces shared by the Triton op modules."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, ty: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 ``x`` as ``ty``, rounded to nearest even.

    A GPU's cvt does that already. The Triton interpreter's fp32 -> bf16 cast truncates
    instead (and its explicit "rtne" mode drops the carry into the exponent), which doubles
    the error of every bf16 output; SOFT_BF16 (set only when interpreting) rounds by hand.
    """
    if SOFT_BF16 and ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, y, x.to(tl.bfloat16))
    else:
        return x.to(ty)


def interpreting() -> bool:
    """Kernels run under the Triton interpreter (read at launch, as Triton itself does)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_of(device: torch.device):
    """Context that makes ``device`` current: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def soft_bf16(t: torch.Tensor) -> bool:
    """Whether stores into ``t`` need cast_rtne's hand rounding: CPU tensors, which only the
    interpreter runs (meta tensors, used for the static GPU report, do not)."""
    return t.device.type == "cpu"
