"""meditron_kernels: fused kernels for training Llama-2-family models.

The functional API. Shapes follow flash-attn, ``(batch, seq, heads, head_dim)``. Every op
is differentiable and takes ``backend=None`` ("torch" | "triton" | "cuda"; see
:mod:`meditron_kernels.backend` for how None resolves). Inputs are validated here, once,
for every backend.
"""
from __future__ import annotations

import inspect
import math

import torch

from . import _validate as V
from . import reference  # noqa: F401  (registers the torch backend)
from .backend import BACKENDS, dispatch, get_backend, set_backend, use_backend
from .reference import rotary_cos_sin as _rotary_cos_sin

__version__ = "0.1.0"

__all__ = [
    "rms_norm", "rotary_cos_sin", "apply_rotary", "swiglu", "swiglu_packed", "geglu", "geglu_packed", "xielu",
    "flash_attention",
    "cross_entropy", "fused_linear_cross_entropy", "set_backend", "get_backend", "use_backend", "BACKENDS",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None,
             *, offset: float = 0.0, backend: str | None = None):
    """RMSNorm with float32 statistics; with ``residual``, the fused pre-norm add.

    x (..., hidden), weight (hidden,) -> y (..., hidden) in x.dtype.
    With residual (same shape and dtype as x): h = x + residual, y = rms_norm(h); returns (y, h).
    offset: y = x * rstd * (offset + weight), with offset + weight formed in float32. offset=1.0 is
    Gemma's RMSNorm (weights stored as a deviation from 1, initialised to 0); 0.0 is Llama's.
    """
    V.floating(x, "x")
    V.floating(weight, "weight")
    V.ndim(x, "x", tuple(range(1, 9)), "(..., hidden) with at least one dim")
    V.ndim(weight, "weight", 1, "1-D (hidden,)")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} elements but x has hidden size {x.shape[-1]}")
    V.same_device(weight, "weight", x, "x")
    if weight.dtype != x.dtype and weight.dtype != torch.float32:
        raise TypeError(f"weight must have x's dtype ({x.dtype}) or float32, got {weight.dtype}")
    V.positive_float(eps, "eps")
    if residual is not None:
        V.floating(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        V.same_dtype(residual, "residual", x, "x")
        V.same_device(residual, "residual", x, "x")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset must be a float, got {type(offset).__name__}")
    if not math.isfinite(offset):
        raise ValueError(f"offset must be finite, got {offset!r}")
    if offset:
        # Folded into a float32 weight, exactly Gemma's (1.0 + w.float()): every backend already takes
        # a float32 weight with 16-bit x, so the fused kernels, their DTensor rules and the gradient
        # (d(offset + w)/dw = 1, cast back to weight's dtype by autograd) are unchanged. It costs one
        # (hidden,) op, 1 / rows of the norm's own traffic.
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32)) + offset
    return dispatch("rms_norm", backend, x.device)(x, weight, eps, residual)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float = 10000.0, device=None, scaling: dict | None = None):
    """Rotary tables: -> cos, sin, each (seq_len, head_dim // 2) float32.

    scaling: transformers' ``rope_parameters`` (or legacy ``rope_scaling``) dict, computed exactly
    as transformers does: ``{"rope_type": "default"}`` or None; ``"linear"`` with ``factor`` (Gemma 3's
    global layers); ``"llama3"`` with ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings`` (Llama 3.1-3.3). Their attention scaling is 1.0, so the tables
    are plain cos and sin. Other types (yarn, longrope, dynamic, ...) raise a ValueError naming them.
    A per-layer base (Gemma 3's local and global layers) is one call per base.
    """
    if isinstance(device, dict) and scaling is None:  # the contract's positional form (..., theta, scaling)
        device, scaling = None, device
    V.positive_int(seq_len, "seq_len")
    V.positive_int(head_dim, "head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    V.positive_float(theta, "theta")
    V.rope_scaling(scaling, theta, reference.ROPE_TYPES)
    return _rotary_cos_sin(seq_len, head_dim, theta, device, scaling)


def _check_rotary_tables(cos, sin, head_dim: int, ref: torch.Tensor, n_positions: int | None):
    for t, name in ((cos, "cos"), (sin, "sin")):
        V.floating(t, name)
        V.ndim(t, name, 2, "2-D (max_positions, head_dim // 2)")
        if t.shape[1] != head_dim // 2:
            raise ValueError(f"{name} must have head_dim // 2 = {head_dim // 2} columns, got {t.shape[1]}")
        V.same_device(t, name, ref, "q")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if n_positions is not None and cos.shape[0] < n_positions:
        raise ValueError(f"cos and sin cover {cos.shape[0]} positions but seq is {n_positions}; "
                         "pass position_ids or longer tables")


def _check_position_ids(position_ids, shape: tuple[int, ...], ref: torch.Tensor, n_positions: int):
    V.integer(position_ids, "position_ids")
    if tuple(position_ids.shape) != shape:
        raise ValueError(f"position_ids must have shape {shape}, got {tuple(position_ids.shape)}")
    V.same_device(position_ids, "position_ids", ref, "q")
    V.position_range(position_ids, n_positions)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 position_ids: torch.Tensor | None = None, interleaved: bool = False, *, backend: str | None = None):
    """Rotary position embedding of q and k, out of place.

    q (batch, seq, n_heads, head_dim); k (batch, seq, n_kv_heads, head_dim). The angles are either
    tables cos, sin (max_positions, head_dim // 2) read at position_ids ((batch, seq) int, (1, seq)
    broadcast over the batch, or None for 0..seq-1), or per-token cos, sin (batch or 1, seq, head_dim)
    as transformers' rotary embeddings return them (then position_ids must be None): pair element j
    reads column j, so out = x * cos + rotate_half(x) * sin exactly as transformers defines it.
    interleaved=False rotates halves (HF Llama checkpoints); True rotates adjacent pairs (Meta's layout).
    """
    V.floating(q, "q")
    V.floating(k, "k")
    V.ndim(q, "q", 4, "4-D (batch, seq, n_heads, head_dim)")
    V.ndim(k, "k", 4, "4-D (batch, seq, n_kv_heads, head_dim)")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must share (batch, seq), got {tuple(q.shape[:2])} and {tuple(k.shape[:2])}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[3] % 2:
        raise ValueError(f"head_dim must be even for rotary, got {q.shape[3]}")
    V.same_dtype(k, "k", q, "q")
    V.same_device(k, "k", q, "q")
    if isinstance(cos, torch.Tensor) and cos.dim() == 3:
        V.rotary_per_token(cos, sin, q)
        if position_ids is not None:
            raise ValueError("position_ids must be None with per-token cos and sin (batch, seq, head_dim): "
                             "those angles already belong to each token")
    else:
        _check_rotary_tables(cos, sin, q.shape[3], q, q.shape[1] if position_ids is None else None)
        if position_ids is not None:
            V.rotary_position_ids(position_ids, q, cos.shape[0])
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    return dispatch("apply_rotary", backend, q.device)(q, k, cos, sin, position_ids, interleaved)


