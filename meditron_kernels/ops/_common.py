"""Pieces shared by the Triton op modules: how a kernel is launched (:class:`Launch`), the
unit-stride rule for inputs, and bf16 rounding under the interpreter."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import triton
import triton.language as tl

from ..backend import interpreting

__all__ = ["Launch", "as_rows", "cast_rtne", "device_of", "interpreting", "soft_bf16", "unit_stride"]


@dataclasses.dataclass
class Launch:
    """One kernel launch: the kernel, its arguments by name (tensors, ints, floats and constexprs,
    exactly as passed at run time), its launch options and grid.

    Each op builds its launches in one function per kernel, called both at run time (then
    :meth:`run`) and by ``static_launches()`` on meta tensors for the static GPU report
    (``meditron_kernels.static``): the configuration the report checks is the one that runs.
    """
    name: str
    kernel: Any
    args: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    grid: tuple[int, ...] = (1,)

    def run(self) -> None:
        """Launch the kernel on the device of its tensor arguments; an empty grid launches nothing."""
        if 0 in self.grid:
            return
        device = next(v.device for v in self.args.values() if isinstance(v, torch.Tensor))
        with device_of(device):
            self.kernel[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)


def device_of(device: torch.device):
    """Context that makes ``device`` current: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is unit-stride, else one deliberate contiguous copy.

    The kernels index rows, heads and tokens through their strides (slices of a fused projection
    are read in place) but vectorise along the last dimension, which a stride there would make
    scalar; a rare strided last dimension (a transposed view, an expanded gradient) is copied once.
    """
    return t if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N) with unit column stride: a view when the strides allow it, else one
    deliberate copy (see :func:`unit_stride`)."""
    if t.dim() == 0:
        t = t.reshape(1)
    n = t.shape[-1]
    if t.stride(-1) == 1:
        try:
            return t.view(-1, n)
        except RuntimeError:
            pass
    return t.contiguous().view(-1, n)


def soft_bf16(t: torch.Tensor) -> bool:
    """The SOFT_BF16 constexpr of a launch on ``t``: whether stores need cast_rtne's hand rounding,
    that is, whether the launch runs under the interpreter. Meta tensors are the static report's,
    compiled for a GPU, so they never do."""
    return interpreting() and t.device.type != "meta"


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
