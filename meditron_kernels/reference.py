"""Pure-PyTorch reference of every op.

These are the test oracle (call them with float32 or float64 inputs), the "torch eager"
baseline of the benchmarks, and the ``torch`` backend that runs on the CPU. They follow
plain PyTorch numerics in the input dtype: matmuls in that dtype, reductions and softmax
in float32, one rounding at the end. Inputs are validated by the public API, not here.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .backend import register


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in its accumulation dtype: float32 for 16-bit floats, unchanged for float32/float64."""
    return x.float() if x.element_size() < 4 else x


# ---------------------------------------------------------------------------- RMSNorm
@register("rms_norm", "torch")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None):
    """x (..., hidden), weight (hidden,) -> y (..., hidden), or (y, h) with h = x + residual."""
    h = x if residual is None else x + residual
    hf = _acc(h)
    rstd = torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (hf * rstd * weight.to(hf.dtype)).to(x.dtype)
    return y if residual is None else (y, h)


# ---------------------------------------------------------------------------- rotary
ROPE_TYPES = ("default", "linear", "llama3")
"""The rope scalings :func:`rotary_cos_sin` implements, by transformers' ``rope_type`` name. Their
attention scaling (the factor transformers multiplies cos and sin by) is 1.0, so the tables are the
plain cos and sin of the scaled angles; yarn, longrope and dynamic are refused by name."""


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(head_dim // 2,) inverse frequencies theta^(-2i / head_dim), rescaled as transformers'
    ``modeling_rope_utils`` does for ``scaling["rope_type"]`` (default, linear or llama3).

    The arithmetic is transformers', operation for operation, in ``dtype``: in float32 it gives
    transformers' inv_freq bit for bit (tests/ops/test_rotary.py checks it); float64 is what the
    tables use. ``scaling`` was validated by the public API (_validate.rope_scaling).
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    kind = rope_type(scaling)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Wavelengths shorter than old_len / high_freq_factor keep their frequency, those longer
        # than old_len / low_freq_factor are slowed by factor, and the band between is blended
        # linearly in old_len / wavelength (continuous at both edges).
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_type(scaling: dict | None) -> str:
    """The rope type a scaling dict names: ``rope_type``, else the legacy ``type``, else default."""
    if scaling is None:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float = 10000.0, device=None, scaling: dict | None = None):
    """-> cos, sin, each (seq_len, head_dim // 2) float32.

    Angles are formed in float64 and rounded once: in float32, position * inv_freq loses
    about 2e-4 rad by position 4096. ``scaling``: transformers' rope_parameters (see rope_inv_freq).
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _rotate(x: torch.Tensor, c1: torch.Tensor, s1: torch.Tensor, c2: torch.Tensor, s2: torch.Tensor,
            interleaved: bool) -> torch.Tensor:
    # x (..., head_dim); the angles broadcastable to (..., head_dim // 2). Pair i is (x1, x2) =
    # (x[i], x[i + half]), or (x[2i], x[2i + 1]) when interleaved; it becomes
    # (x1 c1 - x2 s1, x2 c2 + x1 s2). Tables give c1 = c2, s1 = s2: a rotation.
    xf = _acc(x)
    c1, s1, c2, s2 = (t.to(xf.dtype) for t in (c1, s1, c2, s2))
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    return out.to(x.dtype)


def _rotate_at(x: torch.Tensor, tables, pos: torch.Tensor) -> torch.Tensor:
    # x (..., heads, head_dim) rotated (rotate-half layout) by the table rows at pos, which
    # broadcasts against x's leading dimensions and the heads
    c, s = tables[0][pos], tables[1][pos]
    return _rotate(x, c, s, c, s, False)


def _gather_angles(cos, sin, position_ids, seq_len, interleaved):
    # -> c1, s1, c2, s2 broadcastable against (batch, seq, heads, head_dim // 2)
    if cos.dim() == 3:
        # Per-token angles (batch or 1, seq, head_dim), as transformers computes them: the
        # first element of each pair reads its own column, the second its partner's.
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        if interleaved:
            return c[..., 0::2], s[..., 0::2], c[..., 1::2], s[..., 1::2]
        (c1, c2), (s1, s2) = c.chunk(2, dim=-1), s.chunk(2, dim=-1)
        return c1, s1, c2, s2
    if position_ids is None:
        c, s = cos[:seq_len, None, :], sin[:seq_len, None, :]
    else:
        pos = position_ids.long()  # (batch, seq), or (1, seq) broadcast over the batch
        c, s = cos[pos][:, :, None, :], sin[pos][:, :, None, :]
    return c, s, c, s


@register("apply_rotary", "torch")
def apply_rotary(q, k, cos, sin, position_ids=None, interleaved=False):
    """q (batch, seq, n_heads, head_dim), k (batch, seq, n_kv_heads, head_dim) -> rotated q, k.

    cos, sin: tables (max_positions, head_dim // 2) read at position_ids, or per-token angles
    (batch or 1, seq, head_dim).
    """
    angles = _gather_angles(cos, sin, position_ids, q.shape[1], interleaved)
    return _rotate(q, *angles, interleaved), _rotate(k, *angles, interleaved)


# ---------------------------------------------------------------------------- SwiGLU
@register("swiglu", "torch")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise, in the input dtype."""
    return F.silu(gate) * up


@register("swiglu_packed", "torch")
def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2 * ffn) = [gate | up] -> (..., ffn)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)