def _check_gate_up(gate: torch.Tensor, up: torch.Tensor) -> None:
    V.floating(gate, "gate")
    V.floating(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)} but up has {tuple(up.shape)}")
    V.same_dtype(up, "up", gate, "gate")
    V.same_device(up, "up", gate, "gate")


def _check_packed_gate_up(gate_up: torch.Tensor) -> None:
    V.floating(gate_up, "gate_up")
    V.ndim(gate_up, "gate_up", tuple(range(1, 9)), "(..., 2 * ffn)")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (2 * ffn), got {gate_up.shape[-1]}")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up for any matching shapes."""
    _check_gate_up(gate, up)
    return dispatch("swiglu", backend, gate.device)(gate, up)


def swiglu_packed(gate_up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SwiGLU on the output of one fused w1|w3 GEMM: gate_up (..., 2 * ffn) = [gate | up] -> (..., ffn)."""
    _check_packed_gate_up(gate_up)
    return dispatch("swiglu_packed", backend, gate_up.device)(gate_up)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up for any matching shapes (Gemma's MLP; torch's gelu(approximate="tanh"))."""
    _check_gate_up(gate, up)
    return dispatch("geglu", backend, gate.device)(gate, up)


def geglu_packed(gate_up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """GeGLU on the output of one fused gate|up GEMM: gate_up (..., 2 * ffn) = [gate | up] -> (..., ffn)."""
    _check_packed_gate_up(gate_up)
    return dispatch("geglu_packed", backend, gate_up.device)(gate_up)


def xielu(x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: float = 0.5, eps: float = -1e-6, *,
          backend: str | None = None) -> torch.Tensor:
    """xIELU, Apertus's activation, with transformers' parameters as its checkpoints store them.

    x (...) -> (...) in x.dtype. alpha_p, alpha_n: the learned one-element tensors (XIELUActivation's
    ``alpha_p``, ``alpha_n``, before their softplus), any float dtype, differentiable. beta, eps: the
    module's fixed buffers as floats (``float(act.beta)``, ``float(act.eps)``).
        a_p = softplus(alpha_p), a_n = beta + softplus(alpha_n)
        y = a_p x^2 + beta x                        for x > 0
        y = a_n (expm1(min(x, eps)) - x) + beta x   for x <= 0
    Computed in float32 for 16-bit x and rounded once.
    """
    V.floating(x, "x")
    for t, name in ((alpha_p, "alpha_p"), (alpha_n, "alpha_n")):
        V.floating(t, name)
        if t.numel() != 1:
            raise ValueError(f"{name} must hold one element (XIELUActivation's ({1},) parameter), "
                             f"got shape {tuple(t.shape)}")
        V.same_device(t, name, x, "x")
    for v, name in ((beta, "beta"), (eps, "eps")):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float (e.g. float(act.{name})), got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
    return dispatch("xielu", backend, x.device)(x, alpha_p, alpha_n, float(beta), float(eps))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, *, cu_seqlens: torch.Tensor | None = None,
                    max_seqlen: int | None = None, cu_seqlens_k: torch.Tensor | None = None,
                    max_seqlen_k: int | None = None, seqlens_k: torch.Tensor | None = None,
                    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                    position_ids: torch.Tensor | None = None, return_lse: bool = False,
                    window: tuple[int, int] | None = None, backend: str | None = None):
    """Exact attention, softmax(q k^T * softmax_scale) v, with GQA, packing, fused rotary and a KV cache.

    Batched: q (batch, sq, n_heads, d); k, v (batch, sk, n_kv_heads, d) -> (batch, sq, n_heads, d).
    sq may differ from sk. causal is bottom-right aligned (as in FlashAttention 2.1+): query i sees
    keys 0 .. i + sk - sq, so the queries are the last sq positions; causal needs sq <= sk.
    seqlens_k (batch,) int32, batched only: sequence b has only its first seqlens_k[b] keys (the rest
    of k and v, e.g. an unfilled KV cache, is never read), and its queries are the last sq of them.
    Packed (cu_seqlens given): q (total_q, n_heads, d); k, v (total_k, n_kv_heads, d); cu_seqlens
    (n_docs + 1,) int32 offsets of the queries, cu_seqlens_k those of the keys (default: cu_seqlens);
    a token attends only inside its own document, with the same bottom-right alignment per document.
    max_seqlen / max_seqlen_k: optional bounds on the longest query / key document.
    n_heads % n_kv_heads == 0: query head j reads kv head j // (n_heads // n_kv_heads), without copies.
    softmax_scale defaults to 1 / sqrt(d). rotary=(cos, sin) rotates q and k (rotate-half layout) first;
    position_ids give the keys' positions ((batch, sk), or (total_k,) when packed), by default 0..sk-1
    restarting per document, and each query takes the position of the key it is aligned with (the last sq).
    return_lse=True -> (o, lse): the natural log-sum-exp of each query row's scaled scores, float32,
    (batch, n_heads, sq), or (n_heads, total_q) when packed (FlashAttention's varlen layout); it is
    differentiable too.
    window=(left, right): local attention with FlashAttention's window_size semantics: the query aligned
    with key j sees keys j - left .. j + right, -1 meaning unbounded on that side (causal caps right at
    0). transformers' sliding_window W is window=(W - 1, 0). None or (-1, -1): global attention.
    """
    packed = cu_seqlens is not None
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        V.floating(t, name)
        if packed:
            V.ndim(t, name, 3, "3-D (total_tokens, heads, head_dim) when cu_seqlens is given")
        else:
            V.ndim(t, name, 4, "4-D (batch, seq, heads, head_dim)")
    for t, name in ((k, "k"), (v, "v")):
        V.same_dtype(t, name, q, "q")
        V.same_device(t, name, q, "q")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must share the batch size, got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    n_heads, n_kv = q.shape[-2], k.shape[-2]
    if n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    if packed:
        if seqlens_k is not None:
            raise ValueError("seqlens_k is for batched k/v; with cu_seqlens, delimit the keys with cu_seqlens_k")
        V.cu_seqlens(cu_seqlens, q.shape[0], max_seqlen, q)
        if cu_seqlens_k is not None:
            V.cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, q, name="cu_seqlens_k", tokens_of="k",
                         max_name="max_seqlen_k")
            if cu_seqlens_k.shape != cu_seqlens.shape:
                raise ValueError(f"cu_seqlens_k must have as many documents as cu_seqlens, got "
                                 f"{cu_seqlens_k.shape[0] - 1} and {cu_seqlens.shape[0] - 1}")
            V.key_lengths(cu_seqlens, cu_seqlens_k, causal)
        else:
            if k.shape[0] != q.shape[0]:
                raise ValueError(f"k has {k.shape[0]} tokens but q has {q.shape[0]}; "
                                 "pass cu_seqlens_k to delimit documents of different lengths")
            if max_seqlen_k is not None:
                raise ValueError("max_seqlen_k is only meaningful with cu_seqlens_k")
    else:
        for value, name in ((max_seqlen, "max_seqlen"), (cu_seqlens_k, "cu_seqlens_k"), (max_seqlen_k, "max_seqlen_k")):
            if value is not None:
                raise ValueError(f"{name} is only meaningful with cu_seqlens")
        if seqlens_k is not None:
            V.seqlens_k(seqlens_k, q.shape[0], q.shape[1], k.shape[1], causal, q)
        elif causal and q.shape[1] > k.shape[1]:
            raise ValueError(f"causal attention needs sq <= sk (queries are the last sq keys), got sq={q.shape[1]} "
                             f"and sk={k.shape[1]}")
        elif q.shape[1] and not k.shape[1]:
            raise ValueError(f"k has no keys (sk=0) for sq={q.shape[1]} queries")
    if rotary is not None:
        if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
            raise TypeError("rotary must be a (cos, sin) pair")
        if q.shape[-1] % 2:
            raise ValueError(f"head_dim must be even for rotary, got {q.shape[-1]}")
        if position_ids is not None:
            n_pos = None
        elif packed:
            n_pos = max_seqlen_k if cu_seqlens_k is not None else max_seqlen
        else:
            n_pos = k.shape[1]
        _check_rotary_tables(rotary[0], rotary[1], q.shape[-1], q, n_pos)
        if position_ids is not None:
            _check_position_ids(position_ids, tuple(k.shape[:-2]), q, rotary[0].shape[0])
    elif position_ids is not None:
        raise ValueError("position_ids is only used with rotary=(cos, sin)")
    window = _check_window(window, backend, q)
    # the inference options travel as keywords, and only when used
    extra = {name: value for name, value in (("cu_seqlens_k", cu_seqlens_k), ("max_seqlen_k", max_seqlen_k),
                                              ("seqlens_k", seqlens_k), ("window", window)) if value is not None}
    if return_lse:
        extra["return_lse"] = True
    return dispatch("flash_attention", backend, q.device)(
        q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, rotary, position_ids, **extra)


