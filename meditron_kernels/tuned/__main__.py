"""python -m meditron_kernels.tuned RESULTS.json [--out-dir DIR]: write the measured backend table
of the GPU that produced RESULTS.json (a benchmarks/results kernels file) into this folder."""
from __future__ import annotations

import argparse
import json
import sys

from . import build, write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meditron_kernels.tuned", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a kernels results file written by python -m benchmarks --json")
    ap.add_argument("--out-dir", default=None, help="where to write <device>.json (default: meditron_kernels/tuned/)")
    args = ap.parse_args(argv)
    try:
        with open(args.results) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {args.results}: {e}", file=sys.stderr)
        return 2
    env = doc.get("env", {})
    if doc.get("kind") != "kernels" or env.get("device_type") != "cuda":
        print(f"error: {args.results} is not a kernels results file from a CUDA device", file=sys.stderr)
        return 2
    table = build(doc.get("rows", []), env["device_name"], source=args.results)
    path = write(table, args.out_dir)
    n = sum(len(b) for b in table["ops"].values())
    print(f"{path}: {n} op/bucket choices for {env['device_name']}")
    for op, buckets in sorted(table["ops"].items()):
        for key, e in sorted(buckets.items(), key=lambda kv: int(kv[0])):
            print(f"  {op:28} <= {key:>6}: {e['backend']:6} {e['ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
