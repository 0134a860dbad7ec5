"""SwiGLU, silu(gate) * up, on the MLP's intermediate activations at 16k tokens.

Bytes-moved model (e = element size, T tokens, F ffn width):

- forward:  read gate, up; write out                      -> 3 T F e
- backward: read dout, gate, up; write dgate, dup         -> 5 T F e   (silu is recomputed)
- both: forward + backward.

``swiglu_packed`` reads [gate | up] from one (T, 2F) tensor, the output of a fused w1|w3
GEMM, and writes one (T, 2F) gradient: the same byte counts.
"""
from __future__ import annotations

import meditron_kernels as mk
from meditron_kernels import reference

from . import providers as P
from .common import Case, Cost, randn

# (label, tokens, ffn): Llama-2-7B (11008) and 70B (28672) at 16k tokens; 70B's ffn split over
# 8 tensor-parallel ranks (3584), the width each GPU sees in Meditron-70B's layout.
SHAPES = {
    "full": [("7b", 16384, 11008), ("70b", 16384, 28672), ("70b tp8", 16384, 3584)],
    "quick": [("7b", 16384, 11008)],
    "cpu": [("cpu", 2048, 2816)],
    "smoke": [("smoke", 8, 96)],
}
PACKED = {"full": [("7b", 16384, 11008)], "quick": [], "cpu": [("cpu", 2048, 2816)], "smoke": [("smoke", 8, 96)]}


def bytes_moved(direction: str, T: int, F: int, e: int) -> int:
    return {"forward": 3, "backward": 5, "both": 8}[direction] * T * F * e


def _call(inputs, backend):
    return mk.swiglu(inputs["gate"], inputs["up"], backend=backend)


def _call_packed(inputs, backend):
    return mk.swiglu_packed(inputs["gate_up"], backend=backend)


def cases(size: str, dtype):
    out = []
    for label, T, F in SHAPES[size]:
        def make(device, dt, gen, T=T, F=F):
            return dict(gate=randn((T, F), dt, device, gen, scale=2.0, grad=True),
                        up=randn((T, F), dt, device, gen, grad=True))

        out.append(Case(
            op="swiglu", shape=f"{label} {T}x{F}", dims=dict(tokens=T, ffn=F), dtype=dtype, make=make,
            cost=lambda d, T=T, F=F, e=dtype.itemsize: Cost(bytes=bytes_moved(d, T, F, e)),
            reference=lambda i: reference.swiglu(i["gate"], i["up"]),
            providers=[P.ours("swiglu", "triton", _call), P.ours("swiglu", "cuda", _call), P.eager(_call),
                       P.compiled(reference.swiglu, lambda f, i: f(i["gate"], i["up"])),
                       P.liger(lambda F_, i: F_.liger_swiglu(i["gate"], i["up"]))],
            check_bytes=10 * T * F * 4))
    for label, T, F in PACKED[size]:
        def make_packed(device, dt, gen, T=T, F=F):
            return dict(gate_up=randn((T, 2 * F), dt, device, gen, scale=2.0, grad=True))

        out.append(Case(
            op="swiglu_packed", shape=f"{label} {T}x2x{F}", dims=dict(tokens=T, ffn=F), dtype=dtype,
            make=make_packed, cost=lambda d, T=T, F=F, e=dtype.itemsize: Cost(bytes=bytes_moved(d, T, F, e)),
            reference=lambda i: reference.swiglu_packed(i["gate_up"]),
            providers=[P.ours("swiglu_packed", "triton", _call_packed), P.ours("swiglu_packed", "cuda", _call_packed),
                       P.eager(_call_packed),
                       P.compiled(reference.swiglu_packed, lambda f, i: f(i["gate_up"]))],
            check_bytes=10 * T * F * 4))
    return out
