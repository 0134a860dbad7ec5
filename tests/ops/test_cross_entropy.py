"""Triton cross-entropy and chunked lm-head cross-entropy (meditron_kernels/ops/cross_entropy.py)."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import cpu_peak_bytes
from meditron_kernels.static import module_reports
import meditron_kernels as mk
from meditron_kernels.ops import cross_entropy as ce
from tests.helpers import assert_close_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def _targets(shape, vocab, ignore_index=IGNORE, frac_ignored=0.25, dtype=torch.int64):
    t = torch.randint(0, vocab, shape, dtype=dtype)
    t[torch.rand(shape) < frac_ignored] = ignore_index
    t.view(-1)[0] = torch.randint(0, vocab, ()).item()  # at least one counted target
    return t


def _ce(logits, targets, ignore_index, backend, dtype, grad_scale):
    x = logits.detach().to(dtype).requires_grad_()
    if backend == "float64":  # the oracle: float64 throughout, loss included (the API returns float32)
        x = logits.detach().double().requires_grad_()
        loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), targets.reshape(-1).long(), ignore_index=ignore_index)
    else:
        loss = mk.cross_entropy(x, targets, ignore_index, backend=backend)
    (loss * grad_scale).backward()
    return loss.detach(), x.grad


def _check_ce(logits, targets, ignore_index=IGNORE, dtype=torch.float32):
    grad_scale = torch.rand(()).item() + 0.5  # the backward must scale by the incoming gradient
    ours = _ce(logits, targets, ignore_index, "triton", dtype, grad_scale)
    plain = _ce(logits, targets, ignore_index, "torch", dtype, grad_scale)
    ref = _ce(logits.to(dtype), targets, ignore_index, "float64", None, grad_scale)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    assert_close_rule(ours[0], plain[0], ref[0], name="loss")
    assert_close_rule(ours[1], plain[1], ref[1], factor=3.0, name="dlogits")


# ---------------------------------------------------------------------------- cross_entropy
@pytest.mark.parametrize("vocab,lead", [(37, (2, 5)), (1000, (7,)), (32000, (3,)), (50257, (2, 2))])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_accuracy(vocab, lead, dtype):
    logits = torch.randn(*lead, vocab) * 3
    _check_ce(logits, _targets(lead, vocab), dtype=dtype)


def test_ignore_index_inside_vocab_and_int32_targets():
    logits = torch.randn(9, 37)
    targets = _targets((9,), 37, ignore_index=5, dtype=torch.int32)
    targets[3] = 5
    _check_ce(logits, targets, ignore_index=5)


def test_all_ignored_is_nan_with_zero_gradient():
    x = torch.randn(4, 37, requires_grad=True)
    loss = mk.cross_entropy(x, torch.full((4,), IGNORE), backend="triton")
    loss.backward()
    assert loss.isnan() and torch.equal(x.grad, torch.zeros_like(x))


def test_out_of_range_targets_give_nan_without_reading_out_of_bounds():
    x = torch.randn(4, 37, requires_grad=True)
    targets = torch.tensor([3, 37, -7, IGNORE])
    loss = mk.cross_entropy(x, targets, backend="triton")
    loss.backward()
    assert loss.isnan()
    n_valid = 3  # everything but the ignored row is counted
    p = torch.softmax(x.detach(), -1) / n_valid
    assert torch.allclose(x.grad[1], p[1], atol=1e-7) and torch.allclose(x.grad[2], p[2], atol=1e-7)
    expect0 = p[0].clone()
    expect0[3] -= 1 / n_valid
    assert torch.allclose(x.grad[0], expect0, atol=1e-7) and torch.equal(x.grad[3], torch.zeros(37))


def test_masked_vocabulary_with_minus_inf():
    # A whole 4096-column step of -inf (a masked vocabulary tail) must add nothing, not NaN.
    logits = torch.randn(3, 9000)
    logits[:, :5000] = float("-inf")
    targets = torch.tensor([6000, 8999, IGNORE])
    _check_ce(logits, targets)


def test_logits_untouched_and_strided():
    base = torch.randn(6, 1100)
    logits = base[:, :1000]  # row stride 1100: read through the stride
    targets = _targets((6,), 1000)
    before = logits.clone()
    x = logits.clone().requires_grad_()
    xs = logits.requires_grad_()
    loss_s = mk.cross_entropy(xs, targets, backend="triton")
    loss_s.backward()
    assert torch.equal(logits.detach(), before)
    loss = mk.cross_entropy(x, targets, backend="triton")
    loss.backward()
    assert torch.equal(loss, loss_s) and torch.equal(x.grad, xs.grad)
    xt = before.t().contiguous().t().requires_grad_()  # column-strided: copied once
    loss_t = mk.cross_entropy(xt, targets, backend="triton")
    loss_t.backward()
    assert torch.equal(loss_t, loss) and torch.equal(xt.grad, x.grad)


def test_forward_allocates_no_logits_sized_buffer():
    # The forward keeps per-row statistics only; the one logits-sized buffer is the gradient,
    # allocated by the backward.
    logits = torch.randn(64, 1000)
    targets = _targets((64,), 1000)
    full = logits.numel() * logits.element_size()
    x = logits.clone().requires_grad_()
    assert cpu_peak_bytes(lambda: mk.cross_entropy(x, targets, backend="triton")) < full // 4
    with torch.no_grad():
        assert cpu_peak_bytes(lambda: mk.cross_entropy(x, targets, backend="triton")) < full // 4
    peak = cpu_peak_bytes(lambda: mk.cross_entropy(x, targets, backend="triton").backward())
    assert full <= peak < full + full // 4


# ---------------------------------------------------------------------------- fused_linear_cross_entropy
def _flce(hidden, weight, targets, chunk_size, backend, dtype, grad_scale, grads=(True, True)):
    h = hidden.detach().to(dtype).requires_grad_(grads[0])
    w = weight.detach().to(dtype).requires_grad_(grads[1])
    if backend == "float64":  # the oracle: unchunked, float64 throughout
        logits = h.reshape(-1, h.shape[-1]) @ w.t()
        loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE)
    else:
        loss = mk.fused_linear_cross_entropy(h, w, targets, IGNORE, chunk_size=chunk_size, backend=backend)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("lead,dim,vocab,chunk", [((37,), 64, 1000, 8), ((2, 9), 32, 37, None),
                                                  ((5,), 16, 32000, 1), ((13,), 48, 1000, 100)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_linear_accuracy(lead, dim, vocab, chunk, dtype):
    hidden = torch.randn(*lead, dim)
    weight = torch.randn(vocab, dim) / dim ** 0.5
    targets = _targets(lead, vocab)
    grad_scale = torch.rand(()).item() + 0.5
    ours = _flce(hidden, weight, targets, chunk, "triton", dtype, grad_scale)
    plain = _flce(hidden, weight, targets, chunk, "torch", dtype, grad_scale)
    ref = _flce(hidden.to(dtype), weight.to(dtype), targets, chunk, "float64", torch.float64, grad_scale)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    for name, o, p, r in zip(("loss", "dhidden", "dweight"), ours, plain, ref):
        assert_close_rule(o, p, r, factor=2.0 if name == "loss" else 3.0, name=name)


@pytest.mark.parametrize("grads", [(True, False), (False, True)], ids=["hidden_only", "weight_only"])
def test_fused_linear_partial_gradients(grads):
    hidden, weight = torch.randn(11, 32), torch.randn(100, 32) / 6
    targets = _targets((11,), 100)
    ours = _flce(hidden, weight, targets, 4, "triton", torch.float32, 1.0, grads)
    ref = _flce(hidden, weight, targets, 4, "float64", torch.float64, 1.0, grads)
    plain = _flce(hidden, weight, targets, 4, "torch", torch.float32, 1.0, grads)
    for o, p, r in zip(ours, plain, ref):
        assert (o is None) == (r is None)
        if o is not None:
            assert_close_rule(o, p, r, factor=3.0)


def test_fused_linear_peak_memory_below_full_logits():
    n, dim, vocab = 128, 32, 1000
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) / 6).requires_grad_()
    targets = _targets((n,), vocab)
    full_logits = n * vocab * 4

    def unfused():
        mk.cross_entropy(hidden @ weight.t(), targets, backend="torch").backward()

    chunk = 16  # explicit: the default never goes below 1024 tokens, this whole batch

    def fused():
        mk.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk, backend="triton").backward()

    # The measurement sees a full logits tensor when there is one...
    assert cpu_peak_bytes(unfused) >= full_logits
    # ...and the chunked op stays below it, gradients (dhidden, float32 dweight) included.
    hidden.grad = weight.grad = None
    peak = cpu_peak_bytes(fused)
    assert peak < full_logits, (peak, full_logits)
    # Precisely: one chunk of logits, dhidden and the float32 dweight, and their copies scaled
    # by the incoming gradient in the backward.
    grads = 2 * (n * dim * 4 + vocab * dim * 4)
    assert peak <= chunk * vocab * 4 + grads + n * 4 + 1024, peak
    # Without gradients only the chunk buffer and the per-token losses remain.
    with torch.no_grad():
        peak = cpu_peak_bytes(lambda: mk.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk,
                                                                 backend="triton"))
    assert peak <= chunk * vocab * 4 + n * 4 + 1024, peak


# ---------------------------------------------------------------------------- large logits in float32
# At |logits| ~ 50, lse = m + log(s) rounded to float32 is off by up to an ulp of m (4e-6),
# and exp(x - lse) carried that relative error onto every probability: a gradient 10x less
# accurate than torch's. atol=0: at this scale the default atol of 1e-6 would hide it.
def test_cross_entropy_gradient_with_large_logits_float32():
    logits = torch.randn(16, 4096) * 10
    targets = torch.randint(0, 4096, (16,))
    ours = _ce(logits, targets, IGNORE, "triton", torch.float32, 1.0)
    plain = _ce(logits, targets, IGNORE, "torch", torch.float32, 1.0)
    ref = _ce(logits, targets, IGNORE, "float64", None, 1.0)
    assert_close_rule(ours[0], plain[0], ref[0], atol=1e-9, name="loss")
    assert_close_rule(ours[1], plain[1], ref[1], factor=3.0, atol=0.0, name="dlogits")


def test_fused_linear_gradient_with_large_logits_float32():
    hidden = torch.randn(16, 64)
    weight = torch.randn(4096, 64) * (10 / 8)  # logits ~ 10 x a unit normal
    targets = torch.randint(0, 4096, (16,))
    ours = _flce(hidden, weight, targets, None, "triton", torch.float32, 1.0)
    plain = _flce(hidden, weight, targets, None, "torch", torch.float32, 1.0)
    ref = _flce(hidden, weight, targets, None, "float64", torch.float64, 1.0)
    # the float32 loss (~40 here) may be a rounding away from float64's: one ulp of atol
    ulp = torch.finfo(torch.float32).eps * ref[0].abs().item()
    assert_close_rule(ours[0], plain[0], ref[0], atol=ulp, name="loss")
    for name, o, p, r in zip(("dhidden", "dweight"), ours[1:], plain[1:], ref[1:]):
        assert_close_rule(o, p, r, factor=3.0, atol=1e-9, name=name)


# ---------------------------------------------------------------------------- vocabulary-parallel
def _vocab_parallel_worker(rank, world, port, cases, out_dir):
    """Rank ``rank`` of a gloo group: each case's loss and gradients, whole and per slice."""
    import os

    import torch.distributed as dist

    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for case in cases:
        hidden, weight, targets, chunk, dtype, backend = case
        slice_ = weight.shape[0] // world
        h = hidden.to(dtype).requires_grad_()
        w = weight[rank * slice_:(rank + 1) * slice_].to(dtype).requires_grad_()
        loss = mk.fused_linear_cross_entropy(h, w, targets, IGNORE, chunk_size=chunk, process_group=dist.group.WORLD,
                                             backend=backend)
        (loss * 0.75).backward()
        results.append((loss.detach(), h.grad, w.grad))
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_vocab_parallel_equals_one_process(tmp_path):
    """Over a vocabulary split across a gloo group, every rank's loss and dhidden equal the
    one-process fused loss's, and its dweight equals that loss's slice, for both backends;
    float32 to rounding, and fp16 under the accuracy rule against float64. (4 ranks: the TP 4
    training run of tests/train/test_parallel.py.)"""
    import torch.multiprocessing as mp

    world = 2

    torch.manual_seed(0)
    cases = []
    for backend in ("torch", "triton"):
        for lead, dim, vocab, chunk, dtype in [((2, 7), 16, 40, 5, torch.float32), ((9,), 32, 1000, None, torch.float16)]:
            hidden = torch.randn(*lead, dim)
            weight = torch.randn(vocab, dim) / dim ** 0.5
            targets = _targets(lead, vocab)
            targets.view(-1)[1] = vocab - 1  # the last rank's last class
            targets.view(-1)[-1] = vocab // world  # the second rank's first class
            cases.append((hidden, weight, targets, chunk, dtype, backend))
    mp.spawn(_vocab_parallel_worker, args=(world, _free_port(), cases, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, (hidden, weight, targets, chunk, dtype, backend) in enumerate(cases):
        one = _flce(hidden, weight, targets, chunk, backend, dtype, 0.75)
        ref = _flce(hidden.to(dtype), weight.to(dtype), targets, chunk, "float64", torch.float64, 0.75)
        plain = _flce(hidden, weight, targets, chunk, "torch", dtype, 0.75)
        slice_ = weight.shape[0] // world
        for r, (loss, dh, dw) in enumerate(res[i] for res in ranks):
            rows = slice(r * slice_, (r + 1) * slice_)
            assert dh.dtype == dtype and dw.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(loss, one[0], rtol=1e-6, atol=0)
                torch.testing.assert_close(dh, one[1], rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(dw, one[2][rows], rtol=1e-5, atol=1e-7)
            assert_close_rule(loss, plain[0], ref[0], name=f"{backend} loss rank {r}")
            assert_close_rule(dh, plain[1], ref[1], factor=3.0, name=f"{backend} dhidden rank {r}")
            assert_close_rule(dw, plain[2][rows], ref[2][rows], factor=3.0, name=f"{backend} dweight rank {r}")


def test_process_group_must_be_a_process_group():
    with pytest.raises(TypeError, match="process_group"):
        mk.fused_linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long),
                                      process_group="tp")


# ---------------------------------------------------------------------------- errors, torch.library, compile
class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the kernel was launched")


def test_bad_inputs_raise_before_launch(monkeypatch):
    monkeypatch.setattr(ce, "_cross_entropy_fwd_kernel", _NoLaunch())
    with pytest.raises(TypeError, match="logits"):
        mk.cross_entropy(torch.randn(3, 10, dtype=torch.float64), torch.zeros(3, dtype=torch.long), backend="triton")
    with pytest.raises(ValueError, match="targets"):
        mk.cross_entropy(torch.randn(3, 10), torch.zeros(4, dtype=torch.long), backend="triton")
    with pytest.raises(TypeError, match="hidden"):
        mk.fused_linear_cross_entropy(torch.randn(3, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64),
                                      torch.zeros(3, dtype=torch.long), backend="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        mk.fused_linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long),
                                      chunk_size=0, backend="triton")


def test_opcheck():
    logits = torch.randn(5, 37, requires_grad=True)
    targets = _targets((5,), 37)
    torch.library.opcheck(torch.ops.meditron_kernels.triton_cross_entropy.default, (logits, targets, IGNORE))
    torch.library.opcheck(torch.ops.meditron_kernels.triton_cross_entropy.default, (logits.detach(), targets, IGNORE))
    _, stats = torch.ops.meditron_kernels.triton_cross_entropy(logits.detach(), targets, IGNORE)
    torch.library.opcheck(torch.ops.meditron_kernels.triton_cross_entropy_backward.default,
                          (torch.tensor(0.7), logits.detach(), targets, stats, IGNORE))
    hidden, weight = torch.randn(7, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.meditron_kernels.triton_fused_linear_cross_entropy.default,
                          (hidden, weight, _targets((7,), 37), IGNORE, 3, True, True))


def test_compile_fullgraph_matches_eager():
    hidden, weight = torch.randn(2, 6, 16), torch.randn(37, 16) / 4
    logits = torch.randn(2, 6, 37)
    targets = _targets((2, 6), 37)

    def step(logits, hidden, weight):
        a = mk.cross_entropy(logits, targets, backend="triton")
        b = mk.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=5, backend="triton")
        return a, b, 0.3 * a + 0.7 * b

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        inputs = [t.clone().requires_grad_() for t in (logits, hidden, weight)]
        a, b, total = fn(*inputs)
        total.backward()
        results.append([a.detach(), b.detach()] + [t.grad for t in inputs])
    for e, c in zip(*results):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def ce_reports():
    return list(module_reports("meditron_kernels.ops.cross_entropy").values())


@pytest.mark.parametrize("cc", [80, 90])
def test_static_compile(cc, ce_reports):
    reports = [r for r in ce_reports if r["arch"] == f"sm_{cc}"]
    assert {r["kernel"] for r in reports} == {"cross_entropy_fwd", "cross_entropy_bwd",
                                              "cross_entropy_fwd_grad_in_place", "cross_entropy_partial_stats"}
    for rec in reports:
        assert rec["spill_bytes"] == 0 and rec["stack_bytes"] == 0, rec
        assert rec["shared_bytes"] <= rec["shared_limit"], rec
        assert rec["vector_load_bits"] == 128, rec  # 32000-wide bf16 rows are 16-byte aligned
