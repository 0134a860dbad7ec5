"""RMSNorm, plain and with the fused residual add, at 16k tokens.

Bytes-moved model (e = element size, T tokens, H hidden; the weight is H elements of x's dtype):

- forward, plain:     read x, w; write y                          -> 2 T H e + H e
- forward, residual:  read x, r, w; write y, h = x + r            -> 4 T H e + H e
- backward, plain:    read x, dy, w; write dx, dw                 -> 3 T H e + 2 H e
- backward, residual: read h, dy, dh (the gradient reaching h from the residual stream), w;
                      write dx (the same tensor is dr: h = x + r)  -> 4 T H e + 2 H e
- both: forward + backward; x (or h) must be read again by the backward, the two are separate
  calls in training.

The per-program fp32 partial sums of dw are not counted (a few hundred rows of H floats): they
are a property of one implementation, not of the op.
"""
from __future__ import annotations

import meditron_kernels as mk
from meditron_kernels import reference

from . import providers as P
from .common import Case, Cost, randn

OP = "rms_norm"
EPS = 1e-5
# (label, tokens, hidden): Llama-2-7B and 70B at 16k tokens; 1k tokens, where launch costs show.
SHAPES = {
    "full": [("7b", 16384, 4096), ("70b", 16384, 8192), ("small", 1024, 4096)],
    "quick": [("7b", 16384, 4096)],
    "cpu": [("cpu", 2048, 1024)],
    "smoke": [("smoke", 8, 64)],
}


def bytes_moved(direction: str, T: int, H: int, e: int, residual: bool) -> int:
    fwd = (4 if residual else 2) * T * H * e + H * e
    bwd = (4 if residual else 3) * T * H * e + 2 * H * e
    return {"forward": fwd, "backward": bwd, "both": fwd + bwd}[direction]


def _call(inputs, backend):
    return mk.rms_norm(inputs["x"], inputs["weight"], EPS, residual=inputs.get("residual"), backend=backend)


def _reference(inputs):
    return reference.rms_norm(inputs["x"], inputs["weight"], EPS, inputs.get("residual"))


def _liger(F, inputs):
    # Liger's RMSNorm has no fused residual add in its functional API: a user adds first.
    x = inputs["x"]
    h = x + inputs["residual"] if "residual" in inputs else x
    y = F.liger_rms_norm(h, inputs["weight"], EPS, offset=0.0, casting_mode="llama", in_place=False)
    return (y, h) if "residual" in inputs else y


def cases(size: str, dtype):
    out = []
    for label, T, H in SHAPES[size]:
        for residual in (False, True):
            def make(device, dt, gen, T=T, H=H, residual=residual):
                d = dict(x=randn((T, H), dt, device, gen, grad=True),
                         weight=randn((H,), dt, device, gen, scale=0.1, shift=1.0, grad=True))
                if residual:
                    d["residual"] = randn((T, H), dt, device, gen, grad=True)
                return d

            e = dtype.itemsize
            provs = [P.ours(OP, "triton", _call), P.ours(OP, "cuda", _call), P.eager(_call),
                     P.compiled(reference.rms_norm, lambda f, i: f(i["x"], i["weight"], EPS, i.get("residual"))),
                     P.liger(_liger, note="unfused residual add" if residual else "")]
            out.append(Case(
                op=OP, shape=f"{label} {T}x{H}" + (" +residual" if residual else ""),
                dims=dict(tokens=T, hidden=H, residual=int(residual)), dtype=dtype, make=make,
                cost=lambda d, T=T, H=H, e=e, residual=residual: Cost(bytes=bytes_moved(d, T, H, e, residual)),
                reference=_reference, providers=provs, check_bytes=12 * T * H * 4))
    return out
