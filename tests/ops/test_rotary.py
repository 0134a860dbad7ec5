"""Triton rotary embedding (meditron_kernels/ops/rotary.py) against the reference."""

import pytest
import torch

from meditron_kernels._static import module_reports
import meditron_kernels as mk
from meditron_kernels.ops import rotary
from tests.helpers import assert_close_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, seq, n_heads, n_kv_heads, head_dim, with position_ids): seq 1, 37, 97; GQA ratios 1, 4,
# 8; head_dim 64, 128, 96. Every (dtype, layout, position_ids or not) meets two shapes.
CASES = [(2, 1, 4, 4, 64, True), (1, 37, 8, 2, 128, False), (1, 97, 8, 1, 96, True), (2, 37, 16, 2, 64, False)]


def _inputs(batch, seq, hq, hk, d, dtype, with_pos, n_positions=None):
    q = torch.randn(batch, seq, hq, d).to(dtype)
    k = torch.randn(batch, seq, hk, d).to(dtype)
    n_positions = n_positions or seq + 64
    cos, sin = mk.rotary_cos_sin(n_positions, d)
    pos = torch.randint(0, n_positions, (batch, seq)) if with_pos else None
    return q, k, cos, sin, pos


def _forward_backward(q, k, cos, sin, pos, interleaved, backend, gq, gk, dtype=None):
    dtype = dtype or q.dtype
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    qo, ko = mk.apply_rotary(q, k, cos, sin, pos, interleaved=interleaved, backend=backend)
    torch.autograd.backward((qo, ko), (gq.to(dtype), gk.to(dtype)))
    return qo.detach(), ko.detach(), q.grad, k.grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + ("_pos" if c[5] else ""))
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_forward_backward(case, interleaved, dtype):
    *shape, with_pos = case
    q, k, cos, sin, pos = _inputs(*shape, dtype, with_pos)
    gq, gk = torch.randn(q.shape).to(dtype), torch.randn(k.shape).to(dtype)
    ours = _forward_backward(q, k, cos, sin, pos, interleaved, "triton", gq, gk)
    plain = _forward_backward(q, k, cos, sin, pos, interleaved, "torch", gq, gk)
    ref = _forward_backward(q, k, cos, sin, pos, interleaved, "torch", gq, gk, dtype=torch.float64)
    for name, o, t, r in zip(("q_out", "k_out", "dq", "dk"), ours, plain, ref):
        assert o.dtype == dtype
        assert_close_rule(o, t, r, factor=2.0 if name.endswith("out") else 3.0, name=name)


@pytest.mark.parametrize("head_dim", [2, 6, 250, 256])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_any_even_head_dim_up_to_256(head_dim, interleaved):
    q, k, cos, sin, pos = _inputs(1, 5, 3, 1, head_dim, torch.float32, True)
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)
    ours = _forward_backward(q, k, cos, sin, pos, interleaved, "triton", gq, gk)
    ref = _forward_backward(q, k, cos, sin, pos, interleaved, "torch", gq, gk, dtype=torch.float64)
    plain = _forward_backward(q, k, cos, sin, pos, interleaved, "torch", gq, gk)
    for name, o, t, r in zip(("q_out", "k_out", "dq", "dk"), ours, plain, ref):
        assert_close_rule(o, t, r, name=name)


