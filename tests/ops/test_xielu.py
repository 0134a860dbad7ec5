"""meditron_kernels/ops/xielu.py: the Triton xIELU (Apertus's activation) under the interpreter on the
CPU, against the float64 reference: the output and the gradients of x, alpha_p and alpha_n."""
import pytest
import torch

import meditron_kernels as mk
from meditron_kernels.static import module_reports
from helpers import assert_close_rule, assert_static_clean
from meditron_kernels.ops import xielu as ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BETA, EPS = 0.5, -1e-6
# transformers' initialisation (a_p = a_n = 0.8) and a trained-looking pair
ALPHAS = [(0.2034, -1.0502), (1.3, 0.4)]


def _three_ways(x, alpha_p, alpha_n, dy):
    """-> {name: (triton, torch, reference)} for y and the gradients of x, alpha_p, alpha_n."""
    dy = dy.to(x.dtype)  # every way sees the same rounded gradient
    results = []
    for backend, cast in (("triton", None), ("torch", None), ("torch", torch.float64)):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (x, alpha_p, alpha_n)]
        y = mk.xielu(*leaves, BETA, EPS, backend=backend)
        grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
        results.append(dict(y=y, dx=grads[0], dalpha_p=grads[1], dalpha_n=grads[2]))
    return {k: tuple(r[k] for r in results) for k in results[0]}


@pytest.mark.parametrize("shape", [(37, 123), (3, 5, 1000), (4097,), ()], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy(dtype, shape):
    # x over [-6, 6]: both branches, the clamp region just below 0 and a few exact zeros
    x = 2 * torch.randn(shape)
    if x.numel() > 10:
        x.view(-1)[:4] = torch.tensor([0.0, -1e-7, EPS, -3e-3])
    alpha_p, alpha_n = (torch.tensor([a], dtype=dtype) for a in ALPHAS[x.numel() % 2])
    cases = _three_ways(x.to(dtype), alpha_p, alpha_n, torch.randn(shape))
    for name, (out, out_torch, ref) in cases.items():
        assert out.dtype == out_torch.dtype and out.shape == ref.shape
        assert_close_rule(out, out_torch, ref, factor=2.0 if name == "y" else 3.0, name=name)


def test_matches_transformers_xielu():
    pytest.importorskip("transformers")  # absent from the Triton 3.6 leg of .ci/run
    from transformers.activations import XIELUActivation

    act = XIELUActivation(alpha_p_init=1.1, alpha_n_init=0.7, dtype=torch.float32)
    x = torch.cat([3 * torch.randn(500), torch.tensor([0.0, -1e-7, -1e-6, -1e-5])]).requires_grad_()
    ref = act(x)
    ref_grads = torch.autograd.grad(ref, (x, act.alpha_p, act.alpha_n), torch.ones_like(ref))
    xs = x.detach().requires_grad_()
    for backend in ("triton", "torch"):
        ap, an = act.alpha_p.detach().clone().requires_grad_(), act.alpha_n.detach().clone().requires_grad_()
        y = mk.xielu(xs, ap, an, float(act.beta), float(act.eps), backend=backend)
        grads = torch.autograd.grad(y, (xs, ap, an), torch.ones_like(y))
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, ref_grads):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_scalar_gradients_are_deterministic_and_inputs_untouched():
    x = torch.randn(3 * ops.BLOCK + 17, dtype=torch.bfloat16)  # four programs, the last one partial
    dy = torch.randn_like(x)
    alpha_p, alpha_n = torch.tensor([0.3]), torch.tensor([-0.2])
    saved = [t.clone() for t in (x, dy, alpha_p, alpha_n)]
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, alpha_p, alpha_n)]
        runs.append(torch.autograd.grad(mk.xielu(*leaves, backend="triton"), leaves, dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    for a, b in zip(saved, (x, dy, alpha_p, alpha_n)):
        assert torch.equal(a, b)


def test_strided_and_empty_inputs():
    base = torch.randn(7, 40)
    x = base.t()  # not contiguous: copied once
    ap, an = torch.tensor([0.1], requires_grad=True), torch.tensor([0.2], requires_grad=True)
    y = mk.xielu(x, ap, an, backend="triton")
    torch.testing.assert_close(y, mk.xielu(x.contiguous(), ap, an, backend="torch"), rtol=1e-6, atol=1e-6)
    e = torch.randn(0, 5, requires_grad=True)
    ye = mk.xielu(e, ap, an, backend="triton")
    assert ye.shape == (0, 5)
    ge, gp, gn = torch.autograd.grad(ye.sum(), (e, ap, an))
    assert ge.shape == (0, 5) and gp.item() == 0 and gn.item() == 0


def test_bad_input():
    x, a = torch.randn(4, 8), torch.tensor([0.1])
    with pytest.raises(TypeError, match="x: backend='triton'"):
        mk.xielu(x.double(), a, a, backend="triton")
    with pytest.raises(ValueError, match="alpha_p must hold one element"):
        mk.xielu(x, torch.zeros(2), a)
    with pytest.raises(TypeError, match="alpha_n must be a torch.Tensor"):
        mk.xielu(x, a, 0.3)
    with pytest.raises(TypeError, match="beta must be a float"):
        mk.xielu(x, a, a, beta=torch.tensor(0.5))
    with pytest.raises(ValueError, match="eps must be finite"):
        mk.xielu(x, a, a, eps=float("nan"))


def test_opcheck():
    x = torch.randn(3, 5, 40, requires_grad=True)
    coef = torch.tensor([0.9, 0.7], requires_grad=True)
    torch.library.opcheck(ops.xielu_op, (x, coef, BETA, EPS))
    torch.library.opcheck(ops.xielu_backward_op, (torch.randn(3, 5, 40), x.detach(), coef.detach(), BETA, EPS))


def test_compile_fullgraph_matches_eager():
    def f(x, ap, an):
        return mk.xielu(x, ap, an, BETA, EPS, backend="triton")

    args = [torch.randn(6, 96, requires_grad=True), torch.tensor([0.3], requires_grad=True),
            torch.tensor([-0.4], requires_grad=True)]
    g = torch.randn(6, 96)
    torch._dynamo.reset()
    eager, comp = f(*args), torch.compile(f, fullgraph=True)(*args)
    torch.testing.assert_close(eager, comp, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(eager, args, g), torch.autograd.grad(comp, args, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------- static GPU checks
@pytest.fixture(scope="module")
def static_reports():
    return module_reports("meditron_kernels.ops.xielu")


@pytest.mark.slow
@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("name", [launch.name for launch in ops.static_launches()])
def test_static_compile(static_reports, name, cc):
    assert_static_clean(static_reports[f"{name}@{cc}"])