def _check_window(window, backend_name, q) -> tuple[int, int] | None:
    """-> (left, right), or None for global attention; refuses a backend without local attention."""
    if window is None:
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window)):
        raise ValueError(f"window must be a (left, right) pair of ints >= -1 (-1: unbounded), got {window!r}")
    if tuple(window) == (-1, -1):
        return None
    from . import backend as B

    name = B.resolve(backend_name, q.device, "flash_attention", q.shape[-1])
    impl = B.implementations("flash_attention").get(name)
    if impl is not None and "window" not in inspect.signature(impl).parameters:
        raise NotImplementedError(f"flash_attention: window={tuple(window)} (local attention) is not implemented "
                                  f"by the {name!r} backend yet; use backend='torch'")
    return int(window[0]), int(window[1])


def _check_targets(targets, lead_shape, ref, ignore_index):
    V.integer(targets, "targets")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"targets must have shape {tuple(lead_shape)}, got {tuple(targets.shape)}")
    V.same_device(targets, "targets", ref, "logits" if ref.dim() else "hidden")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
                  backend: str | None = None) -> torch.Tensor:
    """logits (..., vocab), targets (...) int -> float32 scalar: mean loss over targets != ignore_index."""
    V.floating(logits, "logits")
    V.ndim(logits, "logits", tuple(range(1, 9)), "(..., vocab)")
    _check_targets(targets, logits.shape[:-1], logits, ignore_index)
    return dispatch("cross_entropy", backend, logits.device)(logits, targets, ignore_index)


