"""python -m benchmarks: every kernel benchmark on this device, one table.

    python -m benchmarks                          # all ops, shapes, providers, directions
    python -m benchmarks --quick                  # the headline shape of each op
    python -m benchmarks --ops rms_norm,attention --providers triton,torch,sdpa-flash
    python -m benchmarks --json                   # also write benchmarks/results/<device>-<date>.json
    python -m benchmarks --json out.json --plot   # and a bar chart per op (% of floor per provider)

Without a GPU it says so and runs what a CPU measures meaningfully: the PyTorch reference ops at
small shapes (wall clock) and a tiny training step. Exit status 1 when a provider's output fails
the accuracy check or one of our backends raises.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import ALIASES, OPS, SIZES, canonical_op
from . import cases as all_cases
from .common import (DIRECTIONS, DTYPES, default_json_path, environment, resolve_device, run_case, skipped_row,
                     write_json)
from .providers import ALL as PROVIDERS

OURS = ("triton", "cuda")
CPU_NOTE = ("No CUDA device here: GB/s, TFLOP/s and % of floor are GPU figures and need a GPU.\n"
            "Running the CPU-meaningful part instead: the PyTorch reference ops at small shapes (wall-clock\n"
            "medians, no floors) and a tiny training step. The Triton kernels are not timed in the interpreter.")


def _csv(value: str | None, allowed, what: str, canon=None) -> list[str] | None:
    if value is None:
        return None
    items = [canon(v.strip()) if canon else v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"--{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one headline shape per op")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="shape set: full (GPU default), quick (= --quick), cpu (CPU default), smoke (tiny)")
    p.add_argument("--ops", help=f"comma-separated ops: {', '.join(OPS)} (aliases: {', '.join(sorted(ALIASES))})")
    p.add_argument("--providers", help=f"comma-separated providers: {', '.join(PROVIDERS)}")
    p.add_argument("--directions", help=f"comma-separated: {', '.join(DIRECTIONS)}")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 (fp32 on the CPU)")
    p.add_argument("--json", nargs="?", const="auto", metavar="PATH",
                   help="write the results as JSON (default path benchmarks/results/<device>-<date>.json; rows "
                        "of an earlier run of the same day are replaced, others kept)")
    p.add_argument("--plot", nargs="?", const="auto", metavar="DIR",
                   help="bar chart per op of %% of floor per provider, PNG (default: next to the JSON)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting new cases after this long; the rest are reported as skipped")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per row (ms)")
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check against the reference")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--no-train-step", action="store_true",
                   help="on the CPU, skip the tiny training step and the Hugging Face loss measurement")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.ops = _csv(args.ops, OPS, "ops", canonical_op_or_keep)
    args.providers = _csv(args.providers, PROVIDERS, "providers")
    args.directions = _csv(args.directions, DIRECTIONS, "directions")
    return args


def canonical_op_or_keep(name: str) -> str:
    try:
        return canonical_op(name)
    except ValueError:
        return name


# ---------------------------------------------------------------------------- output
def _fmt(v, spec: str, empty: str = "-") -> str:
    return empty if v is None else format(v, spec)


def _num(v: float) -> str:
    """Three significant digits without exponents for the usual ranges: 3012, 45.3, 0.0123."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.3g}" if v < 10 else f"{v:.1f}"
    return f"{v:.3g}"


