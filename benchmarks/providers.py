"""The implementations compared in every kernel benchmark.

- ``triton``, ``cuda``: our backends, through the public API (``backend=``), validation included,
  as a user calls them.
- ``torch``: the PyTorch reference (meditron_kernels.reference), "torch eager"; every speed-up is
  against it.
- ``torch.compile``: the same reference function under ``torch.compile`` (default mode, static
  shapes), one compilation per case; compile time is never timed.
- ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``: attention only, PyTorch's
  scaled_dot_product_attention pinned to one backend with ``torch.nn.attention.sdpa_kernel``.
- ``liger``: Liger-Kernel's functional ops, when the package is importable.

A provider that cannot run here (an op without that backend yet, no compiled extension, no
GPU, Liger not installed) is reported as skipped with the reason, never an error.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any, Callable

import torch

from meditron_kernels.backend import unavailable_reason

from .common import Provider

ALL = ("triton", "cuda", "torch", "torch.compile", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "liger",
       "triton-default", "triton-ws0", "triton-ws1")  # the last three: attention only (bench_attention.PINNED)


def ours(op: str, backend: str, call: Callable[[dict, str], Any], note: str = "") -> Provider:
    """Our ``backend`` ("triton" or "cuda"); ``call(inputs, backend)`` runs the public op."""
    return Provider(backend, lambda inputs: call(inputs, backend),
                    why_not=lambda device: unavailable_reason(op, backend, device),
                    note=note, timed_on_cpu=backend != "triton")


def eager(call: Callable[[dict, str], Any]) -> Provider:
    """The PyTorch reference through the public API (backend="torch")."""
    return Provider("torch", lambda inputs: call(inputs, "torch"))


def compiled(fn: Callable, adapt: Callable[[Callable, dict], Any], note: str = "") -> Provider:
    """``torch.compile(fn)`` called as ``adapt(compiled_fn, inputs)``; compiled on first use."""
    state: dict[str, Callable] = {}

    def run(inputs):
        if "fn" not in state:
            from torch import _dynamo

            # Every case compiles the reference for new shapes; the default cache size (8) would
            # silently fall back to eager after a few of them.
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            state["fn"] = torch.compile(fn, dynamic=False)
        return adapt(state["fn"], inputs)

    return Provider("torch.compile", run, compiled=True, note=note)


@functools.lru_cache(maxsize=None)
def _liger_functional():
    if importlib.util.find_spec("liger_kernel") is None:
        return None, "Liger-Kernel is not installed (pip install liger-kernel)"
    try:
        return importlib.import_module("liger_kernel.transformers.functional"), None
    except Exception as e:  # noqa: BLE001 (a broken install is a reason to skip, not to stop)
        return None, f"liger_kernel.transformers.functional failed to import: {type(e).__name__}: {e}"


def liger(call: Callable[[Any, dict], Any], note: str = "") -> Provider:
    """Liger-Kernel; ``call(functional_module, inputs)``."""

    def why_not(device):
        mod, why = _liger_functional()
        if mod is None:
            return why
        if device.type != "cuda":
            return "Liger-Kernel needs a CUDA device"
        return None

    return Provider("liger", lambda inputs: call(_liger_functional()[0], inputs), why_not=why_not, note=note)
