"""What every kernel benchmark shares: the case and provider descriptions, the device facts and
measured ceilings, timing, memory, the accuracy check and the floors.

A benchmark is a list of :class:`Case` (one op at one shape and dtype). A case knows how to make
one random input set, what the op must move and compute at least in each direction (its
:class:`Cost`), and which :class:`Provider` implementations to compare. :func:`run_case` times
every provider on the same inputs in the same process, so the numbers are side by side.

How the numbers are made (docs/design.md, "Benchmark method"):

- Ceilings are measured, not taken from a data sheet: a device-to-device copy gives the
  bandwidth, a bf16 8192^3 GEMM the matrix peak. A row's floor is bytes / bandwidth or
  FLOPs / GEMM peak, whichever is larger, and the row reports achieved throughput as a
  percentage of that floor (100% = at the measured ceiling).
- ``triton.testing.do_bench`` gives the median of many timed calls; it flushes L2 before each.
  On top of that the calls rotate among several input sets whose total exceeds L2, so no call
  starts with its operands cached. Inputs are random normals (never zeros: some kernels skip
  work on zeros and a GPU draws less power on them), generated before timing starts.
- Backward is timed as ``torch.autograd.grad`` over a retained graph, so no ``.grad``
  accumulation is timed; "both" times a forward and that backward together.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import torch

DIRECTIONS = ("forward", "backward", "both")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Figures measured on the parts we target, for comparison with this run's own measurements
# (docs/design.md, "Measured ceilings"). Floors always use this run's measurements.
REFERENCE_CEILINGS = {"H100": dict(copy_gbps=3000.0, gemm_tflops=798.0),
                      "H200": dict(copy_gbps=4300.0, gemm_tflops=790.0)}


# ---------------------------------------------------------------------------- descriptions
@dataclasses.dataclass
class Cost:
    """The least one call must do: bytes to and from memory, and FLOPs. None where not the point."""
    bytes: float | None = None
    flops: float | None = None


@dataclasses.dataclass
class Provider:
    """One implementation of a case's op.

    ``fn(inputs)`` takes an input set (the dict a case's ``make`` returns) and returns a tensor
    or a tuple of tensors in the case's common layout. ``why_not(device)`` returns None when the
    provider can run on ``device``, else the reason it is skipped. ``timed_on_cpu``: whether a
    CPU timing of it means anything (the Triton interpreter's does not).
    """
    name: str
    fn: Callable[[dict], Any]
    why_not: Callable[[torch.device], str | None] = lambda device: None
    note: str = ""
    timed_on_cpu: bool = True
    compiled: bool = False


@dataclasses.dataclass
class Case:
    """One op at one shape and dtype.

    ``make(device, dtype, gen)`` returns one input set: a dict of tensors (those that get
    gradients have requires_grad) and plain values. ``cost(direction)`` is the bytes/FLOPs
    model. ``reference(inputs)`` is the torch eager function, used for the accuracy check in
    high precision. ``check_bytes``: rough memory the high-precision check needs (it is skipped
    when that does not fit comfortably).
    """
    op: str
    shape: str
    dims: dict[str, int]
    dtype: torch.dtype
    make: Callable[[torch.device, torch.dtype, torch.Generator], dict]
    cost: Callable[[str], Cost]
    reference: Callable[[dict], Any]
    providers: list[Provider]
    directions: tuple[str, ...] = DIRECTIONS
    check_bytes: float = 0.0
    note: str = ""

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype))


# ---------------------------------------------------------------------------- inputs
def randn(shape, dtype, device, gen, scale: float = 1.0, shift: float = 0.0, grad: bool = False) -> torch.Tensor:
    """Standard normal * scale + shift, drawn in float32 from ``gen`` and rounded once to ``dtype``."""
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    if shift:
        t.add_(shift)
    return t.to(dtype).requires_grad_(grad)


def randint(high: int, shape, device, gen) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=gen, device=device, dtype=torch.int64)


def set_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def n_input_sets(one_set_bytes: int, l2_bytes: int | None, device: torch.device) -> int:
    """How many input sets to rotate among: together at least 3x L2, between 2 and 16."""
    if device.type != "cuda" or not l2_bytes:
        return 2
    return max(2, min(16, math.ceil(3 * l2_bytes / max(one_set_bytes, 1))))


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def grad_leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def differentiable(outs: Sequence) -> list[torch.Tensor]:
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


# ---------------------------------------------------------------------------- device facts
def resolve_device(name: str | None) -> torch.device:
    """``name``, or the GPU when there is one; a CUDA device always with its index."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version, cuda_runtime=torch.version.cuda,
                python=platform.python_version())


def environment(device: torch.device, measure: bool = True) -> dict[str, Any]:
    """Device name, versions and (on a GPU, with ``measure``) the measured copy bandwidth and GEMM peak."""
    env: dict[str, Any] = dict(date=datetime.date.today().isoformat(), device_type=device.type, **_versions())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1),
                   l2_bytes=getattr(props, "L2_cache_size", None), driver=_driver_version())
        if measure:
            env["copy_gbps"] = measure_copy_bandwidth(device)
            env["gemm_tflops"] = measure_gemm_tflops(device)
            env["ceilings_note"] = "measured by this run: 1 GiB device copy (read + write), bf16 8192^3 torch.mm"
            for key, ref in REFERENCE_CEILINGS.items():
                if key in props.name:
                    env["reference_ceilings"] = ref
    else:
        env.update(device_name=f"CPU {_cpu_model()}", cpu_count=os.cpu_count(), driver=None, copy_gbps=None,
                   gemm_tflops=None)
    env["device_slug"] = device_slug(env["device_name"])
    return env


