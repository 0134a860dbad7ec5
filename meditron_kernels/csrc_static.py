"""Static checks of the CUDA kernels in csrc/ without a GPU: compile each .cu file to a cubin with
nvcc, then read registers, stack, local memory, spills and global access widths per kernel.

The .cu files are torch-free, so this needs only nvcc (and cuobjdump, which ships with the CUDA
toolkit and with the triton wheel). The flags below are the ones torch's extension build gives
nvcc plus setup.py's own, so the code inspected is the code that runs.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

ARCHS = (80, 90)

# setup.py's nvcc flags and the defines torch.utils.cpp_extension adds for every CUDA source.
# torch also picks the C++ standard (C++20 for torch 2.14); C++17 here keeps older torch covered.
NVCC_FLAGS = [
    "-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    cands = [shutil.which("cuobjdump")]
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    cands.append(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"))
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for cand in cands:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def cu_sources() -> list[str]:
    return sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))


@dataclasses.dataclass
class KernelStats:
    mangled: str
    name: str            # demangled, namespace and argument list stripped: kernel<template args>
    registers: int
    stack: int
    local: int
    shared: int
    spill_stores: int
    spill_loads: int
    ldg_bits: list[int]  # width of every global load in the SASS
    stg_bits: list[int]  # width of every global store


def compile_cubin(src: str, cc: int, out_dir: str, nvcc: str) -> tuple[str, str]:
    """nvcc -cubin for sm_<cc>; returns (cubin path, ptxas -v log)."""
    cubin = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(src))[0]}.sm_{cc}.cubin")
    cmd = [nvcc, *NVCC_FLAGS, f"-arch=sm_{cc}", "-cubin", "-Xptxas", "-v", "-o", cubin, src]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return cubin, proc.stdout + proc.stderr


_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def _widths(sass: str, op: str) -> list[int]:
    out = []
    for m in re.finditer(rf"\b{op}\.E((?:\.[A-Z0-9_]+)*)", sass):
        w = re.search(r"\.(128|64|U16|S16|U8|S8)\b", m.group(1))
        out.append(_WIDTH[w.group(1)] if w else 32)
    return out


def _demangle(names: list[str], nvcc: str) -> dict[str, str]:
    filt = shutil.which("cu++filt") or os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cu++filt")
    tool = filt if os.path.isfile(filt) else shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> str:
    """'void mk::rms_norm_fwd_kernel<float, float, 4, 4>(const float *, ...)' -> 'rms_norm_fwd_kernel<float, float, 4, 4>'."""
    s = demangled.removeprefix("void ")
    depth = 0
    for i, ch in enumerate(s):  # the argument list starts at the first '(' outside template brackets
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            s = s[:i]
            break
    head, _, rest = s.partition("<")
    return head.split("::")[-1] + ("<" + rest if rest else "")


def inspect_cubin(cubin: str, ptxas_log: str, cuobjdump: str, nvcc: str) -> list[KernelStats]:
    res = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    usage = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res):
        usage[m.group(1)] = tuple(int(m.group(i)) for i in range(2, 6))
    spills = {}
    for m in re.finditer(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", ptxas_log):
        spills[m.group(1)] = (int(m.group(3)), int(m.group(4)))
    bodies = {}
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    for name, body in zip(parts[1::2], parts[2::2]):
        bodies[name] = body
    names = _demangle(sorted(usage), nvcc)
    stats = []
    for mangled, (reg, stack, shared, local) in sorted(usage.items()):
        st, ld = spills.get(mangled, (0, 0))
        body = bodies.get(mangled, "")
        stats.append(KernelStats(mangled, _short(names[mangled]), reg, stack, local, shared, st, ld,
                                 _widths(body, "LDG"), _widths(body, "STG")))
    return stats


def template_args(name: str) -> list[str]:
    """'k<float, true, 4>' -> ['float', 'true', '4'] (top-level arguments only)."""
    if "<" not in name:
        return []
    inner = name[name.index("<") + 1:name.rindex(">")]
    out, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "<") - (ch == ">")
        cur += ch
    return out + [cur.strip()]


def compile_all(out_dir: str, archs=ARCHS, jobs: int | None = None) -> dict[tuple[str, int], list[KernelStats]]:
    """Every csrc/*.cu for every arch, nvcc runs in parallel: {(file, cc): [KernelStats]}."""
    nvcc = find_nvcc()
    cuobjdump = find_cuobjdump(nvcc)
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"need nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})")

    def one(key):
        src, cc = key
        cubin, log = compile_cubin(os.path.join(CSRC, src), cc, out_dir, nvcc)
        return key, inspect_cubin(cubin, log, cuobjdump, nvcc)

    keys = [(src, cc) for src in cu_sources() for cc in archs]
    workers = jobs or max(1, min(len(keys), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, keys))


def main() -> None:
    """python -m meditron_kernels.csrc_static: registers, spills, stack and access widths per kernel."""
    with tempfile.TemporaryDirectory() as d:
        stats = compile_all(d)
    print(f"{'arch':6}{'kernel':62}{'regs':>5}{'stack':>6}{'spill st/ld':>12}{'smem':>6}  widest LDG/STG")
    for (src, cc), kernels in sorted(stats.items()):
        for k in kernels:
            print(f"sm_{cc:<3} {k.name:61}{k.registers:5}{k.stack:6}{k.spill_stores:>7}/{k.spill_loads:<4}{k.shared:6}"
                  f"  {max(k.ldg_bits, default=0)}/{max(k.stg_bits, default=0)}")
    bad = [k.name for ks in stats.values() for k in ks if k.stack or k.local or k.spill_stores or k.spill_loads]
    print(f"{sum(map(len, stats.values()))} kernels, {len(bad)} with stack or spills")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
