"""The attention op: the forward and backward drivers, the torch.library custom ops and their
autograd, the registration with the backend registry, and the launches of the static report."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ... import _validate as V
from ...backend import register
from .._common import Launch, device_of, unit_stride
from .backward import dkdv_launch, dq_launch, stats_launch
from .configs import (_INTERPRETER_DECODE, _TABLE_WS, DECODE_MIN_SPLIT, MAX_HEAD_DIM, NO_OVERRIDES, Config, Overrides,
                      current_overrides, decode_config, decode_splits, default_config, is_decode, run_tuned, tune_key,
                      use_tma, warp_spec_ok)
from .decode import decode_launch, reduce_launch
from .forward import fwd_launch
from .problem import Problem, launch_flags, lse_empty


def _ensure_allocator() -> None:
    # Descriptors made in the kernel live in a per-launch global scratch buffer that Triton asks an
    # allocator for. The allocator is a context variable: set it where it is still the null default
    # (autograd runs the backward on its own thread, with its own context).
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


# ---------------------------------------------------------------------------- drivers
def _cc(x: torch.Tensor) -> int | None:
    if x.is_cuda:
        major, minor = torch.cuda.get_device_capability(x.device)
        return major * 10 + minor
    return None


def attention_forward(P: Problem, q, k, v, ov: Overrides = NO_OVERRIDES):
    """-> o (q's shape), lse (fp32: (batch, n_heads, sq), or (n_heads, total_q) when packed)."""
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = lse_empty(q, P.packed)
    if q.numel() == 0:
        return o, lse.fill_(float("-inf"))
    cc = _cc(q)
    tma = use_tma(cc, P.head_dim, P.rotary, q, k, v, interpret_tma=ov.interpret_tma)
    if tma and q.is_cuda:
        _ensure_allocator()
    flags = launch_flags(q, cc, tma)

    if is_decode(P):
        _decode(P, q, k, v, o, lse, cc, ov.splits)
        return o, lse

    run_tuned("fwd", cc, q, P.head_dim, P.rotary, tune_key(P, tma),
              lambda cfg: fwd_launch(P, q, k, v, o, lse, cfg, flags).run(),
              warp_spec_ok(tma, P.rotary, var_k=P.lens_k is not None) and not P.windowed, ov.configs.get("fwd"))
    return o, lse


def _sm_count(x: torch.Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return _INTERPRETER_DECODE[2]


def _decode(P: Problem, q, k, v, o, lse, cc: int | None, splits: int | None = None) -> None:
    """The decoding path of the forward: _attn_decode over key splits (``splits``, or as many as fill
    the GPU), then (if split) the merge."""
    cfg = decode_config(cc, q.dtype, P.head_dim)
    min_split = DECODE_MIN_SPLIT if cc is not None else _INTERPRETER_DECODE[1]
    keys = P.seqlen_k
    if P.window_left >= 0:  # only the band is read
        keys = min(keys, P.window_left + P.seqlen_q + max(P.window_right, 0))
    n_splits = splits or decode_splits(P.n_batch * P.n_kv, keys, _sm_count(q), min_split)
    o_part = lse_part = lse
    if n_splits > 1:
        o_part = torch.empty(P.n_batch, P.n_heads, n_splits, P.seqlen_q, P.head_dim, dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty(o_part.shape[:-1], dtype=torch.float32, device=q.device)
    decode_launch(P, q, k, v, o, lse, o_part, lse_part, cfg, n_splits, launch_flags(q, cc, False)).run()
    if n_splits > 1:
        reduce_launch(P, o, lse, o_part, lse_part, n_splits).run()


def attention_backward(P: Problem, do, q, k, v, o, lse, dlse=None, ov: Overrides = NO_OVERRIDES):
    """-> dq, dk, dv (contiguous, shaped like q, k, v)."""
    q, k, v, o, do = (unit_stride(t) for t in (q, k, v, o, do))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # rows of k past a sequence's seqlens_k are never visited: their gradient is zero
    new = torch.zeros if P.lens_k is not None else torch.empty
    dk = new(k.shape, dtype=k.dtype, device=k.device)
    dv = new(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    if dlse is not None:
        dlse = dlse.float().expand(lse.shape).contiguous()  # LSE's layout, which the kernel indexes
    cc = _cc(q)
    rotary = P.rotary
    tma = use_tma(cc, P.head_dim, rotary, q, k, v, do, dq, interpret_tma=ov.interpret_tma)
    if tma and q.is_cuda:
        _ensure_allocator()
    flags = launch_flags(q, cc, tma)
    delta = torch.empty_like(lse)
    qrot = torch.empty_like(dq) if rotary else dq  # the dq kernel writes q rotated for the dk/dv kernel
    # the warp-specialized loops have no window (one masked loop over every block would defeat it)
    ws_dq = warp_spec_ok(tma, rotary, var_k=P.lens_k is not None) and not P.windowed
    ws_dkdv = warp_spec_ok(tma, rotary, q, do, var_k=P.lens_k is not None) and not P.windowed
    stats = cu_st = None
    if ws_dq:  # (n_seq, 2 * n_heads, tokens): what _attn_bwd_stats writes for the warp-specialized kernels
        n_tok = P.seqlen_q
        if P.packed:  # each document starts on a multiple of 4 columns
            cu_st = torch.nn.functional.pad(torch.cumsum((P.cu[1:] - P.cu[:-1] + 3) // 4 * 4, 0), (1, 0))
            cu_st, n_tok = cu_st.to(torch.int32), q.shape[0] + 3 * P.n_batch
        stats = torch.empty(1 if P.packed else P.n_batch, 2 * P.n_heads, -(-n_tok // 4) * 4, dtype=torch.float32,
                            device=q.device)
    state = {"stats": False}  # whether stats holds this call's statistics

    def run_dq(cfg: Config):
        if cfg.warp_spec:  # the statistics pass also writes delta, for a dk/dv kernel that is not specialized
            stats_launch(P, o, do, lse, dlse, delta, stats, cu_st).run()
        state["stats"] = cfg.warp_spec
        dq_launch(P, q, k, v, o, do, lse, delta, dq, qrot, dlse, cfg, flags, stats, cu_st).run()

    def run_dkdv(cfg: Config):
        if cfg.warp_spec and not state["stats"]:
            stats_launch(P, o, do, lse, dlse, delta, stats, cu_st).run()
        dkdv_launch(P, qrot if rotary else q, k, v, do, lse, delta, dk, dv, cfg, flags, stats, cu_st).run()

    key = tune_key(P, tma)
    # the dq kernel writes delta (and qrot), which the dk/dv kernel reads
    run_tuned("dq", cc, q, P.head_dim, rotary, key, run_dq, ws_dq, ov.configs.get("dq"))
    run_tuned("dkdv", cc, q, P.head_dim, rotary, key, run_dkdv, ws_dkdv, ov.configs.get("dkdv"))
    return dq, dk, dv


# ---------------------------------------------------------------------------- torch.library registration
@torch.library.custom_op("meditron_kernels::triton_flash_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
            cu_seqlens: Optional[torch.Tensor], max_seqlen: int, cos: Optional[torch.Tensor],
            sin: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_k: int = 0,
            seqlens_k: Optional[torch.Tensor] = None, window_left: int = -1,
            window_right: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    # max_seqlen(_k) 0: unknown, measured from the offsets inside (a host sync a traced graph must not see)
    P = Problem.of(q, k, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids, cu_seqlens_k,
                   max_seqlen_k, seqlens_k, window_left, window_right)
    with device_of(q.device):  # the descriptors' scratch is allocated there too
        return attention_forward(P, q, k, v, current_overrides())


@_fwd_op.register_fake
def _(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids, cu_seqlens_k=None,
      max_seqlen_k=0, seqlens_k=None, window_left=-1, window_right=-1):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), lse_empty(q, cu_seqlens is not None)


@torch.library.custom_op("meditron_kernels::triton_flash_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, causal: bool, softmax_scale: float, cu_seqlens: Optional[torch.Tensor],
            max_seqlen: int, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
            position_ids: Optional[torch.Tensor], dlse: Optional[torch.Tensor] = None,
            cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_k: int = 0,
            seqlens_k: Optional[torch.Tensor] = None, window_left: int = -1,
            window_right: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    P = Problem.of(q, k, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids, cu_seqlens_k,
                   max_seqlen_k, seqlens_k, window_left, window_right)
    with device_of(q.device):
        return attention_backward(P, do, q, k, v, o, lse, dlse, current_overrides())


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids, dlse=None,
      cu_seqlens_k=None, max_seqlen_k=0, seqlens_k=None, window_left=-1, window_right=-1):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    (q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids, cu_seqlens_k, max_seqlen_k,
     seqlens_k, window_left, window_right) = inputs
    o, lse = output
    # an unused log-sum-exp then reaches the backward as None, not as zeros: nothing to add, and no
    # plain-tensor zeros beside DTensor inputs under tensor parallelism
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, cos, sin, position_ids, cu_seqlens_k, seqlens_k)
    ctx.causal, ctx.softmax_scale, ctx.max_seqlen, ctx.max_seqlen_k = causal, softmax_scale, max_seqlen, max_seqlen_k
    ctx.window = (window_left, window_right)


def _backward(ctx, do, dlse):
    # dlse: None when the caller did not use the log-sum-exp (the public API returns it only with
    # return_lse=True); do: None when only the log-sum-exp was used
    q, k, v, o, lse, cu_seqlens, cos, sin, position_ids, cu_seqlens_k, seqlens_k = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.softmax_scale, cu_seqlens, ctx.max_seqlen, cos, sin,
                         position_ids, dlse, cu_seqlens_k, ctx.max_seqlen_k, seqlens_k, *ctx.window)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- backend registration
def _check_kernel_limits(q: torch.Tensor, rotary) -> None:
    V.kernel_dtype(q, "q", "triton")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q: backend='triton' supports head_dim up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if rotary is not None and (rotary[0].requires_grad or rotary[1].requires_grad):
        raise ValueError("rotary: backend='triton' does not differentiate the cos/sin tables; pass them detached")


@register("flash_attention", "triton")
def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                    rotary=None, position_ids=None, cu_seqlens_k=None, max_seqlen_k=None, seqlens_k=None,
                    return_lse=False, window=None):
    """Batched: q (batch, sq, n_heads, d), k, v (batch, sk, n_kv_heads, d) -> (batch, sq, n_heads, d).
    Packed: q (total_q, n_heads, d), k, v (total_k, n_kv_heads, d), cu_seqlens (and cu_seqlens_k)
    (n_docs + 1,) -> (total_q, n_heads, d). return_lse: also the fp32 log-sum-exp, (batch, n_heads, sq)
    or (n_heads, total_q). window=(left, right): local attention, FlashAttention's window_size; key
    blocks outside a query block's band are skipped. A query that sees no key (more queries than
    keys) gets o = 0 and lse = -inf."""
    _check_kernel_limits(q, rotary)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cos, sin = rotary if rotary is not None else (None, None)
    left, right = window if window is not None else (-1, -1)
    o, lse = _fwd_op(q, k, v, causal, scale, cu_seqlens, max_seqlen or 0, cos, sin, position_ids, cu_seqlens_k,
                     max_seqlen_k or 0, seqlens_k, int(left), int(right))
    return (o, lse) if return_lse else o


# ---------------------------------------------------------------------------- static report
def _launches(arch: int, dtype: torch.dtype, b: int, s: int, h: int, hkv: int, d: int, causal: bool = True,
              rotary: bool = False, configs: dict | None = None, prefix: str = "attention",
              window: tuple[int, int] = (-1, -1)) -> list[Launch]:
    """The three launches of one batched call, configured as they run on ``arch`` (default configs, or
    ``configs`` {kernel: Config}: those kernels only). Tensors live on the meta device: the compiler
    reads only their dtype and alignment."""
    meta = dict(dtype=dtype, device="meta")
    q, o, do = (torch.empty(b, s, h, d, **meta) for _ in range(3))
    k, v = torch.empty(b, s, hkv, d, **meta), torch.empty(b, s, hkv, d, **meta)
    lse = torch.empty(b, h, s, dtype=torch.float32, device="meta")
    stats = torch.empty(b, 2 * h, -(-s // 4) * 4, dtype=torch.float32, device="meta")
    cos = sin = torch.empty(s, d // 2, dtype=torch.float32, device="meta") if rotary else None
    P = Problem(packed=False, n_batch=b, seqlen_q=s, seqlen_k=s, n_heads=h, n_kv=hkv, head_dim=d, causal=causal,
                scale=1.0 / math.sqrt(d), cos=cos, sin=sin, window_left=window[0], window_right=window[1])
    flags = launch_flags(q, arch, use_tma(arch, d, rotary, q, k, v, do))
    if configs is None:
        configs = {kernel: default_config(kernel, arch, dtype, d, rotary) for kernel in ("fwd", "dq", "dkdv")}
    out = []
    for kernel, cfg in configs.items():
        if kernel == "fwd":
            launch = fwd_launch(P, q, k, v, o, lse, cfg, flags)
        elif kernel == "dq":
            launch = dq_launch(P, q, k, v, o, do, lse, lse, q, do, None, cfg, flags, stats)
        else:
            launch = dkdv_launch(P, q, k, v, do, lse, lse, k, v, cfg, flags, stats)
        tag = f"_{cfg.block_m}x{cfg.block_n}_w{cfg.num_warps}_s{cfg.num_stages}" if cfg.warp_spec else ""
        launch.name = launch.name.replace("attention", prefix, 1) + f"{tag}@sm_{arch}"
        out.append(launch)
    return out


def _ws_launches(dtype: torch.dtype, b: int, s: int, h: int, hkv: int, d: int) -> list[Launch]:
    """Every warp-specialized sm_90 candidate for head_dim d (named by its tile), and the statistics
    pass the backward ones need."""
    meta = dict(dtype=dtype, device="meta")
    o, do = torch.empty(b, s, h, d, **meta), torch.empty(b, s, h, d, **meta)
    lse = torch.empty(b, h, s, dtype=torch.float32, device="meta")
    stats = torch.empty(b, 2 * h, -(-s // 4) * 4, dtype=torch.float32, device="meta")
    out = [launch for kernel in ("fwd", "dq", "dkdv") for cfg in _TABLE_WS[(kernel, 90, d, False)]
           for launch in _launches(90, dtype, b, s, h, hkv, d, configs={kernel: cfg}, prefix="attention_ws")]
    P = Problem(packed=False, n_batch=b, seqlen_q=s, seqlen_k=s, n_heads=h, n_kv=hkv, head_dim=d, causal=True,
                scale=1.0 / math.sqrt(d))
    first_pass = stats_launch(P, o, do, lse, None, lse, stats, None)
    first_pass.name = "attention_ws_bwd_stats@sm_90"
    return out + [first_pass]


def _decode_launches(arch: int, dtype: torch.dtype, b: int, s: int, h: int, hkv: int, d: int,
                     window: tuple[int, int] = (-1, -1), prefix: str = "attention") -> list[Launch]:
    """One decoding step (one query per sequence) against a cache of ``s`` keys with per-sequence
    lengths, split as it is on a GPU of 132 SMs, and the merge of the splits."""
    meta = dict(dtype=dtype, device="meta")
    q, o = torch.empty(b, 1, h, d, **meta), torch.empty(b, 1, h, d, **meta)
    k, v = torch.empty(b, s, hkv, d, **meta), torch.empty(b, s, hkv, d, **meta)
    lens = torch.empty(b, dtype=torch.int32, device="meta")
    lse = torch.empty(b, h, 1, dtype=torch.float32, device="meta")
    P = Problem(packed=False, n_batch=b, seqlen_q=1, seqlen_k=s, n_heads=h, n_kv=hkv, head_dim=d, causal=True,
                scale=1.0 / math.sqrt(d), lens_k=lens, window_left=window[0], window_right=window[1])
    cfg = decode_config(arch, dtype, d)
    n_splits = decode_splits(b * hkv, s, 132)
    o_part = torch.empty(b, h, n_splits, 1, d, dtype=torch.float32, device="meta")
    lse_part = torch.empty(b, h, n_splits, 1, dtype=torch.float32, device="meta")
    launches = [decode_launch(P, q, k, v, o, lse, o_part, lse_part, cfg, n_splits, launch_flags(q, arch, False)),
                reduce_launch(P, o, lse, o_part, lse_part, n_splits)]
    for launch in launches:
        launch.name = launch.name.replace("attention", prefix, 1) + f"@sm_{arch}"
    return launches


def static_launches(cc: int | None = None) -> list[Launch]:
    """The forward and backward launches of a Llama-2-70B layer (bf16, 64 query and 8 kv heads,
    head_dim 128, seq 4096, batch 4, causal), then a decoding step of the same layer (batch 1 against
    a 4096-token cache, split over the keys), configured as they run on ``cc`` (80 or 90; None: both;
    each launch's name ends in the architecture it is configured for). On sm_90 also the warp-specialized
    candidates of the same layer (named attention_ws_*). Last, the same layer as a local one, a
    causal 1024-token sliding window (window=(1023, 0), named attention_local_*), forward, backward and
    decoding against an 8192-token cache."""
    local = (1023, 0)
    return [launch for arch in ((80, 90) if cc is None else (cc,))
            for launch in _launches(arch, torch.bfloat16, 4, 4096, 64, 8, 128)
            + _decode_launches(arch, torch.bfloat16, 1, 4096, 64, 8, 128)
            + (_ws_launches(torch.bfloat16, 4, 4096, 64, 8, 128) if arch == 90 else [])
            + _launches(arch, torch.bfloat16, 4, 4096, 64, 8, 128, prefix="attention_local", window=local)
            + _decode_launches(arch, torch.bfloat16, 1, 8192, 64, 8, 128, window=local, prefix="attention_local")]
