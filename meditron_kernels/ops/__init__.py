"""Kernel backends, one op per module. Importing a module registers its implementations with
:func:`meditron_kernels.backend.register`; every module is listed here, so a new op's module
is added to one of these two lines (CONTRIBUTING.md, "Adding an op"). The Triton modules need
the triton package; the cuda_* modules (the compiled extension's Python side) do not."""
from ..backend import triton_available
from . import cuda_rms_norm, cuda_rotary, cuda_swiglu  # noqa: F401

if triton_available():
    from . import attention, cross_entropy, geglu, rms_norm, rotary, swiglu, xielu  # noqa: F401