@register("geglu", "torch")
def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, elementwise, in the input dtype (Gemma's MLP)."""
    return F.gelu(gate, approximate="tanh") * up


@register("geglu_packed", "torch")
def geglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2 * ffn) = [gate | up] -> (..., ffn)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return geglu(gate, up)


# ---------------------------------------------------------------------------- xIELU
@register("xielu", "torch")
def xielu(x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: float = 0.5,
          eps: float = -1e-6) -> torch.Tensor:
    """Apertus's activation, from transformers' raw parameters: x (...), alpha_p, alpha_n (1,) -> (...).

    a_p = softplus(alpha_p), a_n = beta + softplus(alpha_n);
    y = a_p x^2 + beta x for x > 0, else a_n (expm1(min(x, eps)) - x) + beta x.
    In float32 for 16-bit x (transformers computes in x's dtype), rounded once.
    """
    xf = _acc(x)
    a_p = F.softplus(alpha_p.to(xf.dtype).reshape(()))  # 0-d: y keeps x's shape, even a 0-d x's
    a_n = beta + F.softplus(alpha_n.to(xf.dtype).reshape(()))
    pos = a_p * xf * xf + beta * xf
    # torch.minimum, as transformers: at a tie x == eps each side takes half the gradient
    neg = a_n * (torch.expm1(torch.minimum(xf, xf.new_tensor(eps))) - xf) + beta * xf
    return torch.where(xf > 0, pos, neg).to(x.dtype)


# ---------------------------------------------------------------------------- attention
def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: each packed token's position inside its own document."""
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)
    return idx - cu_seqlens.long()[doc]


def _attention(q, k, v, scale, mask=None):
    # q (batch, sq, n_heads, d); k, v (batch, sk, n_kv_heads, d); mask broadcastable to (batch, 1, 1, sq, sk)
    # bool, True = attend. -> o (batch, sq, n_heads, d), lse (batch, n_heads, sq) in the scores' dtype
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, sq, hkv, h // hkv, d)  # GQA as a view: query head j reads kv head j // group
    scores = _acc(torch.einsum("bqhgd,bkhd->bhgqk", qg, k)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1).reshape(b, h, sq)
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    o = torch.einsum("bhgqk,bkhd->bqhgd", p, v)
    return o.reshape(b, sq, h, d), lse


