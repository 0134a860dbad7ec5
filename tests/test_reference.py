"""Each reference op against an independent float64 formula, forward and gradients."""
import math

import pytest
import torch

import meditron_kernels as mk
from meditron_kernels import reference as R

D = torch.float64


def test_rms_norm_matches_formula():
    x = torch.randn(3, 7, 123, dtype=D, requires_grad=True)
    w = torch.randn(123, dtype=D, requires_grad=True)
    y = mk.rms_norm(x, w, eps=1e-6)
    expect = torch.stack([xi / math.sqrt(float((xi * xi).mean()) + 1e-6) for xi in x.detach().reshape(-1, 123)])
    assert torch.allclose(y.detach(), (expect * w.detach()).reshape(x.shape), atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: R.rms_norm(a, b, 1e-6), (x[:1, :2, :9].detach().requires_grad_(),
                                                                             w[:9].detach().requires_grad_()))


def test_rms_norm_residual_returns_sum():
    x, r = torch.randn(5, 1000, dtype=D), torch.randn(5, 1000, dtype=D)
    w = torch.randn(1000, dtype=D)
    y, h = mk.rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(h, x + r)
    assert torch.allclose(y, mk.rms_norm(x + r, w, 1e-5))


def test_rotary_tables_formula():
    cos, sin = mk.rotary_cos_sin(37, 64, theta=10000.0)
    assert cos.shape == (37, 32) and cos.dtype == torch.float32
    for p in (0, 1, 36):
        for i in (0, 5, 31):
            ang = p / (10000.0 ** (2 * i / 64))
            assert abs(cos[p, i].item() - math.cos(ang)) < 1e-7 and abs(sin[p, i].item() - math.sin(ang)) < 1e-7


def _rotate_pair_loop(x, cos, sin, pos, interleaved):
    # x (b, s, h, d): rotate each (a, b) pair by angle (pos, i), one element at a time
    b, s, h, d = x.shape
    out = torch.empty_like(x)
    for bi in range(b):
        for si in range(s):
            p = pos[bi, si]
            for i in range(d // 2):
                ia, ib = (2 * i, 2 * i + 1) if interleaved else (i, i + d // 2)
                c, sn = cos[p, i].double(), sin[p, i].double()
                xa, xb = x[bi, si, :, ia], x[bi, si, :, ib]
                out[bi, si, :, ia] = xa * c - xb * sn
                out[bi, si, :, ib] = xb * c + xa * sn
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("with_pos", [False, True])
def test_apply_rotary_matches_pairwise_rotation(interleaved, with_pos):
    b, s, h, hkv, d = 2, 5, 4, 2, 8
    q, k = torch.randn(b, s, h, d, dtype=D), torch.randn(b, s, hkv, d, dtype=D)
    cos, sin = mk.rotary_cos_sin(16, d)
    pos = torch.randint(0, 16, (b, s)) if with_pos else torch.arange(s).expand(b, s)
    q2, k2 = mk.apply_rotary(q, k, cos, sin, pos if with_pos else None, interleaved=interleaved)
    assert torch.allclose(q2, _rotate_pair_loop(q, cos, sin, pos, interleaved), atol=1e-12)
    assert torch.allclose(k2, _rotate_pair_loop(k, cos, sin, pos, interleaved), atol=1e-12)


def test_apply_rotary_is_norm_preserving_and_invertible():
    q, k = torch.randn(1, 9, 2, 16, dtype=D, requires_grad=True), torch.randn(1, 9, 1, 16, dtype=D, requires_grad=True)
    cos, sin = mk.rotary_cos_sin(9, 16)
    q2, k2 = mk.apply_rotary(q, k, cos, sin)
    assert torch.allclose(q2.norm(dim=-1), q.norm(dim=-1))
    # the conjugate rotation (sin -> -sin) undoes it
    q3, _ = mk.apply_rotary(q2, k2, cos, -sin)
    assert torch.allclose(q3, q, atol=1e-12)
    # the gradient is the conjugate rotation of the incoming gradient
    g = torch.randn_like(q2)
    (gq,) = torch.autograd.grad(q2, q, g)
    assert torch.allclose(gq, mk.apply_rotary(g, g[:, :, :1], cos, -sin)[0], atol=1e-12)


def test_swiglu_formula_and_packed():
    g, u = torch.randn(4, 97, dtype=D), torch.randn(4, 97, dtype=D)
    expect = g / (1 + torch.exp(-g)) * u
    assert torch.allclose(mk.swiglu(g, u), expect, atol=1e-12)
    assert torch.allclose(mk.swiglu_packed(torch.cat([g, u], -1)), expect, atol=1e-12)


def test_geglu_formula_and_packed():
    g, u = torch.randn(5, 33, dtype=D), torch.randn(5, 33, dtype=D)
    expect = [0.5 * a * (1 + math.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))) * b
              for a, b in zip(g.flatten().tolist(), u.flatten().tolist())]
    torch.testing.assert_close(mk.geglu(g, u).flatten(), torch.tensor(expect, dtype=D), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mk.geglu_packed(torch.cat([g, u], -1)), mk.geglu(g, u), rtol=0, atol=0)


