"""The cuda backend: csrc/ kernels through meditron_kernels._C and meditron_kernels/ops/cuda_*.py.

Runtime tests need a GPU and the built extension and skip with the reason otherwise: the
accuracy rule against the float64 reference for every output and every gradient, agreement
with the Triton backend, odd shapes, strided and misaligned inputs, bad input, determinism,
opcheck and torch.compile(fullgraph=True). The first tests run everywhere: importing without
the extension, and the errors a user sees when the backend cannot run.
"""
from __future__ import annotations

import pytest
import torch

import meditron_kernels as mk
from helpers import assert_close_rule, max_err
from meditron_kernels import _cuda_ext, backend
from meditron_kernels.ops import cuda_rms_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


# ---------------------------------------------------------------------------- everywhere
def test_backend_entries_registered_without_extension():
    for op in ("rms_norm", "apply_rotary", "swiglu", "swiglu_packed"):
        assert (op, "cuda") in backend._REGISTRY


def test_cpu_tensors_rejected():
    x, w = torch.randn(2, 8, device="cpu"), torch.randn(8, device="cpu")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        mk.rms_norm(x, w, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        mk.swiglu(x, x, backend="cuda")


@pytest.mark.skipif(_cuda_ext.available(), reason="the extension is available here")
def test_unavailable_backend_says_how_to_build():
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        backend.dispatch("rms_norm", "cuda", torch.device("cuda"))
    if not _cuda_ext.loaded():
        assert "pip install --no-build-isolation" in _cuda_ext.why_unavailable()


def test_rms_norm_limits():
    # The 16-byte path holds 16 registers per operand and thread, 512 threads per row.
    assert cuda_rms_norm.max_hidden(torch.bfloat16, 8192) == 16384
    assert cuda_rms_norm.max_hidden(torch.float16, 16384) == 16384
    assert cuda_rms_norm.max_hidden(torch.float32, 4096) == 8192
    assert cuda_rms_norm.max_hidden(torch.bfloat16, 123) == 8192  # element-wise path


# ---------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not _cuda_ext.available(), reason=f"cuda backend unavailable: {_cuda_ext.why_unavailable()}")
DEV = "cuda"


def _has_triton(op: str) -> bool:
    return (op, "triton") in backend._REGISTRY


def _run(fn, inputs, grads, backend_name, cast=None):
    """fn(*inputs, backend=...) and the gradients of sum(out * grad) w.r.t. every input."""
    leaves = [t.detach().to(cast or t.dtype).requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves, backend=backend_name)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [t for t in leaves if t.requires_grad]
    gs = torch.autograd.grad(outs, diff, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [o.detach() for o in outs] + list(gs)


def _check(fn, inputs, grads, names, backend_name="cuda"):
    """The accuracy rule for every output (2x torch's error) and gradient (3x)."""
    out = _run(fn, inputs, grads, backend_name)
    torch_same = _run(fn, inputs, grads, "torch")
    ref = _run(fn, inputs, grads, "torch", cast=torch.float64)
    n_out = len(grads)
    for i, name in enumerate(names):
        assert out[i].dtype == torch_same[i].dtype, f"{name}: dtype {out[i].dtype} != {torch_same[i].dtype}"
        assert_close_rule(out[i], torch_same[i], ref[i], factor=2.0 if i < n_out else 3.0,
                          name=f"{backend_name} {name}")
    return out, torch_same, ref


def _rms(x, w, r=None, *, backend):
    return mk.rms_norm(x, w, EPS, residual=r, backend=backend)


@gpu
@pytest.mark.parametrize("weight_fp32", [False, True], ids=["w=x.dtype", "w=fp32"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", [1, 123, 1000, 4096, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_accuracy(dtype, hidden, residual, weight_fp32):
    shape = (3, 37, hidden) if hidden <= 1000 else (2, 97, hidden)
    x = torch.randn(shape, dtype=dtype, device=DEV)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(torch.float32 if weight_fp32 else dtype)
    gy = torch.randn(shape, dtype=dtype, device=DEV)
    if residual:
        r = torch.randn(shape, dtype=dtype, device=DEV)
        gh = torch.randn(shape, dtype=dtype, device=DEV)
        _check(_rms, [x, w, r], [gy, gh], ["y", "h", "dx", "dweight", "dresidual"])
    else:
        _check(_rms, [x, w], [gy], ["y", "dx", "dweight"])


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rms_norm_largest_rows(dtype):
    hidden = cuda_rms_norm.max_hidden(dtype, 8192 * 2 if dtype == torch.bfloat16 else 8192)
    x = torch.randn(5, hidden, dtype=dtype, device=DEV)
    w = torch.randn(hidden, dtype=dtype, device=DEV)
    _check(_rms, [x, w], [torch.randn_like(x)], ["y", "dx", "dweight"])
    too_long = hidden + 16 // x.element_size()
    with pytest.raises(ValueError, match="hidden <="):
        mk.rms_norm(torch.randn(2, too_long, dtype=dtype, device=DEV), torch.ones(too_long, dtype=dtype, device=DEV),
                    backend="cuda")


@gpu
def test_rms_norm_strided_and_misaligned_inputs():
    hidden = 1024
    flat = torch.randn(4 * 9 * hidden + 1, dtype=torch.bfloat16, device=DEV)
    x_mis = flat[1:].view(4, 9, hidden)  # contiguous, but 2 bytes past a 16-byte boundary
    x_strided = torch.randn(9, 4, hidden, dtype=torch.bfloat16, device=DEV).transpose(0, 1)
    w = torch.randn(hidden, dtype=torch.bfloat16, device=DEV)
    for x in (x_mis, x_strided):
        _check(_rms, [x, w], [torch.randn(x.shape, dtype=x.dtype, device=DEV)], ["y", "dx", "dweight"])


@gpu
def test_rms_norm_dweight_is_deterministic():
    x = torch.randn(4096, 4096, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    w = torch.randn(4096, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    gy = torch.randn_like(x)
    first = torch.autograd.grad(mk.rms_norm(x, w, backend="cuda"), [x, w], gy)
    second = torch.autograd.grad(mk.rms_norm(x, w, backend="cuda"), [x, w], gy)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@gpu
def test_rms_norm_empty_and_frozen_weight():
    x = torch.randn(0, 64, device=DEV, requires_grad=True)
    w = torch.randn(64, device=DEV, requires_grad=True)
    y = mk.rms_norm(x, w, backend="cuda")
    (dw,) = torch.autograd.grad(y.sum(), [w])
    assert y.shape == (0, 64) and torch.equal(dw, torch.zeros_like(w))
    x = torch.randn(3, 64, device=DEV, requires_grad=True)
    (dx,) = torch.autograd.grad(mk.rms_norm(x, w.detach(), backend="cuda").sum(), [x])
    (dx_ref,) = torch.autograd.grad(mk.rms_norm(x, w.detach(), backend="torch").sum(), [x])
    assert max_err(dx, dx_ref) < 1e-5


def _rotary(q, k, cos, sin, pos, interleaved, *, backend):
    return mk.apply_rotary(q, k, cos, sin, pos, interleaved, backend=backend)


@gpu
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("positions", [None, "int32", "int64"])
@pytest.mark.parametrize("head_dim", [64, 128, 6])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("seq", [1, 37, 97])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_accuracy(dtype, seq, gqa, head_dim, positions, interleaved):
    batch, n_heads = 2, 8
    q = torch.randn(batch, seq, n_heads, head_dim, dtype=dtype, device=DEV)
    k = torch.randn(batch, seq, n_heads // gqa, head_dim, dtype=dtype, device=DEV)
    cos, sin = mk.rotary_cos_sin(seq + 50, head_dim, device=DEV)
    pos = None
    if positions is not None:
        pos = torch.randint(0, seq + 50, (batch, seq), device=DEV, dtype=getattr(torch, positions))
    grads = [torch.randn_like(q), torch.randn_like(k)]
    run = lambda q, k, *, backend: _rotary(q, k, cos, sin, pos, interleaved, backend=backend)  # noqa: E731
    _check(run, [q, k], grads, ["q", "k", "dq", "dk"])


@gpu
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_rotary_strided_views_of_fused_qkv(interleaved):
    batch, seq, n_heads, n_kv, d = 2, 37, 8, 2, 128
    qkv = torch.randn(batch, seq, (n_heads + 2 * n_kv) * d, dtype=torch.bfloat16, device=DEV)
    q = qkv[..., : n_heads * d].view(batch, seq, n_heads, d)
    k = qkv[..., n_heads * d: (n_heads + n_kv) * d].view(batch, seq, n_kv, d)
    cos, sin = mk.rotary_cos_sin(seq, d, device=DEV)
    run = lambda q, k, *, backend: _rotary(q, k, cos, sin, None, interleaved, backend=backend)  # noqa: E731
    _check(run, [q, k], [torch.randn(q.shape, dtype=q.dtype, device=DEV), torch.randn(k.shape, dtype=k.dtype, device=DEV)],
           ["q", "k", "dq", "dk"])


@gpu
def test_rotary_position_outside_tables_gives_nan():
    q = torch.randn(1, 3, 2, 64, device=DEV)
    k = torch.randn(1, 3, 1, 64, device=DEV)
    cos, sin = mk.rotary_cos_sin(8, 64, device=DEV)
    pos = torch.tensor([[0, 8, 2]], device=DEV)
    q2, k2 = mk.apply_rotary(q, k, cos, sin, pos, backend="cuda")
    assert torch.isnan(q2[0, 1]).all() and torch.isnan(k2[0, 1]).all()
    assert torch.isfinite(q2[0, [0, 2]]).all()


@gpu
def test_rotary_is_twice_differentiable():
    q = torch.randn(1, 5, 2, 64, device=DEV, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(1, 5, 2, 64, device=DEV).requires_grad_()
    cos, sin = mk.rotary_cos_sin(5, 64, device=DEV)
    q2, k2 = mk.apply_rotary(q, k, cos, sin, backend="cuda")
    (gq,) = torch.autograd.grad((q2 * q2).sum() + k2.sum(), [q], create_graph=True)
    (ggq,) = torch.autograd.grad(gq.sum(), [q])
    assert torch.allclose(ggq, torch.full_like(q, 2.0), atol=1e-5)  # d/dq of 2 * R^T R q = 2 q


def _swiglu(g, u, *, backend):
    return mk.swiglu(g, u, backend=backend)


def _packed(gu, *, backend):
    return mk.swiglu_packed(gu, backend=backend)


@gpu
@pytest.mark.parametrize("shape", [(7,), (5, 123), (3, 37, 1000), (2, 9, 4096), (1, 3, 28672)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_accuracy(dtype, shape):
    g = 3 * torch.randn(shape, dtype=dtype, device=DEV)
    u = torch.randn(shape, dtype=dtype, device=DEV)
    _check(_swiglu, [g, u], [torch.randn_like(g)], ["out", "dgate", "dup"])


@gpu
@pytest.mark.parametrize("ffn", [1, 123, 1000, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_packed_accuracy(dtype, ffn):
    gu = 3 * torch.randn(3, 37, 2 * ffn, dtype=dtype, device=DEV)
    _check(_packed, [gu], [torch.randn(3, 37, ffn, dtype=dtype, device=DEV)], ["out", "dgate_up"])


@gpu
def test_swiglu_strided_misaligned_and_empty():
    base = torch.randn(2, 37, 2 * 1000, dtype=torch.bfloat16, device=DEV)
    g, u = base[..., :1000], base[..., 1000:]  # strided halves: copied once by the launcher
    _check(_swiglu, [g, u], [torch.randn(g.shape, dtype=g.dtype, device=DEV)], ["out", "dgate", "dup"])
    flat = torch.randn(2 * 4099 + 1, dtype=torch.float16, device=DEV)
    g, u = flat[1:4100], flat[4100:]  # contiguous, misaligned: the element-wise path
    _check(_swiglu, [g, u], [torch.randn(g.shape, dtype=g.dtype, device=DEV)], ["out", "dgate", "dup"])
    e = torch.randn(0, 16, device=DEV)
    assert mk.swiglu(e, e, backend="cuda").shape == (0, 16)
    assert mk.swiglu_packed(torch.randn(4, 0, device=DEV), backend="cuda").shape == (4, 0)


def _triton_cases():
    dt = dict(dtype=torch.bfloat16, device=DEV)
    cos, sin = mk.rotary_cos_sin(64, 128, device=DEV)
    pos = torch.randint(0, 64, (2, 37), device=DEV)
    rot = lambda q, k, *, backend: _rotary(q, k, cos, sin, pos, False, backend=backend)  # noqa: E731
    x, r = torch.randn(3, 37, 1000, **dt), torch.randn(3, 37, 1000, **dt)
    q, k = torch.randn(2, 37, 8, 128, **dt), torch.randn(2, 37, 2, 128, **dt)
    g, u, gu = torch.randn(5, 123, **dt), torch.randn(5, 123, **dt), torch.randn(3, 37, 2000, **dt)
    return {
        "rms_norm": (_rms, [x, torch.randn(1000, **dt), r], [torch.randn_like(x), torch.randn_like(x)],
                     ["y", "h", "dx", "dweight", "dresidual"]),
        "apply_rotary": (rot, [q, k], [torch.randn_like(q), torch.randn_like(k)], ["q", "k", "dq", "dk"]),
        "swiglu": (_swiglu, [g, u], [torch.randn_like(g)], ["out", "dgate", "dup"]),
        "swiglu_packed": (_packed, [gu], [torch.randn(3, 37, 1000, **dt)], ["out", "dgate_up"]),
    }


@gpu
@pytest.mark.parametrize("op", ["rms_norm", "apply_rotary", "swiglu", "swiglu_packed"])
def test_agrees_with_triton(op):
    """Both backends within the rule, and within 4x torch's error of each other (small shapes:
    the test session runs Triton under the interpreter)."""
    if not _has_triton(op):
        pytest.skip(f"no triton backend for {op} in this tree")
    fn, inputs, grads, names = _triton_cases()[op]
    cuda, torch_same, ref = _check(fn, inputs, grads, names, "cuda")
    tri, _, _ = _check(fn, inputs, grads, names, "triton")
    for i, name in enumerate(names):
        bound = 4.0 * max_err(torch_same[i], ref[i]) + 1e-6
        assert max_err(cuda[i], tri[i]) <= bound, f"{name}: cuda and triton differ by {max_err(cuda[i], tri[i]):.3e}"


@gpu
def test_float64_rejected_by_kernels():
    x = torch.randn(2, 8, dtype=torch.float64, device=DEV)
    with pytest.raises(TypeError, match="backend='cuda' supports float32, float16 and bfloat16"):
        mk.rms_norm(x, x[0], backend="cuda")
    with pytest.raises(TypeError, match="backend='cuda'"):
        mk.swiglu(x, x, backend="cuda")
    with pytest.raises(TypeError, match="backend='cuda'"):
        mk.swiglu_packed(x, backend="cuda")
    q = torch.randn(1, 2, 2, 8, dtype=torch.float64, device=DEV)
    cos, sin = mk.rotary_cos_sin(2, 8, device=DEV)
    with pytest.raises(TypeError, match="backend='cuda'"):
        mk.apply_rotary(q, q, cos, sin, backend="cuda")


@gpu
def test_direct_op_calls_check_their_inputs():
    ops = torch.ops.meditron_kernels
    x = torch.randn(4, 64, device=DEV)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.cuda_rms_norm_fwd(x, torch.randn(32, device=DEV), 1e-5)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.cuda_swiglu_fwd(x.t(), x.t())
    with pytest.raises(NotImplementedError, match="CPU"):  # only a CUDA kernel (and the fake) exist
        ops.cuda_swiglu_fwd(x.cpu(), x.cpu())


@gpu
def test_opcheck():
    from torch.library import opcheck

    from meditron_kernels import _cuda_ext

    for op, args in _cuda_ext.opcheck_cases(DEV):
        opcheck(op, args)


@gpu
def test_compile_fullgraph_matches_eager():
    x = torch.randn(2, 9, 256, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(256, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    q = torch.randn(2, 9, 4, 64, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    k = torch.randn(2, 9, 2, 64, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    gu = torch.randn(2, 9, 512, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    cos, sin = mk.rotary_cos_sin(9, 64, device=DEV)

    def block(x, r, w, q, k, gu):
        y, h = mk.rms_norm(x, w, EPS, residual=r, backend="cuda")
        q2, k2 = mk.apply_rotary(q, k, cos, sin, backend="cuda")
        a = mk.swiglu_packed(gu, backend="cuda")
        return (y.float().square().sum() + h.float().sum() + (q2.float() * 2).sum() + k2.float().square().sum()
                + a.float().square().sum())

    leaves = [x, r, w, q, k, gu]
    eager = torch.autograd.grad(block(*leaves), leaves)
    compiled = torch.compile(block, fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