def test_position_ids_are_honoured():
    # Two packed documents: positions restart at the document boundary. Rotating the pack with
    # those positions equals rotating each document alone from position 0.
    q, k, cos, sin, _ = _inputs(1, 23, 4, 2, 64, torch.float32, False)
    pos = torch.cat((torch.arange(9), torch.arange(14)))[None]
    qo, ko = mk.apply_rotary(q, k, cos, sin, pos, backend="triton")
    qa, ka = mk.apply_rotary(q[:, :9], k[:, :9], cos, sin, backend="triton")
    qb, kb = mk.apply_rotary(q[:, 9:], k[:, 9:], cos, sin, backend="triton")
    assert torch.equal(qo, torch.cat((qa, qb), 1)) and torch.equal(ko, torch.cat((ka, kb), 1))
    q0, _ = mk.apply_rotary(q, k, cos, sin, backend="triton")
    assert not torch.equal(qo[:, 9:], q0[:, 9:])


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_strided_inputs(interleaved):
    # q and k as views of one fused qkv projection (head and token strides != contiguous),
    # a transposed q (head_dim not unit-stride: copied once), and broadcast int32 positions.
    b, s, hq, hk, d = 2, 7, 4, 2, 64
    qkv = torch.randn(b, s, (hq + 2 * hk) * d, dtype=torch.float16)
    q = qkv[..., : hq * d].view(b, s, hq, d)
    k = qkv[..., hq * d: (hq + hk) * d].view(b, s, hk, d)
    cos, sin = mk.rotary_cos_sin(16, d)
    pos = torch.randint(0, 16, (1, s), dtype=torch.int32).expand(b, s)
    qo, ko = mk.apply_rotary(q, k, cos, sin, pos, interleaved=interleaved, backend="triton")
    qc, kc = mk.apply_rotary(q.contiguous(), k.contiguous(), cos, sin, pos.contiguous().long(),
                             interleaved=interleaved, backend="triton")
    assert torch.equal(qo, qc) and torch.equal(ko, kc)
    qt = q.contiguous().transpose(2, 3).contiguous().transpose(2, 3)
    assert qt.stride(-1) != 1
    qo2, _ = mk.apply_rotary(qt, k, cos, sin, pos, interleaved=interleaved, backend="triton")
    assert torch.equal(qo2, qc)
    # Strided tables (a column slice of a wider table) are read through their row stride.
    wide_c, wide_s = torch.randn(16, d), torch.randn(16, d)
    wide_c[:, : d // 2], wide_s[:, : d // 2] = cos, sin
    qo3, ko3 = mk.apply_rotary(q, k, wide_c[:, : d // 2], wide_s[:, : d // 2], pos, interleaved=interleaved,
                               backend="triton")
    assert torch.equal(qo3, qc) and torch.equal(ko3, kc)


def test_out_of_place_and_expanded_gradient():
    q, k, cos, sin, pos = _inputs(1, 6, 2, 1, 64, torch.bfloat16, True)
    q0, k0 = q.clone(), k.clone()
    q.requires_grad_(), k.requires_grad_()
    qo, ko = mk.apply_rotary(q, k, cos, sin, pos, backend="triton")
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)
    assert qo.data_ptr() != q.data_ptr() and ko.data_ptr() != k.data_ptr()
    (qo.sum() + ko.sum()).backward()  # gradients are expanded scalars: every stride 0
    ones = torch.ones_like(q0), torch.ones_like(k0)
    expect = mk.apply_rotary(*ones, cos, -sin, pos, backend="torch")
    assert torch.equal(q.grad, expect[0]) and torch.equal(k.grad, expect[1])


def test_empty_batch():
    q, k, cos, sin, _ = _inputs(0, 3, 2, 1, 64, torch.float32, False)
    qo, ko = mk.apply_rotary(q, k, cos, sin, backend="triton")
    assert qo.shape == q.shape and ko.shape == k.shape


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the kernel was launched")


@pytest.mark.parametrize("case,err,match", [
    ("head_dim", ValueError, "head_dim must be at most 256"),
    ("float64", TypeError, "^q: backend='triton'"),
    ("cos_float64", TypeError, "^cos: backend='triton'"),
    ("pos_range", ValueError, "position_ids must lie in"),
    ("pos_negative", ValueError, "position_ids must lie in"),
    ("cos_grad", ValueError, "cos and sin"),
], ids=lambda v: v if isinstance(v, str) and " " not in v and "^" not in v else "")
def test_bad_inputs_raise_before_launch(monkeypatch, case, err, match):
    monkeypatch.setattr(rotary, "_rotary_kernel", _NoLaunch())
    d = 258 if case == "head_dim" else 64
    q, k, cos, sin, pos = _inputs(1, 4, 2, 1, d, torch.float32, True, n_positions=8)
    if case == "float64":
        q, k = q.double(), k.double()
    elif case == "cos_float64":
        cos = cos.double()
    elif case == "pos_range":
        pos[0, 2] = 8
    elif case == "pos_negative":
        pos[0, 1] = -1
    elif case == "cos_grad":
        cos.requires_grad_()
    with pytest.raises(err, match=match):
        mk.apply_rotary(q, k, cos, sin, pos, backend="triton")


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, cos, sin, _ = _inputs(1, 4, 2, 1, 64, torch.float32, False)
    with pytest.raises(ValueError, match="CUDA"):
        mk.apply_rotary(q, k, cos, sin, backend="triton")


@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
def test_opcheck(with_pos):
    q, k, cos, sin, pos = _inputs(1, 5, 4, 2, 64, torch.float32, with_pos)
    torch.library.opcheck(torch.ops.meditron_kernels.triton_apply_rotary.default,
                          (q.requires_grad_(), k.requires_grad_(), cos, sin, pos, True, False))


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_compile_fullgraph_matches_eager(interleaved):
    q, k, cos, sin, pos = _inputs(2, 9, 4, 1, 64, torch.float32, True)
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)

    def step(q, k, pos):
        qo, ko = mk.apply_rotary(q, k, cos, sin, pos, interleaved=interleaved, backend="triton")
        return qo, ko, (qo * gq).sum() + (ko * gk).sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        qo, ko, loss = fn(qq, kk, pos)
        loss.backward()
        results.append((qo.detach(), ko.detach(), qq.grad, kk.grad))
    for e, c in zip(*results):
        assert torch.equal(e, c)


@pytest.fixture(scope="module")
def rotary_reports():
    return list(module_reports("meditron_kernels.ops.rotary").values())


@pytest.mark.parametrize("cc", [80, 90])
def test_static_compile(cc, rotary_reports):
    reports = [r for r in rotary_reports if r["arch"] == f"sm_{cc}"]
    assert {r["kernel"] for r in reports} == {
        "rotary_half_fwd", "rotary_half_bwd", "rotary_interleaved_fwd", "rotary_interleaved_bwd"}
    for rec in reports:
        assert rec["spill_bytes"] == 0 and rec["stack_bytes"] == 0, rec
        assert rec["shared_bytes"] <= rec["shared_limit"], rec
        assert rec["vector_load_bits"] == 128, rec  # 16-byte aligned bf16 rows: 8 elements per load
