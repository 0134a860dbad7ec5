"""xIELU (Apertus's activation) on the MLP's intermediate activations at 16k tokens.

Bytes-moved model (e = element size, T tokens, F ffn width):

- forward:  read x; write y                                -> 2 T F e
- backward: read dy, x; write dx                           -> 3 T F e   (plus 8 bytes of partial
  sums per 4096 elements for the two scalar gradients, under 0.1%)
- both: forward + backward.

The softplus of the two scalars and their gradient chain are a handful of one-element torch ops
per call: launch latency, not bandwidth, so they matter only at small T F.
"""
from __future__ import annotations

import torch

import meditron_kernels as mk
from meditron_kernels import reference

from . import providers as P
from .common import Case, Cost, randn

# (label, tokens, ffn): Apertus-8B (21504) and 70B (43008) at 16k tokens.
SHAPES = {
    "full": [("apertus-8b", 16384, 21504), ("apertus-70b", 16384, 43008)],
    "quick": [("apertus-8b", 16384, 21504)],
    "cpu": [("cpu", 2048, 2816)],
    "smoke": [("smoke", 8, 96)],
}


def bytes_moved(direction: str, T: int, F: int, e: int) -> int:
    return {"forward": 2, "backward": 3, "both": 5}[direction] * T * F * e


def _call(inputs, backend):
    return mk.xielu(inputs["x"], inputs["alpha_p"], inputs["alpha_n"], backend=backend)


def _ref(x, alpha_p, alpha_n):
    return reference.xielu(x, alpha_p, alpha_n)


def cases(size: str, dtype):
    out = []
    for label, T, F in SHAPES[size]:
        def make(device, dt, gen, T=T, F=F):
            # transformers' initial parameters (a_p = a_n = 0.8), learnable like the model's
            return dict(x=randn((T, F), dt, device, gen, scale=2.0, grad=True),
                        alpha_p=torch.tensor([0.2034], dtype=dt, device=device, requires_grad=True),
                        alpha_n=torch.tensor([-1.0502], dtype=dt, device=device, requires_grad=True))

        out.append(Case(
            op="xielu", shape=f"{label} {T}x{F}", dims=dict(tokens=T, ffn=F), dtype=dtype, make=make,
            cost=lambda d, T=T, F=F, e=dtype.itemsize: Cost(bytes=bytes_moved(d, T, F, e)),
            reference=lambda i: _ref(i["x"], i["alpha_p"], i["alpha_n"]),
            providers=[P.ours("xielu", "triton", _call), P.eager(_call),
                       P.compiled(_ref, lambda f, i: f(i["x"], i["alpha_p"], i["alpha_n"]))],
            check_bytes=6 * T * F * 4))
    return out