def test_xielu_formula():
    alpha_p, alpha_n, beta, eps = 0.3, -0.7, 0.5, -1e-6
    a_p, a_n = math.log1p(math.exp(alpha_p)), beta + math.log1p(math.exp(alpha_n))
    x = torch.cat([3 * torch.randn(64, dtype=D), torch.tensor([0.0, -1e-7, -1e-6, -1e-3], dtype=D)])
    expect = [a_p * v * v + beta * v if v > 0 else a_n * (math.expm1(min(v, eps)) - v) + beta * v for v in x.tolist()]
    y = mk.xielu(x, torch.tensor([alpha_p], dtype=D), torch.tensor([alpha_n], dtype=D), beta, eps)
    torch.testing.assert_close(y, torch.tensor(expect, dtype=D), rtol=1e-12, atol=1e-15)


def _attention_loops(q, k, v, causal, scale, doc=None, window=(-1, -1)):
    # q (sq, h, d); k, v (sk, hkv, d): a row-by-row softmax with explicit head mapping; query i is
    # aligned with key i + sk - sq and, with window (left, right), sees keys left before to right after it
    sq, h, d = q.shape
    sk = k.shape[0]
    group = h // k.shape[1]
    left, right = window
    out = torch.zeros_like(q)
    for head in range(h):
        kh = head // group
        for i in range(sq):
            at = i + sk - sq
            keys = [j for j in range(sk) if (not causal or j <= at) and (doc is None or doc[j] == doc[i])
                    and (left < 0 or j >= at - left) and (right < 0 or j <= at + right)]
            sc = torch.tensor([float(q[i, head] @ k[j, kh]) * scale for j in keys], dtype=D)
            p = torch.exp(sc - sc.max())
            p = p / p.sum()
            out[i, head] = sum(pj * v[j, kh] for pj, j in zip(p, keys))
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 1), (8, 2)])
def test_attention_matches_loops(causal, h, hkv):
    b, s, d = 2, 7, 8
    q, k, v = (torch.randn(b, s, n, d, dtype=D) for n in (h, hkv, hkv))
    o = mk.flash_attention(q, k, v, causal=causal, softmax_scale=0.3)
    for bi in range(b):
        assert torch.allclose(o[bi], _attention_loops(q[bi], k[bi], v[bi], causal, 0.3), atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_stays_in_document(causal):
    lens = [3, 1, 5, 2]
    cu = torch.tensor([0, 3, 4, 9, 11], dtype=torch.int32)
    q, k, v = torch.randn(11, 4, 8, dtype=D), torch.randn(11, 2, 8, dtype=D), torch.randn(11, 2, 8, dtype=D)
    doc = sum(([i] * n for i, n in enumerate(lens)), [])
    o = mk.flash_attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=5)
    assert torch.allclose(o, _attention_loops(q, k, v, causal, 8 ** -0.5, doc), atol=1e-12)


@pytest.mark.parametrize("causal,window", [(True, (2, -1)), (True, (0, 0)), (False, (1, 2)), (False, (-1, 0))])
def test_sliding_window_attention_matches_loops(causal, window):
    # batched with sq < sk (bottom-right aligned), a KV cache with per-sequence lengths, and packed documents
    q, k, v = torch.randn(2, 4, 4, 8, dtype=D), torch.randn(2, 9, 2, 8, dtype=D), torch.randn(2, 9, 2, 8, dtype=D)
    o = mk.flash_attention(q, k, v, causal=causal, window=window)
    for bi in range(2):
        assert torch.allclose(o[bi], _attention_loops(q[bi], k[bi], v[bi], causal, 8 ** -0.5, window=window),
                              atol=1e-12)
    lens = torch.tensor([6, 9], dtype=torch.int32)
    o = mk.flash_attention(q, k, v, causal=causal, window=window, seqlens_k=lens)
    for bi, n in enumerate(lens.tolist()):
        assert torch.allclose(o[bi], _attention_loops(q[bi], k[bi, :n], v[bi, :n], causal, 8 ** -0.5, window=window),
                              atol=1e-12)
    lens = [3, 1, 5, 2]
    cu = torch.tensor([0, 3, 4, 9, 11], dtype=torch.int32)
    doc = sum(([i] * n for i, n in enumerate(lens)), [])
    q, k, v = torch.randn(11, 4, 8, dtype=D), torch.randn(11, 2, 8, dtype=D), torch.randn(11, 2, 8, dtype=D)
    o = mk.flash_attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=5, window=window)
    assert torch.allclose(o, _attention_loops(q, k, v, causal, 8 ** -0.5, doc, window), atol=1e-12)


