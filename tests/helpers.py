"""Shared test utilities: the accuracy rule of docs/design.md ("Accuracy rule")."""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_rule(out: torch.Tensor, out_torch: torch.Tensor, ref: torch.Tensor, factor: float = 2.0,
                      atol: float = 1e-6, name: str = "output") -> None:
    """max|out - ref| <= factor * max|out_torch - ref| + atol, where ref is the fp32/fp64
    reference and out_torch is plain PyTorch in out's dtype."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, ref)
    base = max_err(out_torch, ref)
    assert err <= factor * base + atol, f"{name}: error {err:.3e} > {factor} x torch error {base:.3e} + {atol:.0e}"
