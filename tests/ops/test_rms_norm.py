"""meditron_kernels/ops/rms_norm.py: the Triton RMSNorm, under the interpreter on the CPU."""
from pathlib import Path

import pytest
import torch

import meditron_kernels as mk
from meditron_kernels.ops._common import Launch
from meditron_kernels.static import module_reports
from helpers import assert_close_rule, assert_static_clean
from meditron_kernels import reference as R
from meditron_kernels.ops import rms_norm as ops
from meditron_kernels.ops._common import as_rows

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def _run_case(x, w, r, gy, gh, prepare=lambda t: t, offset=0.0):
    """Forward and backward of the triton op, of torch in the same dtype and of the float64
    reference, on the same data; y and h both feed the loss, as in a pre-norm block where h is
    the next residual stream. -> {name: (triton, torch, reference)}."""
    gy = gy.to(x.dtype)  # every way sees the same rounded gradients: only the op's own error counts
    gh = gh.to(x.dtype) if gh is not None else None
    results = []
    for backend, cast in (("triton", None), ("torch", None), ("torch", torch.float64)):
        xs = x.detach().to(cast or x.dtype).requires_grad_()
        ws = w.detach().to(cast or w.dtype).requires_grad_()
        rs = r.detach().to(cast or r.dtype).requires_grad_() if r is not None else None
        out = mk.rms_norm(prepare(xs), ws, EPS, residual=prepare(rs) if rs is not None else None, offset=offset,
                          backend=backend)
        y, h = out if r is not None else (out, None)
        grads = [gy.to(y.dtype)]
        outs = [y]
        if r is not None:
            outs.append(h)
            grads.append(gh.to(h.dtype))
        leaves = [xs, ws] + ([rs] if rs is not None else [])
        gs = torch.autograd.grad(outs, leaves, grads)
        named = {"y": y, "dx": gs[0], "dweight": gs[1]}
        if r is not None:
            named.update(h=h, dresidual=gs[2])
        results.append(named)
    return {k: tuple(res[k] for res in results) for k in results[0]}


def _assert_rule(cases):
    for name, (out, out_torch, ref) in cases.items():
        factor = 2.0 if name in ("y", "h") else 3.0
        assert out.dtype == out_torch.dtype, f"{name}: dtype {out.dtype} != {out_torch.dtype}"
        assert_close_rule(out, out_torch, ref, factor=factor, name=name)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", [123, 1000, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy(dtype, hidden, residual):
    # 3 x 37 rows: with 4 programs along the rows on the CPU, every program loops over several tiles.
    shape = (3, 37, hidden) if hidden < 4096 else (2, 7, hidden)
    x = torch.randn(shape, dtype=dtype)
    r = torch.randn(shape, dtype=dtype) if residual else None
    w = 1 + 0.5 * torch.randn(hidden, dtype=dtype)
    _assert_rule(_run_case(x, w, r, torch.randn(shape), torch.randn(shape)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_weight_with_16bit_input(dtype):
    x, r = torch.randn(9, 1000, dtype=dtype), torch.randn(9, 1000, dtype=dtype)
    w = 1 + 0.5 * torch.randn(1000, dtype=torch.float32)
    cases = _run_case(x, w, r, torch.randn(9, 1000), torch.randn(9, 1000))
    assert cases["dweight"][0].dtype == torch.float32
    _assert_rule(cases)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 20000), (torch.bfloat16, 20000), (torch.float16, 65536)],
                         ids=str)
def test_long_rows_take_the_streaming_paths(dtype, hidden, residual):
    assert hidden > ops.ROW_TILE_BWD
    rows = 5 if hidden < 65536 else 2
    x = torch.randn(rows, hidden, dtype=dtype)
    r = torch.randn(rows, hidden, dtype=dtype) if residual else None
    w = 1 + 0.5 * torch.randn(hidden, dtype=dtype)
    _assert_rule(_run_case(x, w, r, torch.randn(rows, hidden), torch.randn(rows, hidden)))


@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_strided_inputs_and_gradients(layout):
    hidden = 1000
    if layout == "row_slice":
        # rows of a wider buffer: handled through the row stride, no copy
        def prepare(t):
            return t
        base_x = torch.randn(2, 19, hidden + 24, dtype=torch.float16)
        base_r = torch.randn(2, 19, hidden + 40, dtype=torch.float16)
        x, r = base_x[..., :hidden], base_r[..., 8:8 + hidden]
        assert as_rows(x).data_ptr() == x.data_ptr()
    else:
        # leading dims that cannot be merged into rows: copied once
        def prepare(t):
            return t.transpose(0, 1)
        x = torch.randn(19, 2, hidden, dtype=torch.float16)
        r = torch.randn(19, 2, hidden, dtype=torch.float16)
    w = 1 + 0.5 * torch.randn(hidden, dtype=torch.float16)
    shape = prepare(x).shape
    # gradients arriving through a transpose are not contiguous either
    gy = torch.randn(shape[1], shape[0], hidden).transpose(0, 1)
    gh = torch.randn(shape[1], shape[0], hidden).transpose(0, 1)
    _assert_rule(_run_case(x, w, r, gy, gh, prepare))


