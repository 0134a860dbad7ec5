"""Static checks of the CUDA kernels in csrc/, without a GPU.

Every .cu file compiles with nvcc for sm_80 and sm_90 (once per arch per session, in parallel);
every kernel instantiation has no stack frame, no local memory and no spills; every
instantiation on a 16-byte path loads and stores with 128-bit global accesses. Since each
.cu file instantiates every (dtype, path, size class) its launcher can pick, this covers every
run-time configuration. Skips with the reason when nvcc or cuobjdump is missing.
"""
from __future__ import annotations

import os
import re

import pytest

from meditron_kernels import csrc_static as S
from meditron_kernels.ops import cuda_rms_norm

NVCC = S.find_nvcc()
CUOBJDUMP = S.find_cuobjdump(NVCC)
SOURCES = S.cu_sources()
needs_nvcc = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None,
                                reason=f"needs nvcc and cuobjdump (nvcc={NVCC}, cuobjdump={CUOBJDUMP}); "
                                       "install the CUDA toolkit or set NVCC / CUDA_HOME")


@pytest.fixture(scope="session")
def stats(tmp_path_factory):
    return S.compile_all(str(tmp_path_factory.mktemp("cubins")))


# Which instantiations take the 16-byte path, read off their template arguments.
def _vectorized(name: str) -> bool | None:
    base, args = name.split("<", 1)[0], S.template_args(name)
    if base in ("rms_norm_fwd_kernel", "rms_norm_bwd_kernel"):  # <T, W, VEC, VPT>
        return int(args[2]) > 1
    if base == "rms_norm_dweight_kernel":  # <W, V>: V fp32 partials per access
        return args[1] == "4"
    if base in ("rotary_kernel", "swiglu_fwd_kernel", "swiglu_bwd_kernel"):  # <T, VECTOR, ...>
        return args[1] == "true"
    return None


KERNEL_FAMILIES = {"rms_norm.cu": {"rms_norm_fwd_kernel", "rms_norm_bwd_kernel", "rms_norm_dweight_kernel"},
                   "rotary.cu": {"rotary_kernel"},
                   "swiglu.cu": {"swiglu_fwd_kernel", "swiglu_bwd_kernel"}}


def test_sources_are_torch_free():
    """nvcc alone must compile the kernels: only bindings.cpp may see torch."""
    for name in os.listdir(S.CSRC):
        if name == "bindings.cpp":
            continue
        with open(os.path.join(S.CSRC, name)) as f:
            includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', f.read(), flags=re.M)
        torchy = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11", "Python.h")]
        assert not torchy, f"csrc/{name} includes {torchy}"


def test_every_source_is_known():
    assert sorted(KERNEL_FAMILIES) == SOURCES, "add the new .cu file's kernels to KERNEL_FAMILIES"


def test_python_limits_mirror_kernels_h():
    with open(os.path.join(S.CSRC, "kernels.h")) as f:
        text = f.read()
    assert int(re.search(r"kRmsMaxThreads = (\d+);", text).group(1)) == cuda_rms_norm._MAX_THREADS
    assert int(re.search(r"kRmsRegsPerOperand = (\d+);", text).group(1)) == cuda_rms_norm._REGS_PER_OPERAND


@needs_nvcc
@pytest.mark.parametrize("cc", S.ARCHS)
@pytest.mark.parametrize("src", SOURCES)
def test_compiles_with_all_kernels(stats, src, cc):
    names = {k.name.split("<", 1)[0] for k in stats[(src, cc)]}
    assert names == KERNEL_FAMILIES[src], f"{src} sm_{cc}: kernels {sorted(names)}"


@needs_nvcc
@pytest.mark.parametrize("cc", S.ARCHS)
@pytest.mark.parametrize("src", SOURCES)
def test_no_spills_no_stack(stats, src, cc):
    bad = [f"{k.name}: regs {k.registers}, stack {k.stack}, local {k.local}, spills {k.spill_stores}/{k.spill_loads}"
           for k in stats[(src, cc)] if k.stack or k.local or k.spill_stores or k.spill_loads]
    assert not bad, f"sm_{cc}:\n" + "\n".join(bad)


@needs_nvcc
@pytest.mark.parametrize("cc", S.ARCHS)
@pytest.mark.parametrize("src", SOURCES)
def test_vector_path_is_128_bit(stats, src, cc):
    kernels = stats[(src, cc)]
    vec = [k for k in kernels if _vectorized(k.name)]
    for family in KERNEL_FAMILIES[src]:
        assert any(k.name.startswith(family + "<") for k in vec), f"no 16-byte instantiation of {family}"
    for k in vec:
        assert 128 in k.ldg_bits, f"sm_{cc} {k.name}: no LDG.E.128 (load widths {sorted(set(k.ldg_bits))})"
        if not k.name.startswith("rms_norm_dweight_kernel"):  # it stores one weight element per column
            assert 128 in k.stg_bits, f"sm_{cc} {k.name}: no STG.E.128 (store widths {sorted(set(k.stg_bits))})"
