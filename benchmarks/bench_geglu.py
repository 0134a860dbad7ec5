"""GeGLU, gelu_tanh(gate) * up (Gemma's MLP), on the MLP's intermediate activations at 16k tokens.

Bytes-moved model (e = element size, T tokens, F ffn width), SwiGLU's:

- forward:  read gate, up; write out                      -> 3 T F e
- backward: read dout, gate, up; write dgate, dup         -> 5 T F e   (the GELU is recomputed)
- both: forward + backward.

``geglu_packed`` reads [gate | up] from one (T, 2F) tensor and writes one (T, 2F) gradient: the
same byte counts. About 20 FLOPs per element forward and 35 backward: memory-bound at any width.
"""
from __future__ import annotations

import meditron_kernels as mk
from meditron_kernels import reference

from . import providers as P
from .bench_swiglu import bytes_moved
from .common import Case, Cost, randn

# (label, tokens, ffn): Gemma-3-12B (15360) and 27B (21504) at 16k tokens.
SHAPES = {
    "full": [("gemma3-12b", 16384, 15360), ("gemma3-27b", 16384, 21504)],
    "quick": [("gemma3-12b", 16384, 15360)],
    "cpu": [("cpu", 2048, 2816)],
    "smoke": [("smoke", 8, 96)],
}
PACKED = {"full": [("gemma3-12b", 16384, 15360)], "quick": [], "cpu": [("cpu", 2048, 2816)],
          "smoke": [("smoke", 8, 96)]}


def _call(inputs, backend):
    return mk.geglu(inputs["gate"], inputs["up"], backend=backend)


def _call_packed(inputs, backend):
    return mk.geglu_packed(inputs["gate_up"], backend=backend)


def cases(size: str, dtype):
    out = []
    for label, T, F in SHAPES[size]:
        def make(device, dt, gen, T=T, F=F):
            return dict(gate=randn((T, F), dt, device, gen, scale=2.0, grad=True),
                        up=randn((T, F), dt, device, gen, grad=True))

        out.append(Case(
            op="geglu", shape=f"{label} {T}x{F}", dims=dict(tokens=T, ffn=F), dtype=dtype, make=make,
            cost=lambda d, T=T, F=F, e=dtype.itemsize: Cost(bytes=bytes_moved(d, T, F, e)),
            reference=lambda i: reference.geglu(i["gate"], i["up"]),
            providers=[P.ours("geglu", "triton", _call), P.eager(_call),
                       P.compiled(reference.geglu, lambda f, i: f(i["gate"], i["up"])),
                       P.liger(lambda F_, i: F_.liger_geglu(i["gate"], i["up"]))],
            check_bytes=10 * T * F * 4))
    for label, T, F in PACKED[size]:
        def make_packed(device, dt, gen, T=T, F=F):
            return dict(gate_up=randn((T, 2 * F), dt, device, gen, scale=2.0, grad=True))

        out.append(Case(
            op="geglu_packed", shape=f"{label} {T}x2x{F}", dims=dict(tokens=T, ffn=F), dtype=dtype,
            make=make_packed, cost=lambda d, T=T, F=F, e=dtype.itemsize: Cost(bytes=bytes_moved(d, T, F, e)),
            reference=lambda i: reference.geglu_packed(i["gate_up"]),
            providers=[P.ours("geglu_packed", "triton", _call_packed), P.eager(_call_packed),
                       P.compiled(reference.geglu_packed, lambda f, i: f(i["gate_up"]))],
            check_bytes=10 * T * F * 4))
    return out
