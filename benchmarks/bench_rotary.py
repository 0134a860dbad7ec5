"""Rotary position embedding of q and k (rotate-half layout), at 16k tokens (4 x 4096).

Bytes-moved model (e = element size; q (b, s, h, d), k (b, s, h_kv, d); cos and sin are
(s, d / 2) float32 tables):

- forward:  read q, k, cos, sin; write q', k'       -> 2 b s (h + h_kv) d e + 4 s d
- backward: read dq', dk', cos, sin; write dq, dk    -> the same (the rotation's transpose)
- both: forward + backward.

The tables are read once per call in the model (each token's angles serve all its heads).
"""
from __future__ import annotations

import meditron_kernels as mk
from meditron_kernels import reference

from . import providers as P
from .common import Case, Cost, randn

OP = "apply_rotary"
# (label, batch, seq, heads, kv_heads, head_dim)
SHAPES = {
    "full": [("7b", 4, 4096, 32, 32, 128), ("70b", 4, 4096, 64, 8, 128), ("small", 1, 1024, 32, 32, 128)],
    "quick": [("7b", 4, 4096, 32, 32, 128)],
    "cpu": [("cpu", 1, 512, 8, 4, 64)],
    "smoke": [("smoke", 1, 8, 4, 2, 16)],
}


def bytes_moved(direction: str, b: int, s: int, h: int, hkv: int, d: int, e: int) -> int:
    one = 2 * b * s * (h + hkv) * d * e + 4 * s * d
    return {"forward": one, "backward": one, "both": 2 * one}[direction]


def _call(inputs, backend):
    return mk.apply_rotary(inputs["q"], inputs["k"], inputs["cos"], inputs["sin"], backend=backend)


def _reference(inputs):
    return reference.apply_rotary(inputs["q"], inputs["k"], inputs["cos"], inputs["sin"])


def _liger(F, inputs):
    # Liger takes (batch, heads, seq, head_dim) and full-width tables in the activations' dtype,
    # as transformers builds them; the transposes are views, free, as in a model.
    # The tables are built once with the inputs, outside the timed region.
    q, k = inputs["q"], inputs["k"]
    q2, k2 = F.liger_rope(q.transpose(1, 2), k.transpose(1, 2), inputs["cos_full"], inputs["sin_full"])
    return q2.transpose(1, 2), k2.transpose(1, 2)


def cases(size: str, dtype):
    out = []
    for label, b, s, h, hkv, d in SHAPES[size]:
        def make(device, dt, gen, b=b, s=s, h=h, hkv=hkv, d=d):
            cos, sin = mk.rotary_cos_sin(s, d, device=device)
            return dict(q=randn((b, s, h, d), dt, device, gen, grad=True),
                        k=randn((b, s, hkv, d), dt, device, gen, grad=True), cos=cos, sin=sin,
                        cos_full=cos.repeat(1, 2)[None].to(dt), sin_full=sin.repeat(1, 2)[None].to(dt))

        out.append(Case(
            op=OP, shape=f"{label} {b}x{s} h{h}/{hkv} d{d}", dims=dict(batch=b, seq=s, heads=h, kv_heads=hkv, head_dim=d),
            dtype=dtype, make=make,
            cost=lambda dr, b=b, s=s, h=h, hkv=hkv, d=d, e=dtype.itemsize: Cost(bytes=bytes_moved(dr, b, s, h, hkv, d, e)),
            reference=_reference,
            providers=[P.ours(OP, "triton", _call), P.ours(OP, "cuda", _call), P.eager(_call),
                       P.compiled(reference.apply_rotary, lambda f, i: f(i["q"], i["k"], i["cos"], i["sin"])),
                       P.liger(_liger, note="full-width tables in the activations' dtype (transformers' layout)")],
            check_bytes=8 * b * s * (h + hkv) * d * 4))
    return out