def test_packed_rotary_restarts_positions_per_document():
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    q, k, v = torch.randn(10, 2, 8, dtype=D), torch.randn(10, 2, 8, dtype=D), torch.randn(10, 2, 8, dtype=D)
    cos, sin = mk.rotary_cos_sin(16, 8)
    o = mk.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=6, rotary=(cos, sin))
    for a, b in ((0, 4), (4, 10)):
        alone = mk.flash_attention(q[None, a:b], k[None, a:b], v[None, a:b], rotary=(cos, sin))[0]
        assert torch.allclose(o[a:b], alone, atol=1e-12)


def test_attention_rotary_equals_apply_then_attend():
    q, k, v = torch.randn(2, 6, 4, 8, dtype=D), torch.randn(2, 6, 2, 8, dtype=D), torch.randn(2, 6, 2, 8, dtype=D)
    cos, sin = mk.rotary_cos_sin(32, 8)
    pos = torch.randint(0, 32, (2, 6))
    q2, k2 = mk.apply_rotary(q, k, cos, sin, pos)
    assert torch.allclose(mk.flash_attention(q, k, v, rotary=(cos, sin), position_ids=pos),
                          mk.flash_attention(q2, k2, v), atol=1e-12)


def test_attention_gradients():
    q, k, v = (torch.randn(1, 5, n, 4, dtype=D, requires_grad=True) for n in (2, 1, 1))
    assert torch.autograd.gradcheck(lambda a, b, c: mk.flash_attention(a, b, c), (q, k, v))


def _ce_formula(logits, targets, ignore):
    losses = [torch.logsumexp(row, 0) - row[t] for row, t in zip(logits, targets) if t != ignore]
    return torch.stack(losses).mean()


def test_cross_entropy_formula_with_ignore():
    logits = torch.randn(3, 7, 50, dtype=D)
    t = torch.randint(0, 50, (3, 7))
    t[0, 2] = t[2, 6] = -100
    got = mk.cross_entropy(logits, t)
    assert got.dtype == torch.float32
    assert abs(got.item() - _ce_formula(logits.reshape(-1, 50), t.reshape(-1), -100).item()) < 1e-6


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
def test_fused_linear_cross_entropy_matches_unfused(chunk_size):
    h = torch.randn(2, 9, 16, dtype=D, requires_grad=True)
    w = torch.randn(37, 16, dtype=D, requires_grad=True)
    t = torch.randint(0, 37, (2, 9))
    t[1, 3] = 5
    t[0, 0] = -1
    loss = mk.fused_linear_cross_entropy(h, w, t, ignore_index=-1, chunk_size=chunk_size)
    ref = _ce_formula((h @ w.t()).reshape(-1, 37), t.reshape(-1), -1)
    gh, gw = torch.autograd.grad(3.0 * loss, (h, w))
    rh, rw = torch.autograd.grad(3.0 * ref, (h, w))
    assert abs(loss.item() - ref.item()) < 1e-6
    assert torch.allclose(gh, rh, atol=1e-10) and torch.allclose(gw, rw, atol=1e-10)


def test_fused_linear_cross_entropy_without_grad():
    h, w = torch.randn(10, 8), torch.randn(20, 8)
    t = torch.randint(0, 20, (10,))
    with torch.no_grad():
        loss = mk.fused_linear_cross_entropy(h, w, t)
    assert abs(loss.item() - torch.nn.functional.cross_entropy(h @ w.t(), t).item()) < 1e-5


def test_default_chunk_size():
    # 16k tokens of Llama-2-70B: 4 chunks of about the hidden states' size
    assert R.default_chunk_size(16384, 8192, 32000) == 4096
    # a thin model never drops below 1024-token GEMMs, nor above the batch
    assert R.default_chunk_size(4096, 256, 32000) == 1024
    assert R.default_chunk_size(100, 256, 32000) == 100
