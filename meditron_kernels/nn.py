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
    pre-norm residual add and returns (y, h = x + residual). offset=1.0 scales by (1 + weight),
    Gemma's form (mk.rms_norm's ``offset``); the weight starts at 1 - offset, a scale of 1."""

    def __init__(self, hidden: int, eps: float = 1e-5, *, offset: float = 0.0, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.hidden = hidden
        self.eps = eps
        self.offset = offset
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(hidden, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x (..., hidden) -> y (..., hidden); with residual (..., hidden) -> (y, h)."""
        return mk.rms_norm(x, self.weight, self.eps, residual=residual, offset=self.offset, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.hidden}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")


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


class GeGLU(SwiGLU):
    """Gemma's MLP: w2(gelu_tanh(w1(x)) * w3(x)), without biases; SwiGLU's projections and init."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return self.w2(mk.geglu(self.w1(x), self.w3(x), backend=self.backend))


class XIELU(nn.Module):
    """Apertus's activation with transformers' parameters: ``alpha_p``, ``alpha_n`` (one element each,
    before their softplus; the names of XIELUActivation's state dict) and the fixed beta, eps, kept as
    floats (a checkpoint's ``beta``, ``eps`` buffers go to the constructor). Initialised as
    transformers does: a_p = alpha_p_init, a_n = alpha_n_init."""

    def __init__(self, alpha_p_init: float = 0.8, alpha_n_init: float = 0.8, beta: float = 0.5, eps: float = -1e-6,
                 *, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.alpha_p_init, self.alpha_n_init, self.beta, self.eps = alpha_p_init, alpha_n_init, beta, eps
        self.backend = backend
        self.alpha_p = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.alpha_n = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # softplus^-1(a) = log(expm1(a)), so softplus(alpha_p) = alpha_p_init and beta + softplus(alpha_n) = alpha_n_init
        with torch.no_grad():
            for p, a in ((self.alpha_p, self.alpha_p_init), (self.alpha_n, self.alpha_n_init - self.beta)):
                p.fill_(torch.tensor(a, dtype=torch.float64).expm1().log().item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (...) -> (...)."""
        return mk.xielu(x, self.alpha_p, self.alpha_n, self.beta, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, eps={self.eps}"


class XIELUMLP(nn.Module):
    """Apertus's MLP: w2(xielu(w1(x))), without biases and without a gate. w1 is HF's up_proj, w2
    its down_proj, act its act_fn (alpha_p, alpha_n)."""

    def __init__(self, dim: int, ffn_dim: int, *, beta: float = 0.5, eps: float = -1e-6, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False, device=device, dtype=dtype)
        self.act = XIELU(beta=beta, eps=eps, backend=backend, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self, init_std: float = 0.02) -> None:
        """w1 normal with std 0.02, w2 with ``init_std`` (scaled with depth by a model), both truncated."""
        init_normal_(self.w1.weight, 0.02)
        init_normal_(self.w2.weight, init_std)
        self.act.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return self.w2(self.act(self.w1(x)))
