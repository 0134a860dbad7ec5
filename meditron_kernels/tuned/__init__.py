"""Measured backend choice: per GPU model, which backend (and tile configuration) was fastest for
each op and shape bucket.

The tables are JSON files in this folder, one per device, named by the device's slug
(``torch.cuda.get_device_name`` lower-cased, runs of other characters turned into ``-``:
``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3.json``). ``python -m meditron_kernels.tuned`` writes
one from a benchmark results file; scripts/gpu_validate.sh runs it on every GPU machine. A table
looks like::

    {"device": "NVIDIA H100 80GB HBM3", "source": "benchmarks/results/....json",
     "ops": {"rms_norm": {"8192": {"backend": "cuda", "config": null,
                                    "ms": {"triton": 0.061, "cuda": 0.052}, "dtype": "bfloat16"}}}}

The shape bucket of a call is the last dimension of the op's first argument (rms_norm: hidden;
swiglu, geglu, xielu: ffn; swiglu_packed, geglu_packed: 2 x ffn; apply_rotary and flash_attention:
head_dim; cross_entropy: vocab; fused_linear_cross_entropy: dim), rounded up to a power of two. An op, bucket or device
without a measurement keeps the default: Triton with its own tile tables.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

TABLE_DIR = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("triton", "cuda")
_tables: dict[str, dict | None] = {}      # slug -> table (None: no table for that device)
_device_slugs: dict[int, str] = {}        # CUDA device index -> slug

# How each op's benchmark dims give the size its bucket is keyed by (see the module docstring).
SIZE_FROM_DIMS = {
    "rms_norm": lambda d: d["hidden"],
    "swiglu": lambda d: d["ffn"],
    "swiglu_packed": lambda d: 2 * d["ffn"],
    "geglu": lambda d: d["ffn"],
    "geglu_packed": lambda d: 2 * d["ffn"],
    "xielu": lambda d: d["ffn"],
    "apply_rotary": lambda d: d["head_dim"],
    "flash_attention": lambda d: d["head_dim"],
    "cross_entropy": lambda d: d["vocab"],
    "fused_linear_cross_entropy": lambda d: d["dim"],
}


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def bucket(size: int) -> str:
    """The bucket key of a size: the smallest power of two >= size, as a string (JSON keys)."""
    return str(1 << max(int(size) - 1, 0).bit_length())


def table_path(slug: str, directory: str | None = None) -> str:
    return os.path.join(directory or TABLE_DIR, f"{slug}.json")


def load(slug: str) -> dict | None:
    """The table for the device ``slug``, or None when this folder has none (cached per process)."""
    if slug not in _tables:
        path = table_path(slug)
        table = None
        if os.path.exists(path):
            with open(path) as f:
                table = json.load(f)
            _check_table(table, path)
        _tables[slug] = table
    return _tables[slug]


def _check_table(table: Any, path: str) -> None:
    if not isinstance(table, dict) or not isinstance(table.get("ops"), dict):
        raise ValueError(f"{path}: a tuned table needs an 'ops' mapping")
    for op, buckets in table["ops"].items():
        for key, entry in buckets.items():
            if not key.isdigit() or entry.get("backend") not in BACKENDS:
                raise ValueError(f"{path}: {op}[{key!r}] needs a power-of-two key and a backend in {BACKENDS}")


def clear_cache() -> None:
    _tables.clear()
    _device_slugs.clear()


def slug_of(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_slugs:
        _device_slugs[index] = device_slug(torch.cuda.get_device_name(index))
    return _device_slugs[index]


def entry(op: str, slug: str, size: int | None) -> dict | None:
    """The measured choice for ``op`` on device ``slug`` at ``size`` (None: the largest measured
    bucket), or None when there is none."""
    table = load(slug)
    buckets = (table or {}).get("ops", {}).get(op)
    if not buckets:
        return None
    key = bucket(size) if size is not None else max(buckets, key=int)
    return buckets.get(key)


def choose(op: str, slug: str, size: int | None = None) -> str:
    """'cuda' or 'triton': the measured fastest for ``op`` at ``size`` on device ``slug``; 'triton'
    where nothing was measured."""
    e = entry(op, slug, size)
    return e["backend"] if e else "triton"


def config(op: str, slug: str, size: int | None = None) -> dict | None:
    """The fastest tile configuration measured for ``op`` at ``size`` (None: the op's own defaults)."""
    e = entry(op, slug, size)
    return e.get("config") if e else None


def has_choices(op: str, slug: str) -> bool:
    """Whether the table of ``slug`` names a backend other than Triton for ``op`` anywhere."""
    table = load(slug)
    return any(e["backend"] != "triton" for e in (table or {}).get("ops", {}).get(op, {}).values())


# ---------------------------------------------------------------------------- building a table
def build(rows: list[dict], device_name: str, source: str = "") -> dict:
    """A table from benchmark result rows (benchmarks/results/*.json "rows").

    For each op and bucket, the time of a provider is the sum of its forward and backward medians
    over the bucket's cases and dtypes; only providers that ran every one of those, with their
    outputs checked, compete. Providers are "triton" and "cuda", or "triton[<config>]" /
    "cuda[<config>]" for a named tile configuration (recorded as the entry's "config").
    """
    times: dict[tuple[str, str], dict[str, dict[tuple, float]]] = {}
    dtypes: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("direction") not in ("forward", "backward"):
            continue
        check = str(r.get("check", "ok"))
        if check != "ok" and not check.startswith("not checked"):  # a wrong answer never wins
            continue
        base = r["provider"].split("[", 1)[0]
        if base not in BACKENDS or r["op"] not in SIZE_FROM_DIMS:
            continue
        key = (r["op"], bucket(SIZE_FROM_DIMS[r["op"]](r["dims"])))
        case = (r["shape"], r["dtype"], r["direction"])
        times.setdefault(key, {}).setdefault(r["provider"], {})[case] = float(r["ms"])
        dtypes.setdefault(key, set()).add(r["dtype"])
    ops: dict[str, dict[str, dict]] = {}
    for (op, key), per_provider in sorted(times.items()):
        cases = set().union(*per_provider.values())
        complete = {p: sum(t.values()) for p, t in per_provider.items() if set(t) == cases}
        if not complete:
            continue
        best = min(complete, key=complete.get)
        name, _, cfg = best.partition("[")
        ops.setdefault(op, {})[key] = dict(
            backend=name, config=_parse_config(cfg.rstrip("]")) if cfg else None,
            ms={p: round(t, 5) for p, t in sorted(complete.items())}, dtype=",".join(sorted(dtypes[(op, key)])))
    return dict(device=device_name, source=source, ops=ops)


def _parse_config(text: str) -> dict:
    """'BLOCK_M=64,num_warps=4' -> {'BLOCK_M': 64, 'num_warps': 4}."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    return out


def write(table: dict, directory: str | None = None) -> str:
    """Write ``table`` as this device's table; returns the path."""
    path = table_path(device_slug(table["device"]), directory)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    _tables.pop(device_slug(table["device"]), None)
    return path
