"""meditron_kernels/ops/swiglu.py: the Triton SwiGLU, plain and packed, under the interpreter on the CPU."""
from pathlib import Path

import pytest
import torch

import meditron_kernels as mk
from meditron_kernels.static import module_reports
from helpers import assert_close_rule, assert_static_clean
from meditron_kernels.ops import swiglu as ops
from meditron_kernels.ops._common import as_rows

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 123), (2, 5, 1000), (3, 4096), (7,), ()]


def _three_ways(fn, inputs, dout):
    """fn on the triton backend, on torch in the same dtype and in float64, with gradients.
    -> {name: (triton, torch, reference)}."""
    results = []
    dout = dout.to(inputs[0].dtype)  # every way sees the same rounded gradient: only the op's own error counts
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
def test_accuracy(dtype, shape):
    gate, up = 2 * torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    _assert_rule(_three_ways(mk.swiglu, [gate, up], torch.randn(shape)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_accuracy(dtype, shape):
    ffn = shape[-1] if shape else 5
    lead = shape[:-1] if shape else ()
    gate_up = torch.cat([2 * torch.randn(*lead, ffn, dtype=dtype), torch.randn(*lead, ffn, dtype=dtype)], dim=-1)
    cases = _three_ways(mk.swiglu_packed, [gate_up], torch.randn(*lead, ffn))
    assert cases["d0"][0].shape == gate_up.shape  # one (..., 2 * ffn) gradient
    _assert_rule(cases)


def test_packed_equals_plain_on_the_halves():
    gate_up = torch.randn(6, 2 * 300, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(6, 300, dtype=torch.bfloat16)
    out = mk.swiglu_packed(gate_up, backend="triton")
    (dgu,) = torch.autograd.grad(out, gate_up, dout)
    g, u = gate_up.detach().chunk(2, dim=-1)
    g, u = g.requires_grad_(), u.requires_grad_()
    out2 = mk.swiglu(g, u, backend="triton")
    dg, du = torch.autograd.grad(out2, (g, u), dout)
    assert torch.equal(out, out2)
    assert torch.equal(dgu, torch.cat([dg, du], dim=-1))


@pytest.mark.parametrize("layout", ["column_slices", "transposed"])
def test_strided_inputs_and_gradient(layout):
    ffn = 1000
    if layout == "column_slices":
        # the halves of an unpacked buffer, read through their row stride without a copy
        buf = torch.randn(2, 9, 2 * ffn + 16, dtype=torch.float16)
        gate, up = buf[..., :ffn], buf[..., ffn + 16:]
        assert as_rows(gate).data_ptr() == gate.data_ptr()
    else:
        # leading dims that cannot be merged: copied once
        gate = torch.randn(9, 2, ffn, dtype=torch.float16).transpose(0, 1)
        up = torch.randn(9, 2, ffn, dtype=torch.float16).transpose(0, 1)
    dout = torch.randn(9, 2, ffn).transpose(0, 1)
    results = []
    for backend, cast in (("triton", None), ("torch", None), ("torch", torch.float64)):
        g = gate.detach().to(cast or gate.dtype).requires_grad_()
        u = up.detach().to(cast or up.dtype).requires_grad_()
        out = mk.swiglu(g, u, backend=backend)
        results.append([out, *torch.autograd.grad(out, (g, u), dout.to(out.dtype))])
    for i, name in enumerate(["out", "dgate", "dup"]):
        assert_close_rule(results[0][i], results[1][i], results[2][i], factor=2.0 if i == 0 else 3.0, name=name)


def test_packed_strided_input():
    ffn = 256
    wide = torch.randn(5, 2 * ffn + 8, dtype=torch.float32)
    gate_up = wide[:, 8:]  # row stride 2 * ffn + 8, gate and up at unaligned offsets
    tr = torch.randn(2 * ffn, 5).t()  # column stride 5: copied once
    for gu in (gate_up, tr):
        x = gu.detach().requires_grad_()
        out = mk.swiglu_packed(x, backend="triton")
        dout = torch.randn_like(out)
        (d,) = torch.autograd.grad(out, x, dout)
        xr = gu.detach().double().requires_grad_()
        ref = mk.swiglu_packed(xr, backend="torch")
        (dref,) = torch.autograd.grad(ref, xr, dout.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d.double(), dref, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, inside the interpreter
def test_extreme_gates_stay_finite():
    gate = torch.tensor([-1e4, -100.0, -88.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    up = torch.ones_like(gate)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = mk.swiglu(g, u, backend="triton")
    dg, du = torch.autograd.grad(out, (g, u), torch.ones_like(out))
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = torch.nn.functional.silu(g64) * u64
    rdg, rdu = torch.autograd.grad(ref, (g64, u64), torch.ones_like(ref))
    for a, b in ((out, ref), (dg, rdg), (du, rdu)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


def test_inputs_untouched():
    gate, up = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 64, dtype=torch.bfloat16)
    gate_up = torch.randn(4, 128, dtype=torch.bfloat16)
    dout = torch.randn(4, 64, dtype=torch.bfloat16)
    saved = [t.clone() for t in (gate, up, gate_up, dout)]
    g, u, gu = gate.requires_grad_(), up.requires_grad_(), gate_up.requires_grad_()
    torch.autograd.grad(mk.swiglu(g, u, backend="triton"), (g, u), dout)
    torch.autograd.grad(mk.swiglu_packed(gu, backend="triton"), gu, dout)
    for a, b in zip(saved, (gate, up, gate_up, dout)):
        assert torch.equal(a, b.detach())


def test_empty_inputs():
    g = torch.randn(0, 8, requires_grad=True)
    out = mk.swiglu(g, torch.randn(0, 8), backend="triton")
    assert out.shape == (0, 8)
    gu = torch.randn(3, 0, requires_grad=True)
    out = mk.swiglu_packed(gu, backend="triton")
    assert out.shape == (3, 0)
    out.sum().backward()
    assert gu.grad.shape == (3, 0)


# ---------------------------------------------------------------------------- bad input
def test_float64_is_rejected():
    with pytest.raises(TypeError, match="gate: backend='triton'"):
        mk.swiglu(torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), backend="triton")
    with pytest.raises(TypeError, match="gate_up: backend='triton'"):
        mk.swiglu_packed(torch.randn(4, dtype=torch.float64), backend="triton")


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="up"):
        mk.swiglu(torch.randn(4, 8), torch.randn(4, 9), backend="triton")
    with pytest.raises(TypeError, match="up"):
        mk.swiglu(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float16), backend="triton")
    with pytest.raises(ValueError, match="even"):
        mk.swiglu_packed(torch.randn(4, 9), backend="triton")


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        mk.swiglu(torch.randn(4, device="cpu"), torch.randn(4, device="cpu"), backend="triton")


# ---------------------------------------------------------------------------- torch integration
def test_opcheck():
    g, u = torch.randn(3, 5, 40, requires_grad=True), torch.randn(3, 5, 40, requires_grad=True)
    gu = torch.randn(3, 5, 80, requires_grad=True)
    torch.library.opcheck(ops.swiglu_op, (g, u))
    torch.library.opcheck(ops.swiglu_packed_op, (gu,))
    torch.library.opcheck(ops.swiglu_backward_op, (torch.randn(3, 5, 40), g.detach(), u.detach()))
    torch.library.opcheck(ops.swiglu_packed_backward_op, (torch.randn(3, 5, 40), gu.detach()))


def test_compile_fullgraph_matches_eager():
    def f(gate, up, gate_up):
        return mk.swiglu(gate, up, backend="triton"), mk.swiglu_packed(gate_up, backend="triton")

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
    return module_reports("meditron_kernels.ops.swiglu")


@pytest.mark.slow
@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("name", [launch.name for launch in ops.static_launches()])
def test_static_compile(static_reports, name, cc):
    rep = static_reports[f"{name}@{cc}"]
    # ffn 28672 in bf16, both halves of the packed tensor 16-byte aligned: 128-bit loads throughout
    assert_static_clean(rep)