def measure_copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy of ``n_bytes`` (counted twice: one read, one write)."""
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rep_ms=200, warmup_ms=200)  # long warm-up: clocks ramp up
    del src, dst
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def measure_gemm_tflops(device: torch.device, n: int = 8192) -> float:
    """TFLOP/s of a bf16 n x n x n matmul (dense, fp32 accumulation), the matrix ceiling."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.mm(a, b, out=c), device, rep_ms=300, warmup_ms=300)
    del a, b, c
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------- timing and memory
def time_ms(fn: Callable[[], Any], device: torch.device, rep_ms: int = 100, warmup_ms: int = 25) -> float:
    """Median milliseconds per call of ``fn``: do_bench on a GPU, wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (first-call costs: allocations, lazy init)
    times, spent = [], 0.0
    while len(times) < 3 or (spent < rep_ms * 1e-3 and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
    return statistics.median(times)


def extra_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory one call allocates beyond what is live before it (outputs, saved tensors and
    workspace), in MB. GPU only: the CPU allocator keeps no such statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 1e6


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU allocator's live bytes above its level at the start, while fn runs: the
    profiler's allocation events (frees are negative sizes) summed in time order. The CPU
    allocator keeps no peak statistic of its own."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(nodes):
        for e in nodes:
            if e.tag == _EventType.Allocation:
                events.append((e.start_time_ns, e.extra_fields.alloc_size))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak


def rss_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak resident memory of this process above its resident memory at the start, while fn runs
    (Linux). The kernel's high-water mark (VmHWM) is reset to the current RSS first: a process
    inherits its parent's ``ru_maxrss`` across fork and exec, so a baseline taken from
    ``getrusage`` in a child of a large process already exceeds anything the child allocates,
    and every peak above it reads 0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS to the current RSS
    except OSError as e:
        raise RuntimeError(f"peak resident memory needs Linux's /proc/self/clear_refs ({e})") from e
    base = _proc_status_bytes("VmRSS")
    fn()
    return max(0, _proc_status_bytes("VmHWM") - base)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    raise RuntimeError(f"/proc/self/status has no {field}")


class Rotation:
    """Calls ``calls[0], calls[1], ...`` in turn: each timed call sees a different input set."""

    def __init__(self, calls: Sequence[Callable[[], Any]]):
        self.calls = list(calls)
        self.i = 0

    def __call__(self):
        call = self.calls[self.i]
        self.i = (self.i + 1) % len(self.calls)
        return call()


# ---------------------------------------------------------------------------- floors
def floor_ms(cost: Cost, env: dict) -> tuple[float | None, str | None]:
    """The larger of the bandwidth and compute floors, and which one binds ('memory'/'compute')."""
    cands = []
    if cost.bytes and env.get("copy_gbps"):
        cands.append((cost.bytes / (env["copy_gbps"] * 1e9) * 1e3, "memory"))
    if cost.flops and env.get("gemm_tflops"):
        cands.append((cost.flops / (env["gemm_tflops"] * 1e12) * 1e3, "compute"))
    return max(cands) if cands else (None, None)


def throughput(cost: Cost, ms: float, bound: str | None) -> tuple[float | None, str | None]:
    """Achieved rate in the binding unit: GB/s for memory-bound rows, TFLOP/s for compute-bound."""
    if bound == "compute" or (bound is None and cost.flops):
        return cost.flops / (ms * 1e-3) / 1e12, "TFLOP/s"
    if cost.bytes:
        return cost.bytes / (ms * 1e-3) / 1e9, "GB/s"
    return None, None


# ---------------------------------------------------------------------------- accuracy check
def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def _high_precision(inputs: dict, dtype: torch.dtype) -> dict:
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().to(hi).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _detached_copy(inputs: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()}


def _forward_backward(fn, inputs: dict, dys: list[torch.Tensor] | None):
    outs = as_tuple(fn(inputs))
    leaves = grad_leaves(inputs)
    diff = differentiable(outs)
    grads = []
    if leaves and diff:
        ds = [d.to(o.dtype) for d, o in zip(dys, diff)] if dys else [torch.ones_like(o) for o in diff]
        grads = list(torch.autograd.grad(diff, leaves, ds, allow_unused=True))
    return [o.detach() for o in outs], [g.detach() if g is not None else None for g in grads]


class Checker:
    """The accuracy rule of docs/design.md applied to a provider on one input set:
    max|out - ref| <= 2 max|out_torch - ref| + atol for outputs, 3x for gradients, where ref is
    the reference in float32 (float64 for float32 inputs) and out_torch the reference in the
    case's dtype. Run once per case, before any timing."""

    def __init__(self, case: Case, inputs: dict, gen: torch.Generator):
        self.case = case
        self.inputs = inputs
        ref_in = _high_precision(inputs, case.dtype)
        probe = as_tuple(case.reference(ref_in))
        self.dys = [randn(o.shape, o.dtype, o.device, gen) for o in differentiable(probe)]
        del probe
        self.ref_out, self.ref_grads = _forward_backward(case.reference, ref_in, self.dys)
        self.torch_out, self.torch_grads = _forward_backward(case.reference, _detached_copy(inputs), self.dys)

    def __call__(self, provider: Provider) -> str:
        out, grads = _forward_backward(provider.fn, _detached_copy(self.inputs), self.dys)
        bad = []
        pairs = [("out", o, t, r, 2.0) for o, t, r in zip(out, self.torch_out, self.ref_out)]
        pairs += [("grad", o, t, r, 3.0) for o, t, r in zip(grads, self.torch_grads, self.ref_grads)]
        for i, (kind, o, t, r, factor) in enumerate(pairs):
            if o is None or r is None:
                continue
            if tuple(o.shape) != tuple(r.shape):
                bad.append(f"{kind}{i} shape {tuple(o.shape)} != {tuple(r.shape)}")
                continue
            if not torch.isfinite(o).all():
                bad.append(f"{kind}{i} not finite")
                continue
            err, base = _max_err(o, r), _max_err(t, r)
            atol = 1e-6 * (1.0 + r.detach().abs().max().item())
            if err > factor * base + atol:
                bad.append(f"{kind}{i} err {err:.2e} > {factor:g} x torch {base:.2e}")
        return "ok" if not bad else "FAIL: " + "; ".join(bad)


