"""Backend selection for the functional ops.

Every public op takes ``backend=None``. The name is resolved in this order:

1. the ``backend=`` argument of the call;
2. a process default set by :func:`set_backend` or the :func:`use_backend` context;
3. the ``MEDITRON_KERNELS_BACKEND`` environment variable;
4. auto: ``"torch"`` for CPU tensors; for CUDA tensors, the backend measured fastest on this GPU
   model for the op and shape bucket (the tables in ``meditron_kernels/tuned/``, written by the
   GPU-validation run), else ``"triton"`` (when Triton is importable).

Implementations register themselves per (op, backend) with :func:`register` when their
module is imported (``meditron_kernels/reference.py`` for "torch", the modules listed in
``meditron_kernels/ops/__init__.py`` for "triton" and "cuda"). The public functions in
``meditron_kernels/__init__.py`` validate their inputs once and then call :func:`dispatch`.

The registry's public surface, shared by dispatch, the benchmarks and the scripts:

- :func:`implementations` -- the registered implementations of an op, by backend name;
- :func:`resolve` -- the backend name a call would use;
- :func:`unavailable_reason` -- why an op cannot run on a backend here, or None;
- :func:`choose` -- both at once: ``(name, reason)``;
- :func:`dispatch` -- the callable, or the error that ``unavailable_reason`` describes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "MEDITRON_KERNELS_BACKEND"

_REGISTRY: dict[tuple[str, str], Callable] = {}
_default: str | None = None

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the implementation of ``op`` on ``backend``."""
    _check_name(backend, "backend")

    def deco(fn: Callable) -> Callable:
        _REGISTRY[(op, backend)] = fn
        return fn

    return deco


def _check_name(name: str, what: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS} or None, got {name!r}")


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None restores env/auto resolution)."""
    global _default
    if name is not None:
        _check_name(name, "backend")
    _default = name


def get_backend() -> str | None:
    """The process-wide default set by :func:`set_backend`, or None."""
    return _default


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager: run every op inside on ``name`` unless a call names its own."""
    global _default
    if name is not None:
        _check_name(name, "backend")
    previous = _default
    _default = name
    try:
        yield
    finally:
        _default = previous


def cuda_extension_available() -> bool:
    from . import _cuda_ext

    return _cuda_ext.available()


def _named(backend: str | None) -> str | None:
    """The backend asked for by the call, the process default or the environment; None: auto."""
    name = backend if backend is not None else _default
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    if name is not None:
        _check_name(name, "backend")
    return name


def auto_backend(op: str | None, device: torch.device, size: int | None = None, slug: str | None = None) -> str:
    """Auto's choice for ``op`` on ``device`` at shape bucket ``size`` (the last dimension of the
    op's first argument; None: the largest measured bucket). ``slug`` names the GPU model (default:
    the device's own), as the tables in meditron_kernels/tuned/ do."""
    if device.type != "cuda" or not _HAS_TRITON:
        return "torch"
    if op is None:
        return "triton"
    from . import tuned

    choice = tuned.choose(op, slug or tuned.slug_of(device), size)
    return "cuda" if choice == "cuda" and cuda_extension_available() else "triton"


def resolve(backend: str | None, device: torch.device, op: str | None = None, size: int | None = None) -> str:
    """The backend name a call on tensors living on ``device`` will use."""
    name = _named(backend)
    return name if name is not None else auto_backend(op, device, size)


def triton_available() -> bool:
    """Whether the triton package is importable (the Triton op modules need it)."""
    return _HAS_TRITON


def interpreting() -> bool:
    """Whether Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``), which is
    what lets ``backend="triton"`` take CPU tensors. The one place the question is answered:
    dispatch, the op modules and the static report all ask here."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def implementations(op: str) -> dict[str, Callable]:
    """The registered implementations of ``op``, by backend name ({} for an unknown op)."""
    return {name: fn for (o, name), fn in _REGISTRY.items() if o == op}


def _problem(op: str, name: str, device: torch.device) -> tuple[type[Exception], str] | None:
    """Why ``op`` cannot run on backend ``name`` for tensors on ``device``: the exception type a
    call raises and its message; None when it can run."""
    if name == "triton" and not _HAS_TRITON:
        return RuntimeError, f"{op}: backend='triton' needs the triton package (pip install triton)"
    if name == "cuda":
        if device.type != "cuda":
            return ValueError, (f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}; "
                                "a compiled CUDA kernel needs a CUDA device")
        if not cuda_extension_available():
            from . import _cuda_ext

            return RuntimeError, f"{op}: backend='cuda' is unavailable: {_cuda_ext.why_unavailable()}"
    if name == "triton" and device.type != "cuda" and not interpreting():
        return ValueError, (f"{op}: backend='triton' got tensors on {device}; Triton kernels need CUDA tensors, "
                            "or TRITON_INTERPRET=1 set before meditron_kernels is imported to run them on the CPU")
    if (op, name) not in _REGISTRY:
        return NotImplementedError, f"{op} has no {name!r} backend yet"
    return None


def unavailable_reason(op: str, backend: str, device: torch.device | str) -> str | None:
    """Why ``op`` cannot run on ``backend`` for tensors on ``device`` (one line), or None when it can."""
    _check_name(backend, "backend")
    problem = _problem(op, backend, torch.device(device))
    return None if problem is None else problem[1]


def choose(op: str, device: torch.device | str, backend: str | None = None) -> tuple[str, str | None]:
    """Which backend a call of ``op`` on ``device`` would use, and why it cannot run there (None when it can)."""
    device = torch.device(device)
    name = resolve(backend, device, op)
    return name, unavailable_reason(op, name, device)


def dispatch(op: str, backend: str | None, device: torch.device) -> Callable:
    """The implementation of ``op`` for the resolved backend, or a clear error. Under auto on a GPU
    whose measured table picks different backends by shape, the choice waits for the arguments."""
    if _named(backend) is None and device.type == "cuda" and _HAS_TRITON:
        from . import tuned

        slug = tuned.slug_of(device)
        if tuned.has_choices(op, slug):
            def by_shape(first, *args):
                name = auto_backend(op, device, first.shape[-1] if first.dim() else 1, slug)
                return _checked(op, name, device)(first, *args)

            return by_shape
    return _checked(op, resolve(backend, device, op), device)


def _checked(op: str, name: str, device: torch.device) -> Callable:
    problem = _problem(op, name, device)
    if problem is not None:
        error, message = problem
        raise error(message)
    return _REGISTRY[(op, name)]