def test_prenorm_chain_gradients_reach_both_addends():
    # h1 = x1 + r0, y1 = norm(h1); x2 = f(y1); h2 = x2 + h1, y2 = norm(h2); loss uses y2 and h2.
    # The residual stream's gradient must flow through h1 into x1 and r0 as well as through y1.
    dim = 256

    def block(x1, r0, w1, w2, lin, backend):
        y1, h1 = mk.rms_norm(x1, w1, EPS, residual=r0, backend=backend)
        x2 = torch.tanh(y1 @ lin)
        return mk.rms_norm(x2, w2, EPS, residual=h1, backend=backend)

    inputs = [torch.randn(6, dim), torch.randn(6, dim), 1 + 0.3 * torch.randn(dim), 1 + 0.3 * torch.randn(dim),
              torch.randn(dim, dim) / dim ** 0.5]
    gy, gh = torch.randn(6, dim), torch.randn(6, dim)
    got = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        y2, h2 = block(*leaves, backend)
        got.append([y2, h2, *torch.autograd.grad((y2, h2), leaves[:4], (gy.to(dtype), gh.to(dtype)))])
    for i, name in enumerate(["y2", "h2", "dx1", "dr0", "dw1", "dw2"]):
        assert_close_rule(got[0][i], got[1][i], got[2][i], factor=2.0 if i < 2 else 3.0, name=name)


def test_inputs_untouched_and_dweight_deterministic():
    x, r = torch.randn(45, 1000, dtype=torch.bfloat16), torch.randn(45, 1000, dtype=torch.bfloat16)
    w, gy, gh = torch.randn(1000, dtype=torch.bfloat16), torch.randn(45, 1000, dtype=torch.bfloat16), \
        torch.randn(45, 1000, dtype=torch.bfloat16)
    saved = [t.clone() for t in (x, r, w, gy, gh)]
    runs = []
    for _ in range(2):
        xs, rs, ws = (t.clone().requires_grad_() for t in (x, r, w))
        y, h = mk.rms_norm(xs, ws, EPS, residual=rs, backend="triton")
        runs.append(torch.autograd.grad((y, h), (xs, rs, ws), (gy, gh)))
    for a, b in zip(saved, (x, r, w, gy, gh)):
        assert torch.equal(a, b)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_weight_without_grad_and_empty_input():
    x = torch.randn(4, 123, requires_grad=True)
    w = torch.randn(123)
    y = mk.rms_norm(x, w, EPS, backend="triton")
    (dx,) = torch.autograd.grad(y.sum(), x)
    ref = torch.autograd.grad(R.rms_norm(x, w, EPS).sum(), x)[0]
    torch.testing.assert_close(dx, ref)
    e = torch.randn(0, 123, requires_grad=True)
    we = torch.randn(123, requires_grad=True)
    ye, he = mk.rms_norm(e, we, EPS, residual=torch.randn(0, 123), backend="triton")
    assert ye.shape == he.shape == (0, 123)
    (ye.sum() + he.sum()).backward()
    assert torch.equal(we.grad, torch.zeros(123)) and e.grad.shape == (0, 123)


# ---------------------------------------------------------------------------- offset: Gemma's (1 + w)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_offset_accuracy(dtype, residual):
    x = torch.randn(3, 37, 123, dtype=dtype)
    r = torch.randn(3, 37, 123, dtype=dtype) if residual else None
    w = 0.5 * torch.randn(123, dtype=dtype)  # a deviation from 1, as Gemma stores it
    cases = _run_case(x, w, r, torch.randn(x.shape), torch.randn(x.shape), offset=1.0)
    assert cases["dweight"][0].dtype == dtype
    _assert_rule(cases)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_offset_is_gemma3_rmsnorm(backend):
    pytest.importorskip("transformers")  # absent from the Triton 3.6 leg of .ci/run
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    hf = Gemma3RMSNorm(1000, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.normal_(0, 0.5)
    x, r = torch.randn(9, 1000, dtype=torch.bfloat16), torch.randn(9, 1000, dtype=torch.bfloat16)
    # float32 statistics, (1.0 + w.float()), one rounding: the torch path is transformers' bit for bit
    y = mk.rms_norm(x, hf.weight, 1e-6, offset=1.0, backend=backend)
    y2, h = mk.rms_norm(x, hf.weight, 1e-6, residual=r, offset=1.0, backend=backend)
    if backend == "torch":
        assert torch.equal(y, hf(x)) and torch.equal(y2, hf(x + r)) and torch.equal(h, x + r)
    else:  # the kernel's row sum runs in another order: within one bf16 rounding
        for a, b in ((y, hf(x)), (y2, hf(x + r))):
            assert ((a.float() - b.float()).abs() <= 2 ** -7 * b.float().abs() + 1e-6).all()


def test_offset_compiles_fullgraph():
    def f(x, r, w):
        return mk.rms_norm(x, w, EPS, residual=r, offset=1.0, backend="triton")

    args = [torch.randn(6, 96, requires_grad=True), torch.randn(6, 96, requires_grad=True),
            torch.randn(96, dtype=torch.float16).float().requires_grad_()]
    grads = [torch.randn(6, 96), torch.randn(6, 96)]
    torch._dynamo.reset()
    eager, comp = f(*args), torch.compile(f, fullgraph=True)(*args)
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(eager, args, grads), torch.autograd.grad(comp, args, grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_offset_bad_input():
    with pytest.raises(TypeError, match="offset must be a float"):
        mk.rms_norm(torch.randn(2, 8), torch.randn(8), offset="1")
    with pytest.raises(ValueError, match="offset must be finite"):
        mk.rms_norm(torch.randn(2, 8), torch.randn(8), offset=float("inf"))


# ---------------------------------------------------------------------------- bad input
def test_float64_is_rejected():
    with pytest.raises(TypeError, match="x: backend='triton'"):
        mk.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), backend="triton")


