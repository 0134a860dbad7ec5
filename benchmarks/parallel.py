"""python -m benchmarks.parallel: the loss under tensor parallelism, and the step time of the
tiny parallel layouts, on gloo (CPU).

    python -m benchmarks.parallel memory                  # peak memory of the loss step per rank
    python -m benchmarks.parallel memory --vocab 32000 --tp 1,2 --micro-batch 1
    python -m benchmarks.parallel steps --layouts tp2,pp2 # seconds per step of `python -m train`
    python -m benchmarks.parallel steps --json old.json   # (run in two checkouts to compare them)

``memory``: one loss step (forward and backward) over hidden states (micro_batch, seq, dim)
and a head split over the vocabulary across ``tp`` gloo ranks, two ways:

- ``fused``: meditron_kernels.fused_linear_cross_entropy(..., process_group=tp group), the
  vocabulary-parallel fused loss the trainer runs: chunks of tokens against this rank's
  vocabulary slice, 3 floats per token exchanged; no logits tensor beyond one chunk.
- ``logits``: what the trainer did before, the head's local logits (micro_batch, seq,
  vocab / tp) and torch's ``loss_parallel`` cross-entropy on them as a vocab-sharded DTensor
  (at tp 1, plain F.cross_entropy on the logits).

Peak memory is the CPU allocator's live bytes above the level before the step (the torch
profiler's allocation events), the largest over the ranks; the inputs, head slice and their
gradients' storage count only when allocated inside the step. Both paths run in float32 (the
CPU backend is the PyTorch reference of the op). Configurations whose logits alone would exceed
``--max-logits-gb`` on a rank are not run for the ``logits`` path and are reported as such.

``steps``: launches ``torchrun -m train`` for each tiny layout (the test configuration of
tests/train/test_parallel.py) and reports the median wall seconds of the steps after the
first, from metrics.jsonl's tokens_per_s. Compare two checkouts by running it in each.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- memory
def _peak_bytes(fn) -> int:
    """Peak of the CPU allocator's live bytes above its level at the start, while fn runs."""
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
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _memory_worker(rank, world, port, configs, seq, dim, out_dir):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    import meditron_kernels as mk

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    group = dist.group.WORLD if world > 1 else None

    def make(vocab, mb, n, path):
        torch.manual_seed(0)
        h = torch.randn(mb, n, dim, requires_grad=True)
        w = (torch.randn(vocab // world, dim) / dim ** 0.5).requires_grad_()
        t = torch.randint(0, vocab, (mb, n))

        def step():
            if path == "fused":
                loss = mk.fused_linear_cross_entropy(h, w, t, process_group=group, backend="torch")
                loss.backward()
                return
            logits = h @ w.t()  # (mb, n, vocab / tp)
            if world == 1:
                F.cross_entropy(logits.flatten(0, 1), t.flatten(0, 1)).backward()
                return
            with loss_parallel():
                dt = DTensor.from_local(logits, mesh, (Shard(2),), run_check=False)
                F.cross_entropy(dt.flatten(0, 1), t.flatten(0, 1)).backward()

        return step

    # warm-up at a small size: first-call allocations (gloo buffers, profiler) are not the step's
    for path in ("fused", "logits"):
        make(512 * world, 1, 128, path)()
    rows = []
    for vocab, mb, path in configs:
        peak = _peak_bytes(make(vocab, mb, seq, path))
        rows.append(peak)
        if rank == 0:
            print(f"tp {world} vocab {vocab} micro batch {mb} {path}: rank 0 peak {peak / 2**20:.0f} MiB", flush=True)
    torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(args) -> list[dict]:
    import torch.multiprocessing as mp

    results = []
    for tp in args.tp:
        configs, skipped = [], []
        for vocab in args.vocab:
            for mb in args.micro_batch:
                configs.append((vocab, mb, "fused"))
                logits_gb = mb * args.seq * vocab / tp * 4 / 1e9
                if logits_gb <= args.max_logits_gb:
                    configs.append((vocab, mb, "logits"))
                else:
                    skipped.append((vocab, mb, logits_gb))
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_memory_worker, args=(tp, _free_port(), configs, args.seq, args.dim, tmp), nprocs=tp)
            per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(tp)]
        for i, (vocab, mb, path) in enumerate(configs):
            peak = max(r[i] for r in per_rank)
            results.append(dict(tp=tp, vocab=vocab, micro_batch=mb, path=path, peak_mb=peak / 2**20))
        for vocab, mb, gb in skipped:
            results.append(dict(tp=tp, vocab=vocab, micro_batch=mb, path="logits", peak_mb=None,
                                note=f"not run: logits alone {gb:.1f} GB > --max-logits-gb"))
    return results


