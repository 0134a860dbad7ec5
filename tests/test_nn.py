"""meditron_kernels/nn.py: the module wrappers, on the torch backend and the Triton interpreter."""
import pytest
import torch
import torch.nn.functional as F

import meditron_kernels as mk
from meditron_kernels.nn import RMSNorm, SwiGLU


def test_rms_norm_module_parameters_and_init():
    norm = RMSNorm(64, eps=1e-6)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert torch.equal(norm.weight.detach(), torch.ones(64))
    with torch.no_grad():
        norm.weight.mul_(3)
    norm.reset_parameters()
    assert torch.equal(norm.weight.detach(), torch.ones(64))
    meta = RMSNorm(64, device="meta")
    meta.to_empty(device=torch.get_default_device())
    meta.reset_parameters()
    assert torch.equal(meta.weight.detach(), torch.ones(64))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rms_norm_module_calls_the_op(backend):
    norm = RMSNorm(96, eps=1e-6, backend=backend)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(96))
    x, r = torch.randn(2, 5, 96, requires_grad=True), torch.randn(2, 5, 96, requires_grad=True)
    y = norm(x)
    torch.testing.assert_close(y, mk.rms_norm(x, norm.weight, 1e-6, backend="torch"))
    y2, h = norm(x, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y2, mk.rms_norm(x + r, norm.weight, 1e-6, backend="torch"))
    (y.sum() + y2.sum() + h.sum()).backward()
    assert x.grad is not None and r.grad is not None and norm.weight.grad is not None


def test_swiglu_module_parameters_and_init():
    mlp = SwiGLU(32, 80)
    shapes = {n: tuple(p.shape) for n, p in mlp.named_parameters()}
    assert shapes == {"w1.weight": (80, 32), "w3.weight": (80, 32), "w2.weight": (32, 80)}
    mlp.reset_parameters(init_std=0.01)
    assert mlp.w1.weight.abs().max() <= 0.06 and mlp.w2.weight.abs().max() <= 0.03
    assert 0.005 < mlp.w3.weight.std() < 0.015
    meta = SwiGLU(32, 80, device="meta")
    meta.to_empty(device=torch.get_default_device())
    meta.reset_parameters()
    assert torch.isfinite(meta.w2.weight).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swiglu_module_calls_the_op(backend):
    mlp = SwiGLU(48, 112, backend=backend)
    x = torch.randn(3, 7, 48, requires_grad=True)
    out = mlp(x)
    expect = F.linear(F.silu(F.linear(x, mlp.w1.weight)) * F.linear(x, mlp.w3.weight), mlp.w2.weight)
    torch.testing.assert_close(out, expect)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *mlp.parameters()], g)
    want = torch.autograd.grad(expect, [x, *mlp.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- Gemma and Apertus pieces
def test_offset_rms_norm_module_starts_at_scale_one():
    from meditron_kernels.nn import RMSNorm

    norm = RMSNorm(16, eps=1e-6, offset=1.0)
    assert torch.equal(norm.weight.detach(), torch.zeros(16))  # Gemma's storage: a deviation from 1
    x = torch.randn(3, 16)
    torch.testing.assert_close(norm(x), mk.rms_norm(x, torch.ones(16), 1e-6), rtol=0, atol=0)
    assert "offset=1.0" in repr(norm)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_geglu_and_xielu_modules_call_the_ops(backend):
    from transformers.activations import XIELUActivation

    from meditron_kernels.nn import XIELU, GeGLU, XIELUMLP

    mlp = GeGLU(24, 40, backend=backend)
    x = torch.randn(2, 5, 24)
    expect = F.linear(F.gelu(F.linear(x, mlp.w1.weight), approximate="tanh") * F.linear(x, mlp.w3.weight),
                      mlp.w2.weight)
    torch.testing.assert_close(mlp(x), expect)
    # initialised as transformers' XIELUActivation, and the same function of x with its parameters
    act, hf = XIELU(backend=backend), XIELUActivation(dtype=torch.float32)
    assert [n for n, _ in act.named_parameters()] == ["alpha_p", "alpha_n"]
    torch.testing.assert_close(act.alpha_p, hf.alpha_p)
    torch.testing.assert_close(act.alpha_n, hf.alpha_n)
    torch.testing.assert_close(act(x), hf(x))
    xmlp = XIELUMLP(24, 40, backend=backend)
    torch.testing.assert_close(xmlp(x), F.linear(hf(F.linear(x, xmlp.w1.weight)), xmlp.w2.weight))
    out = xmlp(x.requires_grad_())
    out.sum().backward()
    assert all(p.grad is not None for p in xmlp.parameters())