def fused_linear_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, *, chunk_size: int | None = None, process_group=None,
                               backend: str | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ lm_head_weight.T, targets) without materialising all logits.

    hidden (..., dim); lm_head_weight (vocab, dim); targets (...) -> float32 scalar.
    Tokens go through in chunks of ``chunk_size`` (default: about the size of hidden in logits).

    Vocabulary-parallel (Megatron's loss for a tensor-parallel head): with ``process_group``
    (a torch.distributed ProcessGroup of tp ranks), every rank passes the same hidden and
    targets and its own slice of the head, lm_head_weight (vocab / tp, dim), rank r holding
    rows [r * vocab / tp, (r + 1) * vocab / tp) as a ColwiseParallel head does. Each rank
    reduces its slice in chunks and the ranks exchange 3 floats per token (max, sum of
    exponentials, target logit); no rank ever holds logits over the whole vocabulary. Every
    rank returns the same loss over the whole vocabulary; hidden's gradient is the whole one
    (summed over the group) and the weight's gradient is this rank's slice of it.
    """
    V.floating(hidden, "hidden")
    V.floating(lm_head_weight, "lm_head_weight")
    V.ndim(hidden, "hidden", tuple(range(1, 9)), "(..., dim)")
    V.ndim(lm_head_weight, "lm_head_weight", 2, "2-D (vocab, dim)")
    if lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight has dim {lm_head_weight.shape[1]} but hidden has {hidden.shape[-1]}")
    V.same_dtype(lm_head_weight, "lm_head_weight", hidden, "hidden")
    V.same_device(lm_head_weight, "lm_head_weight", hidden, "hidden")
    _check_targets(targets, hidden.shape[:-1], hidden, ignore_index)
    if chunk_size is not None:
        V.positive_int(chunk_size, "chunk_size")
    V.process_group(process_group, "process_group")
    return dispatch("fused_linear_cross_entropy", backend, hidden.device)(
        hidden, lm_head_weight, targets, ignore_index, chunk_size, process_group)


# The Triton and CUDA implementations register on import; ops/__init__.py lists their modules.
from . import ops  # noqa: E402,F401