def test_hidden_above_limit_raises_before_any_launch(monkeypatch):
    def no_launch(launch):
        raise AssertionError(f"{launch.name} was launched")

    monkeypatch.setattr(Launch, "run", no_launch)
    n = ops.MAX_HIDDEN + 1
    with pytest.raises(ValueError, match="hidden sizes up to 65536"):
        mk.rms_norm(torch.randn(1, n), torch.randn(n), backend="triton")
    with pytest.raises(ValueError, match="hidden sizes up to 65536"):
        mk.rms_norm(torch.randn(1, n), torch.randn(n), residual=torch.randn(1, n), backend="triton")


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="weight"):
        mk.rms_norm(torch.randn(2, 8), torch.randn(9), backend="triton")
    with pytest.raises(TypeError, match="residual"):
        mk.rms_norm(torch.randn(2, 8), torch.randn(8), residual=torch.randn(2, 8, dtype=torch.float16),
                    backend="triton")
    with pytest.raises(TypeError, match="weight"):
        mk.rms_norm(torch.randn(2, 8, dtype=torch.float16), torch.randn(8, dtype=torch.bfloat16), backend="triton")


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        mk.rms_norm(torch.randn(2, 8, device="cpu"), torch.randn(8, device="cpu"), backend="triton")


# ---------------------------------------------------------------------------- torch integration
def test_opcheck():
    x = torch.randn(3, 5, 40, requires_grad=True)
    r = torch.randn(3, 5, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    torch.library.opcheck(ops.rms_norm_op, (x, w, EPS))
    torch.library.opcheck(ops.rms_norm_residual_op, (x, r, w, EPS))
    torch.library.opcheck(ops.rms_norm_backward_op, (torch.randn(3, 5, 40), x.detach(), w.detach(), None, EPS, True))
    torch.library.opcheck(ops.rms_norm_backward_op,
                          (torch.randn(3, 5, 40), x.detach(), w.detach(), torch.randn(3, 5, 40), EPS, False))


def test_compile_fullgraph_matches_eager():
    def f(x, r, w1, w2):
        y, h = mk.rms_norm(x, w1, EPS, residual=r, backend="triton")
        return y, h, mk.rms_norm(h, w2, EPS, backend="triton")

    args = [torch.randn(6, 96, requires_grad=True), torch.randn(6, 96, requires_grad=True),
            torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)]
    grads = [torch.randn(6, 96) for _ in range(3)]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_out = f(*args)
    comp_out = compiled(*args)
    for a, b in zip(eager_out, comp_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    eager_g = torch.autograd.grad(eager_out, args, grads)
    comp_g = torch.autograd.grad(comp_out, args, grads)
    for a, b in zip(eager_g, comp_g):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------- static GPU checks
@pytest.fixture(scope="module")
def static_reports():
    return module_reports("meditron_kernels.ops.rms_norm")


def test_static_launches_use_the_runtime_config():
    x = torch.empty(16384, 4096, dtype=torch.bfloat16, device="meta")
    launch = ops._fwd_launch(x, None, torch.empty(4096, device="meta"), torch.empty_like(x), None, EPS)
    cfg = ops.rms_norm_config(4096, 2, "fwd")
    assert (launch.args["BLOCK_M"], launch.args["BLOCK_N"], launch.num_warps) == cfg[:3]
    assert launch.args["SOFT_BF16"] is False  # the GPU specialisation, not the interpreter's


@pytest.mark.slow
@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("name", [launch.name for launch in ops.static_launches()])
def test_static_compile(static_reports, name, cc):
    rep = static_reports[f"{name}@{cc}"]
    # bf16 rows of 4096+ elements with 16-byte aligned strides: every stream is read 16 bytes at a time
    assert_static_clean(rep)
