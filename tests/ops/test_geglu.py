"""meditron_kernels/ops/geglu.py: the Triton GeGLU (the SwiGLU kernels with the tanh-GELU gate), plain
and packed, under the interpreter on the CPU. The kernels' tiling, strides and packed halves are
SwiGLU's and tested there; this file covers the GELU arithmetic and GeGLU's own ops."""
import pytest
import torch

import meditron_kernels as mk
from meditron_kernels.static import module_reports
from helpers import assert_close_rule, assert_static_clean
from meditron_kernels.ops import geglu as ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 123), (2, 5, 1000), ()]


def _three_ways(fn, inputs, dout):
    """fn on triton, on torch in the same dtype and on torch in float64, output and every gradient.
    -> {name: (triton, torch, reference)}."""
    results = []
    dout = dout.to(inputs[0].dtype)  # every way sees the same rounded gradient
    for backend, cast in (("triton", None), ("torch", None), ("torch", torch.float64)):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in inputs]
        out = fn(*leaves, backend=backend)
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
        results.append({"out": out, **{f"d{i}": g for i, g in enumerate(grads)}})
    return {k: tuple(r[k] for r in results) for k in results[0]}


def _assert_rule(cases):
    for name, (out, out_torch, ref) in cases.items():
        assert out.dtype == out_torch.dtype
        assert_close_rule(out, out_torch, ref, factor=2.0 if name == "out" else 3.0, name=name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_plain_and_packed(dtype, shape):
    # gates over [-6, 6]: both tails of the GELU and the cubic's region
    gate, up = 2 * torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    _assert_rule(_three_ways(mk.geglu, [gate, up], torch.randn(shape)))
    ffn = shape[-1] if shape else 5
    lead = shape[:-1] if shape else ()
    gate_up = torch.cat([2 * torch.randn(*lead, ffn, dtype=dtype), torch.randn(*lead, ffn, dtype=dtype)], dim=-1)
    cases = _three_ways(mk.geglu_packed, [gate_up], torch.randn(*lead, ffn))
    assert cases["d0"][0].shape == gate_up.shape  # one (..., 2 * ffn) gradient
    _assert_rule(cases)


def test_packed_equals_plain_and_strided_inputs():
    wide = torch.randn(6, 2 * 300 + 8, dtype=torch.bfloat16)
    gate_up = wide[:, 8:].requires_grad_()  # row stride 608, halves at unaligned offsets: read in place
    dout = torch.randn(6, 300, dtype=torch.bfloat16)
    out = mk.geglu_packed(gate_up, backend="triton")
    (dgu,) = torch.autograd.grad(out, gate_up, dout)
    g, u = (t.requires_grad_() for t in gate_up.detach().t().contiguous().t().chunk(2, dim=-1))  # column-major
    out2 = mk.geglu(g, u, backend="triton")
    dg, du = torch.autograd.grad(out2, (g, u), dout)
    assert torch.equal(out, out2)
    assert torch.equal(dgu, torch.cat([dg, du], dim=-1))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_extreme_gates_stay_finite():
    gate = torch.tensor([-1e30, -1e13, -1e4, -100.0, -20.0, -5.0, 0.0, 5.0, 20.0, 100.0, 1e4, 1e13, 1e30])
    up = torch.ones_like(gate)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = mk.geglu(g, u, backend="triton")
    dg, du = torch.autograd.grad(out, (g, u), torch.ones_like(out))
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = torch.nn.functional.gelu(g64, approximate="tanh") * u64
    rdg, rdu = torch.autograd.grad(ref, (g64, u64), torch.ones_like(ref))
    for a, b in ((out, ref), (dg, rdg), (du, rdu)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


def test_inputs_untouched_and_empty():
    gate, up, dout = (torch.randn(4, 64, dtype=torch.bfloat16) for _ in range(3))
    saved = [t.clone() for t in (gate, up, dout)]
    g, u = gate.requires_grad_(), up.requires_grad_()
    torch.autograd.grad(mk.geglu(g, u, backend="triton"), (g, u), dout)
    for a, b in zip(saved, (gate, up, dout)):
        assert torch.equal(a, b.detach())
    gu = torch.randn(3, 0, requires_grad=True)
    out = mk.geglu_packed(gu, backend="triton")
    assert out.shape == (3, 0)
    out.sum().backward()
    assert gu.grad.shape == (3, 0)


def test_bad_input():
    with pytest.raises(TypeError, match="gate: backend='triton'"):
        mk.geglu(torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), backend="triton")
    with pytest.raises(ValueError, match="up"):
        mk.geglu(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(TypeError, match="up"):
        mk.geglu(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="even"):
        mk.geglu_packed(torch.randn(4, 9))


def test_opcheck():
    g, u = torch.randn(3, 5, 40, requires_grad=True), torch.randn(3, 5, 40, requires_grad=True)
    gu = torch.randn(3, 5, 80, requires_grad=True)
    torch.library.opcheck(ops.geglu_op, (g, u))
    torch.library.opcheck(ops.geglu_packed_op, (gu,))
    torch.library.opcheck(ops.geglu_backward_op, (torch.randn(3, 5, 40), g.detach(), u.detach()))
    torch.library.opcheck(ops.geglu_packed_backward_op, (torch.randn(3, 5, 40), gu.detach()))


def test_compile_fullgraph_matches_eager():
    def f(gate, up, gate_up):
        return mk.geglu(gate, up, backend="triton"), mk.geglu_packed(gate_up, backend="triton")

    args = [torch.randn(6, 96, requires_grad=True), torch.randn(6, 96, requires_grad=True),
            torch.randn(6, 192, requires_grad=True)]
    grads = [torch.randn(6, 96), torch.randn(6, 96)]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_out, comp_out = f(*args), compiled(*args)
    for a, b in zip(eager_out, comp_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(eager_out, args, grads), torch.autograd.grad(comp_out, args, grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------- static GPU checks
@pytest.fixture(scope="module")
def static_reports():
    return module_reports("meditron_kernels.ops.geglu")


@pytest.mark.slow
@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("name", [launch.name for launch in ops.static_launches()])
def test_static_compile(static_reports, name, cc):
    # ffn 15360 in bf16, both halves of the packed tensor 16-byte aligned: 128-bit loads throughout
    assert_static_clean(static_reports[f"{name}@{cc}"])
