"""Exact attention with GQA: ours against SDPA's flash (FlashAttention-2), memory-efficient and
cuDNN backends, at 16k tokens.

FLOP model (docs/design.md, "Floors"): forward 4 b s^2 h d (two matmuls of 2 b s^2 h d), halved for
causal; backward 2.5x the forward (five matmuls, one of them recomputing the scores); both 3.5x.
Attention is compute-bound at these shapes, so the floor is FLOPs over the measured bf16 GEMM
peak. The bytes (q, k, v, o and the per-row log-sum-exp; in the backward also do, dq, dk, dv)
are recorded for completeness.

Local (sliding-window) layers: window=(W - 1, 0) causal, W = 1024 and 4096, at 8k to 32k tokens beside
full causal attention of the same shape; local_fractions() turns a run's rows into each local case's
time as a fraction of the full-causal one (the FLOP model counts the band: about W / (s / 2) of causal).

The PyTorch reference materialises the (s x s) scores in float32; where that cannot fit it is
skipped with the size it would need, and the speed-up column stays empty.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

import meditron_kernels as mk
from meditron_kernels import reference
from meditron_kernels.ops import attention as A

from . import providers as P
from .common import Case, Cost, Provider, randn

OP = "flash_attention"
# Local layers (Mistral, Gemma): 7b-like heads, GQA 4:1; each length also runs full causal, the baseline
# of local_fractions()
LOCAL = [(f"7b local {s // 1024}k", 1, s, 32, 8, 128, True, window)
         for s in (8192, 16384, 32768) for window in ((-1, -1), (1023, 0), (4095, 0))]
# (label, batch, seq, heads, kv_heads, head_dim, causal[, window])
SHAPES = {
    "full": [("7b", 4, 4096, 32, 32, 128, True), ("70b", 4, 4096, 64, 8, 128, True),
             ("7b 16k", 1, 16384, 32, 32, 128, True), ("7b non-causal", 4, 4096, 32, 32, 128, False),
             ("small d64", 8, 2048, 16, 16, 64, True)] + LOCAL,
    "quick": [("7b", 4, 4096, 32, 32, 128, True)],
    "cpu": [("cpu", 1, 256, 8, 2, 64, True), ("cpu", 1, 256, 8, 2, 64, True, (63, 0))],
    "smoke": [("smoke", 1, 16, 4, 2, 16, True), ("smoke", 1, 16, 4, 2, 16, True, (3, 0))],
}
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}


def flops(direction: str, b: int, s: int, h: int, d: int, causal: bool, window=None) -> float:
    if window is None or tuple(window) == (-1, -1):
        fwd = 4.0 * b * s * s * h * d / (2 if causal else 1)
    else:
        fwd = 4.0 * b * visible_pairs(s, causal, window) * h * d
    return {"forward": fwd, "backward": 2.5 * fwd, "both": 3.5 * fwd}[direction]


def visible_pairs(s: int, causal: bool, window) -> int:
    """(query, key) pairs a local layer of s tokens computes: each query's keys within its window."""
    left, right = window
    right = 0 if causal else right
    n = 0
    for i in range(s):  # keys max(0, i - left) .. min(s - 1, i + right)
        lo = 0 if left < 0 else max(0, i - left)
        hi = s - 1 if right < 0 else min(s - 1, i + right)
        n += hi - lo + 1
    return n


def local_fractions(rows: list[dict]) -> dict[tuple, float]:
    """{(shape, dtype, direction, provider): ms of a local case / ms of full causal attention of the same
    shape}, from a run's result rows (LOCAL, in --size full)."""
    ms = {(r["shape"], r["dtype"], r["direction"], r["provider"]): r["ms"] for r in rows
          if r.get("op") == OP and r.get("status") == "ok" and r.get("ms")}
    out = {}
    for (shape, dtype, direction, provider), t in ms.items():
        base = re.sub(r" window\d+$", "", shape)
        if base != shape and (base, dtype, direction, provider) in ms:
            out[(shape, dtype, direction, provider)] = t / ms[(base, dtype, direction, provider)]
    return out


def bytes_moved(direction: str, b: int, s: int, h: int, hkv: int, d: int, e: int) -> int:
    q = b * s * h * d * e
    kv = b * s * hkv * d * e
    lse = 4 * b * h * s
    fwd = 2 * q + 2 * kv + lse                 # read q, k, v; write o, lse
    bwd = 4 * q + 4 * kv + lse                 # read q, k, v, o, do, lse; write dq, dk, dv
    return {"forward": fwd, "backward": bwd, "both": fwd + bwd}[direction]


def _reference_bytes(b: int, s: int, h: int) -> float:
    # float32 scores, their masked copy and softmax, the probabilities in the input dtype and
    # the backward's matching temporaries: about 16 bytes per score, for two retained graphs.
    return 2 * 16.0 * b * h * s * s


def _fits(need: float):
    def why_not(device):
        if device.type != "cuda":
            return None
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.7 * free:
            return f"materialises the (s x s) scores: needs ~{need / 1e9:.0f} GB, {free / 1e9:.0f} GB free"
        return None

    return why_not


