"""Loads the optional compiled extension ``meditron_kernels._C`` (built from csrc/ by setup.py)."""
from __future__ import annotations

import functools

_BUILD_HINT = (
    "build it on a machine with the CUDA toolkit and a CUDA-enabled torch: "
    "pip install --no-build-isolation -e . (MEDITRON_KERNELS_SKIP_CUDA_BUILD must be unset)"
)


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """None when the extension is loaded, else the reason it is not."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.meditron_kernels.*)
    except ImportError as e:
        return f"the compiled extension meditron_kernels._C is not installed ({e}); {_BUILD_HINT}"
    return None


def available() -> bool:
    import torch

    return _load() is None and torch.cuda.is_available()


def why_unavailable() -> str:
    import torch

    reason = _load()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device is available to this torch"
    return "available"