def print_memory(results, seq, dim) -> None:
    print(f"loss step peak memory per rank, MiB (seq {seq}, dim {dim}, float32, gloo on the CPU)")
    print(f"{'vocab':>7} {'mb':>3} {'tp':>3} {'fused':>10} {'logits':>10} {'ratio':>7}")
    keyed = {(r["vocab"], r["micro_batch"], r["tp"], r["path"]): r["peak_mb"] for r in results}
    for vocab, mb, tp in sorted({(r["vocab"], r["micro_batch"], r["tp"]) for r in results}):
        f, u = keyed.get((vocab, mb, tp, "fused")), keyed.get((vocab, mb, tp, "logits"))
        ratio = f"{f / u:.3f}" if f and u else "-"
        u_s = f"{u:10.0f}" if u else f"{'not run':>10}"
        print(f"{vocab:>7} {mb:>3} {tp:>3} {f:10.0f} {u_s} {ratio:>7}")


# ---------------------------------------------------------------------------- steps
LAYOUTS = {
    "tp2": (2, ["--parallel.tp=2"]),
    "pp2": (2, ["--parallel.pp=2"]),
    "dp2-fsdp": (2, ["--parallel.fsdp=true"]),
    "tp2pp2": (4, ["--parallel.tp=2", "--parallel.pp=2"]),
}
BASE = ["--training.seq_len=32", "--training.micro_batch=1", "--training.global_batch=4", "--training.warmup_steps=1",
        "--metrics.log_interval=1", "--eval.interval=0", "--checkpoint.interval=0", "--steps", "8"]


def steps(args) -> list[dict]:
    results = []
    for name in args.layouts:
        nproc, extra = LAYOUTS[name]
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "train", *BASE, *extra, "--out-dir", out]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            proc = subprocess.run(cmd, cwd=args.repo, capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            with open(os.path.join(out, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
        tokens = 4 * 32
        secs = [tokens / r["tokens_per_s"] for r in rows[1:]]
        results.append(dict(layout=name, seconds_per_step=statistics.median(secs)))
        print(f"{name:>10}: {statistics.median(secs):.3f} s/step (median of {len(secs)})", flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.parallel", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--seq", type=int, default=4096)
    m.add_argument("--dim", type=int, default=64, help="hidden size (the logits do not depend on it; keeps CPU time low)")
    m.add_argument("--vocab", type=lambda s: [int(v) for v in s.split(",")], default=[32000, 128256])
    m.add_argument("--micro-batch", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    m.add_argument("--tp", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
    m.add_argument("--max-logits-gb", type=float, default=2.5)
    m.add_argument("--json")
    s = sub.add_parser("steps")
    s.add_argument("--layouts", type=lambda v: v.split(","), default=list(LAYOUTS))
    s.add_argument("--repo", default=ROOT, help="checkout to run (default: this one)")
    s.add_argument("--json")
    args = ap.parse_args(argv)
    if args.what == "memory":
        results = memory(args)
        print_memory(results, args.seq, args.dim)
    else:
        results = steps(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(what=args.what, device="cpu (gloo)", results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