def sdpa(name: str, causal: bool) -> Provider:
    """SDPA pinned to one backend. GQA goes through ``enable_gqa``; a backend that refuses it gets
    k and v expanded to all heads inside the timed call, which is what a model would have to do."""
    prov = Provider(name, lambda inputs: None)

    def call(inputs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[name])
        q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k", "v"))  # (b, h, s, d) views
        group = q.shape[1] // k.shape[1]
        with sdpa_kernel([backend]):
            if group > 1 and not prov.note:
                try:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True).transpose(1, 2)
                except RuntimeError:
                    prov.note = "k/v expanded to all heads (no GQA in this backend)"
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)

    def why_not(device):
        if device.type != "cuda" and name != "sdpa-flash":
            return f"{name} is a CUDA kernel"
        return None

    prov.fn, prov.why_not = call, why_not
    return prov


# Our Triton kernels with their tiles pinned, beside "triton" (which on a GPU autotunes among every
# candidate, the warp-specialized ones included): "triton-default" runs today's defaults,
# "triton-ws<i>" the i-th warp-specialized sm_90 candidate of every kernel (docs/attention.md).
PINNED = ("triton-default", "triton-ws0", "triton-ws1")


def _pinned_configs(name: str, cc: int | None, dtype, d: int) -> dict:
    out = {}
    for kernel in ("fwd", "dq", "dkdv"):
        cands = A.candidates(kernel, cc, dtype, d, False, warp_spec=True)
        if name == "triton-default":
            out[kernel] = cands[0]
        else:
            ws = [c for c in cands if c.warp_spec]
            i = int(name[len("triton-ws"):])
            if i >= len(ws):
                return {}
            out[kernel] = ws[i]
    return out


def _cc_of(device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def pinned(name: str, call, d: int, dtype) -> Provider:
    """``call`` with every attention kernel's configuration forced to ``name``'s (see PINNED)."""

    def run(inputs):
        configs = _pinned_configs(name, _cc_of(inputs["q"].device), inputs["q"].dtype, d)
        with A.overrides(configs=configs):
            return call(inputs, "triton")

    def why_not(device):
        if device.type != "cuda":
            return "pins GPU tile configurations: needs a CUDA device"
        if not _pinned_configs(name, _cc_of(device), dtype, d):
            return "no such warp-specialized candidate here (sm_90, bf16/fp16, head_dim 64 or 128)"
        return None

    tiles = {k: (c.block_m, c.block_n, c.num_warps, c.num_stages)
             for k, c in _pinned_configs(name, 90, dtype, d).items()}
    return Provider(name, run, why_not=why_not, timed_on_cpu=False,
                    note=f"sm_90 (block_m, block_n, warps, stages): {tiles}" if name != "triton-default" else "")


def cases(size: str, dtype):
    out = []
    for label, b, s, h, hkv, d, causal, *win in SHAPES[size]:
        window = tuple(win[0]) if win and tuple(win[0]) != (-1, -1) else None

        def make(device, dt, gen, b=b, s=s, h=h, hkv=hkv, d=d):
            return dict(q=randn((b, s, h, d), dt, device, gen, grad=True),
                        k=randn((b, s, hkv, d), dt, device, gen, grad=True),
                        v=randn((b, s, hkv, d), dt, device, gen, grad=True))

        def call(inputs, backend, causal=causal, window=window):
            return mk.flash_attention(inputs["q"], inputs["k"], inputs["v"], causal=causal, backend=backend,
                                      window=window)

        def ref(inputs, causal=causal, window=window):
            return reference.flash_attention(inputs["q"], inputs["k"], inputs["v"], causal, window=window)

        ref_fits = _fits(_reference_bytes(b, s, h))
        eager = P.eager(call)
        eager.why_not = ref_fits
        comp = P.compiled(reference.flash_attention,
                          lambda f, i, causal=causal, window=window: f(i["q"], i["k"], i["v"], causal, window=window))
        comp.why_not = ref_fits
        out.append(Case(
            op=OP, shape=f"{label} {b}x{s} h{h}/{hkv} d{d}" + ("" if causal else " full")
            + (f" window{window[0] + 1}" if window else ""),
            dims=dict(batch=b, seq=s, heads=h, kv_heads=hkv, head_dim=d, causal=int(causal),
                      **(dict(window_left=window[0], window_right=window[1]) if window else {})),
            dtype=dtype, make=make,
            cost=lambda dr, b=b, s=s, h=h, hkv=hkv, d=d, causal=causal, e=dtype.itemsize, window=window: Cost(
                bytes=bytes_moved(dr, b, s, h, hkv, d, e), flops=flops(dr, b, s, h, d, causal, window)),
            reference=ref,
            # SDPA and the CUDA backend have no sliding window: local cases are ours against the reference
            providers=[P.ours(OP, "triton", call), *(pinned(n, call, d, dtype) for n in PINNED),
                       *([] if window else [P.ours(OP, "cuda", call)]), eager, comp,
                       *([] if window else [sdpa(n, causal) for n in SDPA_BACKENDS])],
            check_bytes=_reference_bytes(b, s, h) * 1.5))
    return out
