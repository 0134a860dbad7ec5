"""Static GPU checks without a GPU: compile a Triton launch for sm_80 / sm_90 and read
registers, spills, shared memory, matrix instructions and load widths off the cubin.

An op builds each launch it makes as a :class:`~meditron_kernels.ops._common.Launch`, one
function per kernel that serves both the run time and ``static_launches()`` (so the
configuration under test is the one that runs). The test suite and
``python -m benchmarks.inspect`` compile those descriptions.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from typing import Any

from .backend import interpreting
from .ops._common import Launch

# Per-SM limits. Shared memory is the per-block opt-in maximum.
ARCH_LIMITS = {
    80: dict(name="A100 (sm_80)", regs_per_sm=65536, max_warps_per_sm=64, max_blocks_per_sm=32, smem_per_block=163 * 1024,
             smem_per_sm=164 * 1024),
    90: dict(name="H100 (sm_90)", regs_per_sm=65536, max_warps_per_sm=64, max_blocks_per_sm=32, smem_per_block=227 * 1024,
             smem_per_sm=228 * 1024),
}


def _jit_function(kernel):
    """The JITFunction behind ``kernel``, also when TRITON_INTERPRET=1 made it an InterpretedFunction."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if isinstance(fn, JITFunction):
        return fn
    if fn is None:
        raise TypeError(f"not a Triton kernel: {kernel!r}")
    return _jit_of_python_fn(fn)


@functools.lru_cache(maxsize=None)
def _jit_of_python_fn(fn):
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_launch(launch: Launch, cc: int):
    """triton.compile of ``launch`` for compute capability ``cc`` (80 or 90), specialised the
    way the run-time launcher specialises it (16-byte alignment, ints divisible by 16, ints equal to 1)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    jf = _jit_function(launch.kernel)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(jf.params):
        if p.name not in launch.args:
            raise KeyError(f"{launch.name}: argument {p.name!r} of {jf.__name__} is missing")
        val = launch.args[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = val
            continue
        ty, attr = native_specialize_impl(BaseBackend, val, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = attr
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    src = ASTSource(jf, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))


def _ptxas_spills(ptx: str, cc: int) -> tuple[int, int, int]:
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        from triton.backends.nvidia.compiler import get_ptxas

        out = subprocess.run([get_ptxas(cc).path, "-v", f"-arch={arch}", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    frame = sum(int(x) for x in re.findall(r"(\d+) bytes stack frame", text))
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", text))
    return frame, stores, loads


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def _registers(cubin: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return max(int(x) for x in re.findall(r"REG:(\d+)", out))


def sass_facts(sass: str) -> dict[str, Any]:
    """Matrix-instruction family and the widest global load in a SASS listing."""
    mma = "HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "none")
    widths = []
    for m in re.finditer(r"\bLDG\.E((?:\.[A-Z0-9]+)*)", sass):
        mods = m.group(1)
        w = re.search(r"\.(128|64|U16|S16|U8|S8)\b", mods)
        widths.append({"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}[w.group(1)] if w else 32)
    return dict(mma=mma, vector_load_bits=max(widths) if widths else 0, tma="UTMALDG" in sass)


def occupancy(registers: int, shared_bytes: int, num_warps: int, cc: int) -> dict[str, Any]:
    lim = ARCH_LIMITS[cc]
    threads = num_warps * 32
    per_warp_regs = -(-registers * 32 // 256) * 256  # allocation granularity: 256 registers per warp
    by_regs = lim["regs_per_sm"] // max(per_warp_regs * num_warps, 1)
    by_smem = lim["smem_per_sm"] // shared_bytes if shared_bytes else lim["max_blocks_per_sm"]
    by_warps = lim["max_warps_per_sm"] // num_warps
    blocks = max(0, min(by_regs, by_smem, by_warps, lim["max_blocks_per_sm"]))
    limiter = min((("registers", by_regs), ("shared", by_smem), ("warps", by_warps)), key=lambda t: t[1])[0]
    return dict(threads_per_block=threads, blocks_per_sm=blocks, warps_per_sm=blocks * num_warps, limited_by=limiter)


def report(launch: Launch, cc: int) -> dict[str, Any]:
    """Everything the static report prints for one launch on one architecture."""
    ck = compile_launch(launch, cc)
    cubin = ck.asm["cubin"]
    registers = _registers(cubin)
    frame, stores, loads = _ptxas_spills(ck.asm["ptx"], cc)
    shared = int(ck.metadata.shared)
    # Warp specialization adds warps (num_warps 4 -> 12 on sm_90) and moves registers between them
    # with setmaxnreg; the block's size is what the compiler launched.
    warps = int(getattr(ck.metadata, "num_warps", launch.num_warps))
    sass = _sass(cubin)
    rec = dict(kernel=launch.name, arch=f"sm_{cc}", registers=registers, spill_bytes=stores + loads,
               spill_stores=stores, spill_loads=loads, stack_bytes=frame, shared_bytes=shared,
               shared_limit=ARCH_LIMITS[cc]["smem_per_block"], num_warps=launch.num_warps,
               num_stages=launch.num_stages, launched_warps=warps,
               setmaxnreg=sorted({int(x, 16) for x in re.findall(r"USETMAXREG\.\S+\s+(?:\S+,\s*)?0x([0-9a-f]+)",
                                                                  sass)}))
    rec.update(sass_facts(sass))
    rec.update(occupancy(registers, shared, warps, cc))
    return rec


def module_reports(module: str, ccs=(80, 90)) -> dict[str, dict[str, Any]]:
    """``report`` of every launch in ``module.static_launches()`` (or ``static_launches(cc)``), keyed
    ``"<launch name>@<cc>"``.

    With the Triton interpreter on, ``triton.jit`` yields interpreted functions (``tl.sum`` and
    friends included) that ``triton.compile`` cannot lower, so the compilation then runs in a
    child process with TRITON_INTERPRET removed from its environment.
    """
    if not interpreting():
        import importlib

        import inspect

        mod = importlib.import_module(module)
        # static_launches() may take the architecture when its run-time configs differ per arch
        per_arch = len(inspect.signature(mod.static_launches).parameters) > 0
        return {f"{launch.name}@{cc}": report(launch, cc)
                for cc in ccs for launch in (mod.static_launches(cc) if per_arch else mod.static_launches())}
    import json
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    code = ("import json, sys; from meditron_kernels.static import module_reports; "
            f"json.dump(module_reports({module!r}, {tuple(ccs)!r}), sys.stdout)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"static compilation of {module} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)