def format_table(rows: list[dict]) -> str:
    head = (f"{'op':27}{'shape':32}{'dtype':6}{'dir':9}{'provider':15}{'ms':>9}{'achieved':>17}"
            f"{'% floor':>8}{'vs eager':>9}{'mem MB':>9}  check")
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["op"], r["shape"], r["dtype"])
        if last is not None and key != last:
            lines.append("")
        last = key
        rate = f"{_num(r['rate'])} {r['unit']}" if r.get("rate") is not None else "-"
        pct = _fmt(r.get("pct_floor"), ".1f")
        sp = _fmt(r.get("speedup_vs_eager"), ".2f")
        sp = sp + "x" if sp != "-" else sp
        check = r.get("check", "")
        if r.get("note"):
            check += f" ({r['note']})"
        lines.append(f"{r['op']:27}{r['shape'][:31]:32}{r['dtype']:6}{r['direction']:9}{r['provider']:15}"
                     f"{r['ms']:9.3f}{rate:>17}{pct:>8}{sp:>9}{_fmt(r.get('extra_mem_mb'), '.0f'):>9}  {check}")
    others = {}
    for r in rows:
        if r["status"] != "ok":
            others.setdefault((r["status"], r["op"], r["provider"], r["reason"]), []).append(r)
    if others:
        lines += ["", "Not measured:"]
        for (status, op, prov, reason), rs in sorted(others.items()):
            lines.append(f"  {status:8}{op:27}{prov:15}{reason}  [{len(rs)} row{'s' if len(rs) > 1 else ''}]")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: str, stem: str) -> list[str]:
    """One PNG per op: % of floor per provider, grouped by shape and direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for op in OPS:
        rs = [r for r in rows if r["op"] == op and r["status"] == "ok" and r.get("pct_floor") is not None]
        if not rs:
            continue
        groups = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']} {r['direction']}" for r in rs))
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        width = 0.8 / len(provs)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4.5))
        for j, prov in enumerate(provs):
            vals = {f"{r['shape']}\n{r['dtype']} {r['direction']}": r["pct_floor"] for r in rs if r["provider"] == prov}
            xs = [i + (j - (len(provs) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, [vals.get(g, 0.0) for g in groups], width, label=prov)
        ax.axhline(100, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel("% of floor (100 = measured ceiling)")
        ax.set_title(f"{op} on {rs[0].get('device', '')}".strip())
        ax.legend(fontsize=7, ncols=min(4, len(provs)))
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-{op}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- main
def run(args, progress=None) -> tuple[dict, list[dict]]:
    """All selected cases; ``progress(env, rows)`` after each (the JSON is rewritten then, so a run
    stopped by a timeout keeps what it measured)."""
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        print(CPU_NOTE, flush=True)
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    size = args.size or (("quick" if args.quick else "full") if on_gpu else "cpu")
    providers = args.providers or (None if on_gpu else ["torch"])
    t0 = time.monotonic()
    env = environment(device)
    if on_gpu:
        print(f"{env['device_name']} (cc {env['compute_capability']}, driver {env['driver']}), torch {env['torch']}, "
              f"triton {env['triton']}: measured copy {env['copy_gbps']:.0f} GB/s, bf16 GEMM "
              f"{env['gemm_tflops']:.0f} TFLOP/s", flush=True)
    rows: list[dict] = []
    todo = all_cases(size, dtype, args.ops)
    for i, case in enumerate(todo):
        if args.budget is not None and time.monotonic() - t0 > args.budget:
            for c in todo[i:]:
                rows += [skipped_row(c, p.name, d, f"time budget of {args.budget:.0f} s spent")
                         for p in c.providers if providers is None or p.name in providers
                         for d in c.directions if args.directions is None or d in args.directions]
            break
        t_case = time.monotonic()
        got = run_case(case, env, device, providers, args.directions, rep_ms=args.rep_ms,
                       check=not args.no_check, seed=args.seed + i)
        for r in got:
            r["device"] = env["device_name"]
        rows += got
        ok = sum(r["status"] == "ok" for r in got)
        print(f"[{time.monotonic() - t0:6.1f} s] {case.op} {case.shape} {case.dtype_name}: {ok}/{len(got)} rows "
              f"in {time.monotonic() - t_case:.1f} s", file=sys.stderr, flush=True)
        if progress is not None:
            progress(env, rows)
    return env, rows


def main(argv=None) -> int:
    args = parse_args(argv)

    def json_path(env):
        return default_json_path(env) if args.json == "auto" else args.json

    env, rows = run(args, progress=(lambda env, rows: write_json(json_path(env), env, rows)) if args.json else None)
    print()
    print(format_table(rows))
    status = 0
    failed = [r for r in rows if str(r.get("check", "")).startswith("FAIL")]
    broken = [r for r in rows if r["status"] == "error" and r["provider"] in OURS]
    if failed or broken:
        print(f"\n{len(failed)} rows failed the accuracy check, {len(broken)} rows of our backends raised.")
        status = 1
    written = None
    if args.json:
        written = write_json(json_path(env), env, rows)
        print(f"\nwrote {written}")
    if args.plot:
        if env["device_type"] != "cuda":
            print("\n--plot: % of floor is a GPU figure; nothing to plot on the CPU.")
        else:
            out_dir = os.path.dirname(written or default_json_path(env)) if args.plot == "auto" else args.plot
            try:
                for path in plot(rows, out_dir, f"{env['device_slug']}-{env['date']}"):
                    print(f"wrote {path}")
            except ImportError as e:
                print(f"\n--plot needs matplotlib ({e}); the JSON has every number.")
    if env["device_type"] != "cuda" and not args.no_train_step:
        from . import train_step

        print("\nTraining step (tiny model on the CPU):", flush=True)
        ts_args = ["--preset", "tiny", "--seq", "128", "--batch", "2", "--steps", "2", "--warmup", "1"]
        if args.json:
            ts_args += ["--json", default_json_path(env, "-train-step") if args.json == "auto"
                        else os.path.splitext(args.json)[0] + "-train-step.json"]
        status = max(status, train_step.main(ts_args))
    if env["device_type"] != "cuda" and not args.no_train_step:
        from . import hf_step

        # The Hugging Face step's CPU part: the loss's peak memory, fused against unfused. A small
        # hidden size keeps it within a couple of minutes on 2 cores; the logits set the memory.
        print("\nHugging Face causal-LM loss (CPU):", flush=True)
        status = max(status, hf_step.main(["--loss-memory", "--hidden", "64"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