# ---------------------------------------------------------------------------- running a case
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


def _direction_call(provider: Provider, inputs: dict, direction: str, gen: torch.Generator):
    """A zero-argument call that does ``direction`` once on ``inputs`` (graph built here, outside timing)."""
    if direction == "forward":
        return lambda: provider.fn(inputs)
    leaves = grad_leaves(inputs)
    probe = as_tuple(provider.fn(inputs))
    diff = differentiable(probe)
    if not leaves or not diff:
        raise RuntimeError("nothing to differentiate")
    dys = [randn(o.shape, o.dtype, o.device, gen) for o in diff]
    if direction == "backward":
        return lambda: torch.autograd.grad(diff, leaves, dys, retain_graph=True)
    del probe, diff

    def both():
        outs = differentiable(as_tuple(provider.fn(inputs)))
        return torch.autograd.grad(outs, leaves, dys)

    return both


def skipped_row(case: Case, provider: str, direction: str, reason: str) -> dict:
    return dict(op=case.op, shape=case.shape, dims=case.dims, dtype=case.dtype_name, direction=direction,
                provider=provider, status="skipped", reason=reason)


def _failed_row(case: Case, provider: str, direction: str, e: BaseException) -> dict:
    """Out of memory is a limit of the device (skipped); anything else is a failure (error)."""
    row = skipped_row(case, provider, direction, "out of memory" if _is_oom(e) else _short(e))
    if not _is_oom(e):
        row["status"] = "error"
    return row


