"""Installs meditron_kernels; builds the optional CUDA extension meditron_kernels._C from csrc/.

The extension is built only when a CUDA toolkit and a CUDA-enabled torch are both present
(install with ``pip install --no-build-isolation -e .`` so the build sees your torch).
MEDITRON_KERNELS_SKIP_CUDA_BUILD=1 forces the skip. TORCH_CUDA_ARCH_LIST picks the
architectures (default "8.0;9.0"): one -gencode pair each, plus PTX for the newest.
MAX_JOBS defaults to what free memory allows (about 3 GB per nvcc job).
"""
import glob
import os
import re
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _skip(reason: str):
    print(f"meditron-kernels: skipping the CUDA extension: {reason}", file=sys.stderr)
    return [], {}


def _gencode_flags(arch_list: str) -> list[str]:
    """"8.0;9.0" -> a cubin per arch plus PTX of the newest (JIT-compiled by newer GPUs).
    Accepts torch's spellings: separators ; , or space, "+PTX" suffixes, "9.0a"."""
    archs = []
    for a in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        a = a.strip().replace("+PTX", "").replace(".", "")
        if a and a not in archs:
            if not re.fullmatch(r"\d+[af]?", a):
                raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: cannot read {a!r} (use numbers like 8.0;9.0)")
            archs.append(a)
    if not archs:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _max_jobs() -> str:
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_mem = 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return str(max(1, min(cpus, by_mem)))


def cuda_extensions():
    if os.environ.get("MEDITRON_KERNELS_SKIP_CUDA_BUILD", "") not in ("", "0"):
        return _skip("MEDITRON_KERNELS_SKIP_CUDA_BUILD is set")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return _skip("csrc/ has no sources")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable in the build environment (use pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return _skip(f"no CUDA toolkit found at CUDA_HOME={CUDA_HOME} (set CUDA_HOME to the toolkit's root)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    # No -std flag: torch adds the C++ standard its own headers need (C++20 for torch 2.14).
    # The nvcc flags are mirrored by meditron_kernels/csrc_static.py, which checks the SASS.
    ext = CUDAExtension(
        name="meditron_kernels._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"] + _gencode_flags(arch_list),
        },
    )
    print(f"meditron-kernels: building the CUDA extension for {arch_list} with MAX_JOBS={os.environ['MAX_JOBS']}",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
