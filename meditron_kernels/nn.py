"""Thin nn.Module wrappers over the functional ops.

Each module owns its parameters and calls one function of :mod:`meditron_kernels`; the
backend follows that function's resolution (``backend=None``: the process default, the
environment, or auto) unless the module is given one. Modules can be built on the meta
device and initialised later with ``reset_parameters()``.

Initialisation (shared with ``model.Llama``): projections are normal with mean 0, truncated at
3 standard deviations (:func:`init_normal_`); norm weights are ones.
"""
from __future__ import annotations

import torch
from torch import nn

import meditron_kernels as mk


def init_normal_(weight: torch.Tensor, std: float) -> None:
    """Normal(0, std) truncated at +-3 std, in place: the initialisation of every projection."""
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with float32 statistics; forward(x, residual) fuses the
    pre-norm residual add and returns (y, h = x + residual)."""

    def __init__(self, hidden: int, eps: float = 1e-5, *, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.hidden = hidden
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(hidden, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x (..., hidden) -> y (..., hidden); with residual (..., hidden) -> (y, h)."""
        return mk.rms_norm(x, self.weight, self.eps, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.hidden}, eps={self.eps}"


class SwiGLU(nn.Module):
    """The Llama MLP: w2(silu(w1(x)) * w3(x)), without biases.

    w1 is the gate projection, w3 the up projection, w2 the down projection (HF Llama's
    gate_proj, up_proj and down_proj).
    """

    def __init__(self, dim: int, ffn_dim: int, *, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.backend = backend
        self.w1 = nn.Linear(dim, ffn_dim, bias=False, device=device, dtype=dtype)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self, init_std: float = 0.02) -> None:
        """Normal, truncated at 3 std: std 0.02 for w1, ``init_std`` for w2 and w3, which a model
        scales with depth so the residual stream's variance does not grow with the layer count."""
        for linear, std in ((self.w1, 0.02), (self.w2, init_std), (self.w3, init_std)):
            init_normal_(linear.weight, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return self.w2(mk.swiglu(self.w1(x), self.w3(x), backend=self.backend))
