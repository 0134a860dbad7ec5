"""Kernel backends, one op per module. Each module registers its implementations with
:func:`meditron_kernels.backend.register` when imported; all are imported here. The Triton
modules need the triton package; the cuda_* modules (the compiled extension's Python side)
do not."""
import importlib
import importlib.util
import pkgutil

_HAS_TRITON = importlib.util.find_spec("triton") is not None

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and (_HAS_TRITON or _mod.name.startswith("cuda_")):
        importlib.import_module(f"{__name__}.{_mod.name}")
