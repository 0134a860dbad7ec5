"""Loads the optional compiled extension ``meditron_kernels._C`` (built from csrc/ by setup.py).

Importing meditron_kernels never needs it. The extension defines the op schemas
(``torch.ops.meditron_kernels.cuda_*``) and their CUDA kernels; the Python parts of those ops
(fake kernels, autograd) live in ``meditron_kernels/ops/cuda_*.py`` and are registered through
:func:`on_load` as soon as the schemas exist, also when the library is loaded late by
``torch.ops.load_library``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Callable

_BUILD_HINT = (
    "build it on a machine with the CUDA toolkit and a CUDA-enabled torch: "
    "pip install --no-build-isolation -e . (MEDITRON_KERNELS_SKIP_CUDA_BUILD must be unset)"
)

_pending: list[Callable[[], None]] = []


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """None when the extension is loaded, else the reason it is not."""
    name = f"{__package__}._C"
    if importlib.util.find_spec(name) is None:
        return f"the compiled extension {name} is not built; {_BUILD_HINT}"
    try:
        importlib.import_module(name)  # its static initialisers register torch.ops.meditron_kernels.cuda_*
    except ImportError as e:  # e.g. built against another torch
        return f"the compiled extension {name} failed to load ({e}); rebuild it: {_BUILD_HINT}"
    return None


def _schemas_registered() -> bool:
    import torch

    try:
        torch.ops.meditron_kernels.cuda_rms_norm_fwd
    except (AttributeError, RuntimeError):
        return False
    return True


def loaded() -> bool:
    """True when the CUDA op schemas exist; runs the pending :func:`on_load` callbacks then."""
    ok = _load() is None or _schemas_registered()
    if ok:
        while _pending:
            _pending.pop(0)()
    return ok


def on_load(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the op schemas exist: now, or when :func:`loaded` first sees them."""
    _pending.append(fn)
    loaded()


def available() -> bool:
    import torch

    return loaded() and torch.cuda.is_available()


def why_unavailable() -> str:
    import torch

    if not loaded():
        return _load() or "the meditron_kernels CUDA ops are not registered"
    if not torch.cuda.is_available():
        return "no CUDA device is available to this torch"
    return "available"


def opcheck_cases(device) -> list[tuple[object, tuple]]:
    """(op, args) pairs covering every op of the extension and each of its optional inputs, for
    ``torch.library.opcheck``: on ``"meta"`` (the fakes, any machine with the extension built) or a
    CUDA device (the kernels). Shared by the test suite and scripts/check_cuda_ext.py."""
    import torch

    ops = torch.ops.meditron_kernels
    d = dict(device=device)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, **d).requires_grad_()
    r = torch.randn(3, 5, 64, dtype=torch.bfloat16, **d).requires_grad_()
    w = torch.randn(64, dtype=torch.float32, **d).requires_grad_()
    q = torch.randn(2, 7, 8, 64, dtype=torch.float16, **d).requires_grad_()
    k = torch.randn(2, 7, 2, 64, dtype=torch.float16, **d).requires_grad_()
    cos, sin = torch.randn(16, 32, **d), torch.randn(16, 32, **d)
    pos = torch.randint(0, 16, (2, 7), **d)
    g = torch.randn(4, 96, **d).requires_grad_()
    u = torch.randn(4, 96, **d).requires_grad_()
    gu = torch.randn(4, 192, **d).requires_grad_()
    return [
        (ops.cuda_rms_norm_fwd, (x, w, 1e-5)),
        (ops.cuda_rms_norm_residual_fwd, (x, r, w, 1e-5)),
        (ops.cuda_rms_norm_bwd, (x.detach(), x.detach(), w.detach(), None, 1e-5, True)),
        (ops.cuda_rms_norm_bwd, (x.detach(), x.detach(), w.detach(), r.detach(), 1e-5, True)),
        (ops.cuda_apply_rotary, (q, k, cos, sin, pos, False, False)),
        (ops.cuda_apply_rotary, (q, k, cos, sin, None, True, True)),
        (ops.cuda_swiglu_fwd, (g, u)),
        (ops.cuda_swiglu_bwd, (g.detach(), g.detach(), u.detach())),
        (ops.cuda_swiglu_packed_fwd, (gu,)),
        (ops.cuda_swiglu_packed_bwd, (g.detach(), gu.detach())),
    ]
