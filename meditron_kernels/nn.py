"""nn.Module wrappers over the functional ops."""
from __future__ import annotations

import torch
from torch import nn

import meditron_kernels as mk


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; forward(x, residual=None) -> y, or (y, x + residual)."""

    def __init__(self, hidden: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return mk.rms_norm(x, self.weight, self.eps, residual=residual)


class SwiGLU(nn.Module):
    """Llama's MLP: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, ffn_dim: int, device=None, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False, device=device, dtype=dtype)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(mk.swiglu(self.w1(x), self.w3(x)))