def _visible(diag: torch.Tensor, causal: bool, window) -> torch.Tensor:
    # diag: a key's index minus the index of the key its query is aligned with (bottom-right).
    # -> bool, True = attend. FlashAttention's window_size semantics: the query sees keys with
    # -left <= diag <= right, -1 meaning unbounded on that side; causal caps right at 0.
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    ok = diag <= right if right >= 0 else torch.ones_like(diag, dtype=torch.bool)
    return ok & (diag >= -left) if left >= 0 else ok


def _band_mask(sq: int, sk, device, causal: bool, window, n_keys: int = 0) -> torch.Tensor | None:
    # Bottom-right aligned: query i sits at key i + sk - sq. sk: an int, or a (batch,) tensor of
    # key counts with n_keys the key dimension -> (sq, sk) or (batch, 1, 1, sq, n_keys); None when
    # every key is visible.
    if not causal and window is None:
        return None
    i = torch.arange(sq, device=device)
    if isinstance(sk, int):
        return _visible(torch.arange(sk, device=device)[None, :] - (i[:, None] + (sk - sq)), causal, window)
    aligned = (i[None, :] + (sk.long()[:, None] - sq))[:, None, None, :, None]  # (batch, 1, 1, sq, 1)
    return _visible(torch.arange(n_keys, device=device) - aligned, causal, window)


def _packed_attention(q, k, v, causal, scale, cu_seqlens, max_seqlen, window=None):
    # Equal query and key documents. q (total, n_heads, d). Query block [qs, qe) can only see keys
    # within max_seqlen - 1 of it (or its window), so each block attends to a band of keys:
    # O(total x max_seqlen) work instead of O(total^2). -> o (total, n_heads, d), lse (n_heads, total)
    total = q.shape[0]
    doc = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(total, device=q.device), right=True)
    pos = torch.arange(total, device=q.device)
    band = max_seqlen if max_seqlen is not None else total
    left, right = window if window is not None else (-1, -1)
    back = band if left < 0 else min(band, left + 1)
    ahead = 1 if causal else (band if right < 0 else min(band, right + 1))
    block = max(band, 64)
    outs, lses = [], []
    for qs in range(0, total, block):
        qe = min(total, qs + block)
        ks = max(0, qs - back + 1)
        ke = min(total, qe + ahead - 1)
        # equal documents: a query is aligned with the key at its own index
        mask = (doc[qs:qe, None] == doc[None, ks:ke]) & _visible(pos[None, ks:ke] - pos[qs:qe, None], causal, window)
        o, lse = _attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], scale, mask)
        outs.append(o[0])
        lses.append(lse[0])
    if not outs:
        return q.new_empty(q.shape), q.new_empty(q.shape[1], 0, dtype=_acc(q[:0]).dtype)
    return torch.cat(outs), torch.cat(lses, dim=1)


def _packed_attention_qk(q, k, v, causal, scale, cu_q, cu_k, window=None):
    # Different query and key documents, one document at a time (inference: few documents).
    # -> o (total_q, n_heads, d), lse (n_heads, total_q)
    outs, lses = [], []
    for (qs, qe), (ks, ke) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()), zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        mask = _band_mask(qe - qs, ke - ks, q.device, causal, window)
        o, lse = _attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], scale, mask)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def _rotary_positions(position_ids, b, sk, sq, seqlens_k, device):
    # -> key positions (batch, sk) and query positions (batch, sq): the queries are the last sq keys
    if position_ids is not None:
        pos_k = position_ids.long().expand(b, sk)
    else:
        pos_k = torch.arange(sk, device=device).expand(b, sk)
    last = seqlens_k.long()[:, None] if seqlens_k is not None else torch.full((b, 1), sk, device=device)
    q_idx = (last - sq + torch.arange(sq, device=device)[None]).clamp(min=0)
    return pos_k, pos_k.gather(1, q_idx)