def run_case(case: Case, env: dict, device: torch.device, providers: Sequence[str] | None = None,
             directions: Sequence[str] | None = None, rep_ms: int = 100, check: bool = True,
             seed: int = 0, timed: bool = True) -> list[dict]:
    """Time every selected provider of ``case`` in every selected direction; one row each.

    ``timed=False`` runs each direction once instead (status "ran", no figures), with the
    accuracy check, also for providers whose timing means nothing here: the smoke-test mode that
    exercises a benchmark's whole code path on the CPU, Triton interpreter included."""
    dirs = [d for d in case.directions if directions is None or d in directions]
    provs = [p for p in case.providers if providers is None or p.name in providers]
    if not dirs or not provs:
        return []
    gen = torch.Generator(device=device).manual_seed(seed)
    rows: list[dict] = []
    runnable = []
    for p in provs:
        why = p.why_not(device)
        if why is None and timed and device.type != "cuda" and not p.timed_on_cpu:
            why = "runs in the Triton interpreter on the CPU: its timing means nothing"
        if why is not None:
            rows += [skipped_row(case, p.name, d, why) for d in dirs]
        else:
            runnable.append(p)
    if not runnable:
        return rows
    try:
        first = case.make(device, case.dtype, gen)
        n_sets = n_input_sets(set_bytes(first), env.get("l2_bytes"), device) if timed else 1
        sets = [first] + [case.make(device, case.dtype, gen) for _ in range(n_sets - 1)]
    except Exception as e:  # noqa: BLE001 (a case too large for this device is reported, not fatal)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        reason = "out of memory making the inputs" if _is_oom(e) else _short(e)
        return rows + [skipped_row(case, p.name, d, reason) for p in runnable for d in dirs]

    checker, check_note = None, "not checked"
    if check:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        if free is not None and case.check_bytes > 0.5 * free:
            check_note = f"not checked: the float32 reference needs ~{case.check_bytes / 1e9:.0f} GB"
        else:
            try:
                checker = Checker(case, sets[0], gen)
            except Exception as e:  # noqa: BLE001
                check_note = f"not checked: reference failed ({'out of memory' if _is_oom(e) else _short(e)})"
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for p in runnable:
        if p.compiled:
            from torch import _dynamo

            _dynamo.reset()
        verdict = check_note
        if checker is not None:
            try:
                verdict = checker(p)
            except Exception as e:  # noqa: BLE001
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows += [_failed_row(case, p.name, d, e) for d in dirs]
                continue
        for d in dirs:
            row = skipped_row(case, p.name, d, "")
            try:
                calls = [_direction_call(p, s, d, gen) for s in sets]
                if not timed:
                    calls[0]()
                    row.update(status="ran", reason="", check=verdict, note=p.note)
                    rows.append(row)
                    continue
                mem = extra_memory_mb(calls[0], device)
                ms = time_ms(Rotation(calls), device, rep_ms=rep_ms)
                del calls
            except Exception as e:  # noqa: BLE001 (one provider failing must not end the run)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(_failed_row(case, p.name, d, e))
                continue
            cost = case.cost(d)
            fl, bound = floor_ms(cost, env)
            rate, unit = throughput(cost, ms, bound)
            row.update(status="ok", reason="", ms=ms, bytes=cost.bytes, flops=cost.flops, bound=bound,
                       floor_ms=fl, rate=rate, unit=unit, pct_floor=(100.0 * fl / ms) if fl else None,
                       extra_mem_mb=mem, check=verdict, note=p.note, n_input_sets=len(sets))
            rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del sets, checker
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _speedups(rows)
    return rows


def _speedups(rows: list[dict]) -> None:
    eager = {r["direction"]: r["ms"] for r in rows if r["provider"] == "torch" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok":
            base = eager.get(r["direction"])
            r["speedup_vs_eager"] = base / r["ms"] if base else None


# ---------------------------------------------------------------------------- results files
_KEY_FIELDS = ("op", "shape", "dtype", "direction", "provider", "config", "preset", "layers", "batch", "seq", "precision")


def _key(r: dict) -> tuple:
    return tuple(str(r.get(k)) for k in _KEY_FIELDS)


def default_json_path(env: dict, suffix: str = "") -> str:
    return os.path.join(RESULTS_DIR, f"{env['device_slug']}-{env['date']}{suffix}.json")


def write_json(path: str, env: dict, rows: list[dict], kind: str = "kernels") -> str:
    """Write (or merge into: same-key rows replaced) the results file at ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old_rows = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
            if old.get("kind") == kind and old.get("env", {}).get("device_name") == env.get("device_name"):
                old_rows = old.get("rows", [])
        except (OSError, ValueError, AttributeError):
            old_rows = []
    new_keys = {_key(r) for r in rows}
    merged = [r for r in old_rows if _key(r) not in new_keys] + rows
    doc = dict(kind=kind, written=datetime.datetime.now().isoformat(timespec="seconds"), env=env, rows=merged)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)
    return path
