"""Kernel backends, one op per module. Each module registers its implementations with
:func:`meditron_kernels.backend.register` when imported; all are imported here."""
import importlib
import importlib.util
import pkgutil

if importlib.util.find_spec("triton") is not None:
    for _mod in pkgutil.iter_modules(__path__):
        if not _mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{_mod.name}")