@register("flash_attention", "torch")
def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                    rotary=None, position_ids=None, cu_seqlens_k=None, max_seqlen_k=None, seqlens_k=None,
                    return_lse=False, window=None):
    """softmax(q k^T * scale [+ causal/document mask]) v, GQA by head groups.

    Batched: q (batch, sq, n_heads, d); k, v (batch, sk, n_kv_heads, d); causal is bottom-right
    aligned (query i sees keys 0 .. i + sk - sq); seqlens_k (batch,): only the first seqlens_k[b]
    keys of sequence b exist, and its queries are the last sq of them.
    Packed: q (total_q, n_heads, d), k, v (total_k, ...), documents delimited by cu_seqlens (queries)
    and cu_seqlens_k (keys, default cu_seqlens). Rotary: position_ids index the keys ((batch, sk) or
    (total_k,)), by default 0.. restarting per document; queries sit at the last positions.
    window=(left, right): local attention as FlashAttention's window_size (-1: unbounded on that side),
    measured from the key each query is aligned with; causal caps right at 0.
    -> o, or (o, lse) with lse (batch, n_heads, sq) or packed (n_heads, total_q), float32 (float64 for
    float64 inputs).
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        if rotary is not None:
            pos_k, pos_q = _rotary_positions(position_ids, b, sk, sq, seqlens_k, q.device)
            q = _rotate_at(q, rotary, pos_q[:, :, None])
            k = _rotate_at(k, rotary, pos_k[:, :, None])
        if seqlens_k is None:
            mask = _band_mask(sq, sk, q.device, causal, window)
        else:
            lens = seqlens_k.long()
            valid = torch.arange(sk, device=q.device) < lens[:, None]  # (batch, sk)
            # rows past a sequence's keys may hold anything (an unfilled cache): never let them in
            v = v.masked_fill(~valid[:, :, None, None], 0)
            mask = valid[:, None, None, None, :]
            band = _band_mask(sq, lens, q.device, causal, window, n_keys=sk)
            if band is not None:
                mask = mask & band
        o, lse = _attention(q, k, v, scale, mask)
    else:
        cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
        if rotary is not None:
            total_k = k.shape[0]
            pos_k = position_ids.long() if position_ids is not None else document_positions(cu_k, total_k)
            # query token t of document j sits at key index cu_k[j+1] - (cu_q[j+1] - t)
            doc = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(q.shape[0], device=q.device), right=True)
            q_idx = cu_k.long()[doc + 1] - (cu_seqlens.long()[doc + 1] - torch.arange(q.shape[0], device=q.device))
            pos_q = pos_k[q_idx]
            q = _rotate_at(q, rotary, pos_q[:, None])
            k = _rotate_at(k, rotary, pos_k[:, None])
        if cu_seqlens_k is None or cu_seqlens_k is cu_seqlens or torch.equal(cu_seqlens_k, cu_seqlens):
            o, lse = _packed_attention(q, k, v, causal, scale, cu_seqlens, max_seqlen, window)
        else:
            o, lse = _packed_attention_qk(q, k, v, causal, scale, cu_seqlens, cu_k, window)
    if not return_lse:
        return o
    return o, (lse if lse.dtype == torch.float64 else lse.float())


# ---------------------------------------------------------------------------- cross-entropy
@register("cross_entropy", "torch")
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits (..., vocab), targets (...) -> float32 scalar, mean over non-ignored targets."""
    loss = F.cross_entropy(_acc(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1).long(),
                           ignore_index=ignore_index)
    return loss.float()


