"""Cross-entropy over the Llama-2 vocabulary (32000), and the fused lm-head + cross-entropy.

cross_entropy, bytes-moved model (e = element size, T tokens, V vocab; targets int64):

- forward:  read logits, targets                                   -> T V e + 8 T
- backward: read logits, targets, the per-token log-sum-exp; write dlogits -> 2 T V e + 12 T
- both:     read logits once, write dlogits                        -> 2 T V e + 8 T
  (the loss is a scalar, so an implementation can produce the gradient during the forward pass;
  that is the floor, and a forward-then-backward pair cannot reach it)

fused_linear_cross_entropy (hidden (T, D), lm-head weight (V, D)) is matrix-bound:

- FLOPs of forward and backward together: logits 2 T D V, dhidden 2 T D V, dweight 2 T D V -> 6 T D V
- bytes: read hidden, weight, targets; write dhidden, dweight   -> 2 (T D + V D) e + 8 T

Only "both" is timed for it: with inputs that need gradients, every implementation (ours,
Liger's, the reference) computes the gradients during the forward pass, chunk by chunk, while
each chunk's logits are live, so a "forward" row would time the same work under another name.
"""
from __future__ import annotations

import meditron_kernels as mk
from meditron_kernels import reference

from . import providers as P
from .common import Case, Cost, randint, randn

VOCAB = 32000
CE_SHAPES = {
    "full": [("16k", 16384, VOCAB), ("4k", 4096, VOCAB)],
    "quick": [("16k", 16384, VOCAB)],
    "cpu": [("cpu", 512, 8000)],
    "smoke": [("smoke", 8, 96)],
}
# (label, tokens, dim, vocab)
FLCE_SHAPES = {
    "full": [("7b", 16384, 4096, VOCAB), ("70b", 16384, 8192, VOCAB)],
    "quick": [("7b", 16384, 4096, VOCAB)],
    "cpu": [("cpu", 512, 1024, 8000)],
    "smoke": [("smoke", 8, 32, 96)],
}


def ce_bytes(direction: str, T: int, V: int, e: int) -> int:
    return {"forward": T * V * e + 8 * T, "backward": 2 * T * V * e + 12 * T, "both": 2 * T * V * e + 8 * T}[direction]


def flce_cost(T: int, D: int, V: int, e: int) -> Cost:
    return Cost(bytes=2 * (T * D + V * D) * e + 8 * T, flops=6.0 * T * D * V)


def _ce(inputs, backend):
    return mk.cross_entropy(inputs["logits"], inputs["targets"], backend=backend)


def _flce(inputs, backend):
    return mk.fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], backend=backend)


def _liger_flce(F, inputs):
    out = F.liger_fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"])
    return out[0] if isinstance(out, tuple) else out


def cases(size: str, dtype):
    out = []
    for label, T, V in CE_SHAPES[size]:
        def make(device, dt, gen, T=T, V=V):
            return dict(logits=randn((T, V), dt, device, gen, scale=2.0, grad=True), targets=randint(V, (T,), device, gen))

        out.append(Case(
            op="cross_entropy", shape=f"{label} {T}x{V}", dims=dict(tokens=T, vocab=V), dtype=dtype, make=make,
            cost=lambda d, T=T, V=V, e=dtype.itemsize: Cost(bytes=ce_bytes(d, T, V, e)),
            reference=lambda i: reference.cross_entropy(i["logits"], i["targets"]),
            providers=[P.ours("cross_entropy", "triton", _ce), P.ours("cross_entropy", "cuda", _ce), P.eager(_ce),
                       P.compiled(reference.cross_entropy, lambda f, i: f(i["logits"], i["targets"])),
                       P.liger(lambda F, i: F.liger_cross_entropy(i["logits"], i["targets"]),
                               note="writes the gradient into the logits (its in-place design)")],
            check_bytes=5 * T * V * 4))
    for label, T, D, V in FLCE_SHAPES[size]:
        def make_flce(device, dt, gen, T=T, D=D, V=V):
            return dict(hidden=randn((T, D), dt, device, gen, grad=True),
                        weight=randn((V, D), dt, device, gen, scale=D ** -0.5, grad=True),
                        targets=randint(V, (T,), device, gen))

        out.append(Case(
            op="fused_linear_cross_entropy", shape=f"{label} {T}x{D}x{V}", dims=dict(tokens=T, dim=D, vocab=V),
            dtype=dtype, make=make_flce, cost=lambda d, T=T, D=D, V=V, e=dtype.itemsize: flce_cost(T, D, V, e),
            reference=lambda i: reference.fused_linear_cross_entropy(i["hidden"], i["weight"], i["targets"]),
            directions=("both",),
            providers=[P.ours("fused_linear_cross_entropy", "triton", _flce),
                       P.ours("fused_linear_cross_entropy", "cuda", _flce), P.eager(_flce),
                       P.compiled(reference.fused_linear_cross_entropy, lambda f, i: f(i["hidden"], i["weight"], i["targets"])),
                       P.liger(_liger_flce)],
            check_bytes=4 * (3 * T * D + 3 * V * D + 2 * T * V // 8) * 4))
    return out
