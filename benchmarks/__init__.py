"""Kernel benchmarks, the static kernel report and the training-step benchmark.

    python -m benchmarks                 # every kernel benchmark on this device, one table
    python -m benchmarks.inspect         # registers, spills, shared memory, MMA, load widths (no GPU needed)
    python -m benchmarks.train_step      # forward + backward + AdamW of a Llama-2-7B-shaped model

Each ``bench_<op>.py`` module lists its cases for a size ("full", "quick", "cpu", "smoke") and
writes its bytes/FLOPs model in its docstring; :mod:`benchmarks.common` times them.
"""
from __future__ import annotations

from . import (bench_attention, bench_cross_entropy, bench_geglu, bench_rms_norm, bench_rotary, bench_swiglu,
               bench_xielu)
from .common import Case

# In the order they run: the cheap memory-bound ops first, attention last.
MODULES = (bench_rms_norm, bench_swiglu, bench_geglu, bench_xielu, bench_rotary, bench_cross_entropy, bench_attention)
OPS = ("rms_norm", "swiglu", "swiglu_packed", "geglu", "geglu_packed", "xielu", "apply_rotary", "cross_entropy",
       "fused_linear_cross_entropy", "flash_attention")
ALIASES = {"rotary": "apply_rotary", "rope": "apply_rotary", "attention": "flash_attention", "ce": "cross_entropy",
           "flce": "fused_linear_cross_entropy", "linear_cross_entropy": "fused_linear_cross_entropy"}
SIZES = ("full", "quick", "cpu", "smoke")


def canonical_op(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; choose from {', '.join(OPS)} (or {', '.join(sorted(ALIASES))})")
    return name


def cases(size: str, dtype, ops=None) -> list[Case]:
    """Every case for ``size``. For "full", the "quick" cases come first, so a run cut short by
    its time budget still has the headline shapes of every op."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    wanted = None if ops is None else {canonical_op(o) for o in ops}

    def pick(s):
        return [c for m in MODULES for c in m.cases(s, dtype) if wanted is None or c.op in wanted]

    if size != "full":
        return pick(size)
    first = pick("quick")
    seen = {(c.op, c.shape) for c in first}
    return first + [c for c in pick("full") if (c.op, c.shape) not in seen]