MIN_CHUNK_TOKENS = 1024


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk so one chunk's logits are about the size of the hidden states, but at
    least MIN_CHUNK_TOKENS: thinner chunks make the GEMMs too small to run efficiently, while
    1024 x 32000 fp32 logits are only 131 MB."""
    n_chunks = max(1, math.ceil(vocab / hidden))
    return max(1, min(n_tokens, max(MIN_CHUNK_TOKENS, math.ceil(n_tokens / n_chunks))))


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked lm-head + cross-entropy: holds at most one chunk of logits at a time.

    The gradients are produced during the forward, chunk by chunk, while each chunk's
    logits are live; the backward only scales them by the incoming gradient. With a process
    group, ``weight`` is this rank's slice of the vocabulary (rank r holds rows
    [r * vocab, (r + 1) * vocab)): each rank reduces its slice, the ranks exchange per-token
    max, sum of exponentials and target logit, and dhidden is summed over the group.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, group):
        # hidden (n, dim), weight (vocab, dim), targets (n,)
        n = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != ignore_index
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n_valid = valid.sum().to(acc)
        loss = hidden.new_zeros((), dtype=acc)
        vocab = weight.shape[0]
        tp, start_v = (group.size(), group.rank() * vocab) if group is not None else (1, 0)
        dh_dtype = acc if group is not None else hidden.dtype  # partial sums over ranks in float32
        dhidden = torch.empty(hidden.shape, dtype=dh_dtype, device=hidden.device) if ctx.needs_input_grad[0] else None
        dweight = torch.zeros(weight.shape, dtype=_acc(weight[:0]).dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size].long()
            ok = valid[start:start + chunk_size]
            logits = _acc(h @ weight.t())
            local = t - start_v
            here = (local >= 0) & (local < vocab)
            safe_t = torch.where(here, local, torch.zeros_like(local))
            picked = torch.where(here, logits.gather(1, safe_t[:, None])[:, 0], 0.0)
            m_here = logits.amax(dim=-1)
            shift = torch.where(m_here == float("-inf"), 0.0, m_here)  # a masked slice adds 0, not NaN
            e = logits.sub_(shift[:, None]).exp_()  # in place: one chunk of logits at a time, no copies
            m, s = m_here, e.sum(dim=-1)
            if group is not None:
                stats = torch.stack([m, s, picked])
                pieces = [torch.empty_like(stats) for _ in range(tp)]
                dist.all_gather(pieces, stats, group=group)
                everyone = torch.stack(pieces)
                m = everyone[:, 0].amax(0)
                s = (everyone[:, 1] * torch.exp(everyone[:, 0] - m)).sum(0)
                picked = everyone[:, 2].sum(0)
            in_range = (t >= 0) & (t < vocab * tp)
            row = torch.where(in_range, (m - picked) + torch.log(s), float("nan"))
            loss = loss + torch.where(ok, row, torch.zeros_like(row)).sum()
            if need_grad:
                g = e.mul_((torch.exp(shift - m) / s)[:, None])  # the softmax over the whole vocabulary
                g.scatter_add_(1, safe_t[:, None], -here.to(g.dtype)[:, None])
                g = g.mul_((ok.to(g.dtype) / n_valid)[:, None]).to(hidden.dtype)
                if dhidden is not None:
                    dhidden[start:start + chunk_size] = g @ weight
                if dweight is not None:
                    dweight += g.t() @ h
            logits = e = g = None  # free this chunk before the next one's GEMM
        if group is not None and dhidden is not None:
            dist.all_reduce(dhidden, group=group)
            dhidden = dhidden.to(hidden.dtype)
        ctx.save_for_backward(dhidden, dweight)
        ctx.weight_dtype = weight.dtype
        return (loss / n_valid).float()

    @staticmethod
    def backward(ctx, grad_loss):
        dhidden, dweight = ctx.saved_tensors
        dh = dhidden * grad_loss.to(dhidden.dtype) if dhidden is not None else None
        dw = (dweight * grad_loss).to(ctx.weight_dtype) if dweight is not None else None
        return dh, dw, None, None, None, None


@register("fused_linear_cross_entropy", "torch")
def fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, chunk_size=None, process_group=None):
    """hidden (..., dim), weight (vocab, dim) or this rank's vocabulary slice, targets (...)
    -> float32 scalar mean loss over the whole vocabulary."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(h.shape[0], h.shape[1], weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, t, ignore_index, chunk_size, process_group)
