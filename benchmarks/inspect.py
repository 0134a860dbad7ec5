"""python -m benchmarks.inspect: the static report of every kernel, for sm_80 and sm_90, with no GPU.

    python -m benchmarks.inspect                     # table of every Triton launch and csrc kernel
    python -m benchmarks.inspect --json              # also benchmarks/results/static-<date>.json
    python -m benchmarks.inspect --modules swiglu --no-csrc

Triton: every module of meditron_kernels.ops with ``static_launches()`` describes the launches it
makes at realistic sizes, built by its own run-time config function (``static_launches(cc)`` when
the configuration depends on the part); each is compiled with triton.compile for its target and
read back (meditron_kernels.static). csrc: every .cu file is compiled with nvcc -cubin using
setup.py's flags (meditron_kernels.csrc_static), and every kernel instantiation read with cuobjdump.

Per record: ``kernel``, ``arch``, ``registers`` (per thread), ``spill_bytes`` (stores + loads),
``shared_bytes``, ``mma`` (none, HMMA or HGMMA), ``vector_load_bits`` (widest global load: 128 means
LDG.E.128), the register-limited warps per SM, and for Triton launches, whose block size is known,
the blocks and warps per SM and what limits them. "TMA" in the load column: the kernel loads
through the tensor memory accelerator (UTMALDG) instead of LDG. Exit status 1 on any spill, any
stack or local memory in a csrc kernel, shared memory over the part's limit, or a kernel that
fails to compile.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

from meditron_kernels import static

from .common import RESULTS_DIR

ARCHS = (80, 90)


def max_warps_by_registers(registers: int, cc: int) -> int:
    """Warps one SM can hold given the registers per thread alone (allocated per warp in 256s)."""
    lim = static.ARCH_LIMITS[cc]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return min(lim["max_warps_per_sm"], lim["regs_per_sm"] // per_warp)


# ---------------------------------------------------------------------------- Triton
def triton_modules() -> list[str]:
    """Modules of meditron_kernels.ops that describe their launches (``static_launches``)."""
    import meditron_kernels.ops as ops

    out = []
    for m in pkgutil.iter_modules(ops.__path__):
        if m.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"meditron_kernels.ops.{m.name}")
        except ImportError:
            continue
        if callable(getattr(mod, "static_launches", None)):
            out.append(m.name)
    return out


def triton_records(modules=None, archs=ARCHS) -> list[dict]:
    """Compile every launch of every module for each architecture and read the cubins
    (meditron_kernels.static.module_reports: in a child process when the interpreter is on)."""
    records = []
    for name in modules if modules is not None else triton_modules():
        try:
            reports = static.module_reports(f"meditron_kernels.ops.{name}", tuple(archs))
        except Exception as e:  # noqa: BLE001 (report the failure, carry on with the others)
            records.append(dict(kernel=f"{name} (all launches)", arch=",".join(f"sm_{a}" for a in archs),
                                source=f"triton:{name}", error=f"{type(e).__name__}: {str(e).strip()[-1500:]}"))
            continue
        for rec in reports.values():
            cc = int(rec["arch"].split("_")[1])
            rec.update(source=f"triton:{name}", max_warps_by_registers=max_warps_by_registers(rec["registers"], cc))
            records.append(rec)
    return records


# ---------------------------------------------------------------------------- csrc
def _sass_bodies(cubin: str, cuobjdump: str) -> dict[str, str]:
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def csrc_records(archs=ARCHS) -> tuple[list[dict], str | None]:
    """Records of every csrc kernel instantiation, or ([], why not)."""
    try:
        from meditron_kernels import csrc_static as S
    except ImportError:
        return [], "this build has no meditron_kernels.csrc_static (the csrc inspector)"
    if not os.path.isdir(S.CSRC) or not S.cu_sources():
        return [], "csrc/ has no .cu files"
    nvcc = S.find_nvcc()
    cuobjdump = S.find_cuobjdump(nvcc)
    if nvcc is None or cuobjdump is None:
        return [], f"needs nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})"
    records = []
    with tempfile.TemporaryDirectory() as d:
        stats = S.compile_all(d, archs=tuple(archs))
        for (src, cc), kernels in sorted(stats.items()):
            cubin = os.path.join(d, f"{os.path.splitext(src)[0]}.sm_{cc}.cubin")
            bodies = _sass_bodies(cubin, cuobjdump) if os.path.exists(cubin) else {}
            for k in kernels:
                body = bodies.get(k.mangled)
                facts = static.sass_facts(body) if body is not None else dict(mma="unknown")
                records.append(dict(
                    kernel=k.name, arch=f"sm_{cc}", source=f"csrc/{src}", registers=k.registers,
                    spill_bytes=k.spill_stores + k.spill_loads, spill_stores=k.spill_stores, spill_loads=k.spill_loads,
                    stack_bytes=k.stack, local_bytes=k.local, shared_bytes=k.shared,
                    shared_limit=static.ARCH_LIMITS[cc]["smem_per_block"], mma=facts["mma"],
                    vector_load_bits=max(k.ldg_bits, default=0), vector_store_bits=max(k.stg_bits, default=0),
                    max_warps_by_registers=max_warps_by_registers(k.registers, cc)))
    return records, None


# ---------------------------------------------------------------------------- report
def problems(rec: dict) -> list[str]:
    """What is wrong with one record (empty when nothing)."""
    if rec.get("error"):
        return ["failed to compile"]
    out = []
    if rec.get("spill_bytes"):
        out.append(f"{rec['spill_bytes']} bytes spilled")
    if rec.get("source", "").startswith("csrc/") and (rec.get("stack_bytes") or rec.get("local_bytes")):
        out.append(f"stack {rec.get('stack_bytes')} / local {rec.get('local_bytes')} bytes")
    if rec.get("shared_limit") and rec.get("shared_bytes", 0) > rec["shared_limit"]:
        out.append(f"shared {rec['shared_bytes']} > limit {rec['shared_limit']}")
    return out


def format_table(records: list[dict]) -> str:
    head = (f"{'source':22}{'kernel':58}{'arch':7}{'regs':>5}{'spill':>6}{'smem KB':>8}{'warps/SM':>9}"
            f"{'limit':>10}{'mma':>7}{'LDG bits':>9}")
    lines = [head, "-" * len(head)]
    for r in records:
        if r.get("error"):
            lines.append(f"{r['source']:22}{r['kernel'][:57]:58}{r['arch']:7}  ERROR: {r['error'].splitlines()[-1][:120]}")
            continue
        warps = r.get("warps_per_sm", r.get("max_warps_by_registers"))
        limit = r.get("limited_by", "registers" if "warps_per_sm" not in r else "")
        loads = "TMA" if r.get("tma") and not r["vector_load_bits"] else r["vector_load_bits"]
        lines.append(f"{r['source'][:21]:22}{r['kernel'][:57]:58}{r['arch']:7}{r['registers']:5}{r['spill_bytes']:6}"
                     f"{r['shared_bytes'] / 1024:8.1f}{warps:9}{limit:>10}{r['mma']:>7}{loads:>9}")
    return "\n".join(lines)


def collect(modules=None, archs=ARCHS, csrc: bool = True, triton: bool = True) -> tuple[list[dict], list[str]]:
    """All records, and notes on what was not inspected."""
    records, notes = [], []
    if triton:
        records += triton_records(modules, archs)
    if csrc:
        recs, why = csrc_records(archs)
        records += recs
        if why:
            notes.append(f"csrc kernels not inspected: {why}")
    return records, notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--modules", default=None, help="Triton op modules, comma-separated (default: all with static_launches)")
    p.add_argument("--no-csrc", action="store_true", help="skip the csrc kernels")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--json", nargs="?", const="auto", metavar="PATH",
                   help="write the records as a JSON list (default benchmarks/results/static-<date>.json)")
    args = p.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    bad = [a for a in archs if a not in static.ARCH_LIMITS]
    if bad:
        p.error(f"--arch: no limits known for {bad}; choose from {sorted(static.ARCH_LIMITS)}")
    modules = args.modules.split(",") if args.modules else None
    if modules is not None:
        known = triton_modules()
        unknown = [m for m in modules if m not in known]
        if unknown:
            p.error(f"--modules: {', '.join(unknown)} not among the modules with static_launches: {', '.join(known)}")
    records, notes = collect(modules, archs, csrc=not args.no_csrc, triton=not args.no_triton)
    print(format_table(records))
    for n in notes:
        print(n)
    bad_recs = [(r, problems(r)) for r in records if problems(r)]
    print(f"{len(records)} kernel records; {len(bad_recs)} with problems")
    for r, why in bad_recs:
        print(f"  {r['source']} {r['kernel']} {r['arch']}: {'; '.join(why)}")
    if args.json:
        path = (os.path.join(RESULTS_DIR, f"static-{datetime.date.today().isoformat()}.json")
                if args.json == "auto" else args.json)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {path}")
    return 1 if bad_recs else 0


if __name__ == "__main__":
    sys.exit(main())
