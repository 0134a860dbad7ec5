"""Test setup. The Triton interpreter must be switched on before any kernel module is
imported, so that backend="triton" runs on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import meditron_kernels  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reproducible seed per test: fresh random inputs, never zeros."""
    seed = abs(hash(request.node.nodeid)) % (2**31)
    torch.manual_seed(seed)
    yield


HAS_CUDA = torch.cuda.is_available()
