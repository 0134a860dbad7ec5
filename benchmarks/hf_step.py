"""python -m benchmarks.hf_step: a Hugging Face transformers training step, patched against unpatched.

    python -m benchmarks.hf_step                      # GPU: Llama-2-7B layer shape, 2 layers, seq 4096, bf16
    python -m benchmarks.hf_step --layers 4 --batch 2 --configs hf-sdpa,meditron
    python -m benchmarks.hf_step --loss-memory        # the loss alone: peak memory, fused vs unfused (CPU default)

Configurations, on the same weights (a transformers.LlamaForCausalLM built from a config with the
Llama-2-7B layer shape: hidden 4096, 32 heads, MLP 11008, vocab 32000), one at a time:

- ``hf-sdpa``: the model as transformers builds it (attn_implementation="sdpa"), its loss over
  materialised logits upcast to float32;
- ``meditron``: the same model after ``meditron_kernels.transformers.apply`` (every op fused, the
  loss through the fused linear cross-entropy, no logits);
- ``liger``: Liger-Kernel's ``_apply_liger_kernel_to_instance``, when liger-kernel is installed.

Each step is forward + backward + AdamW in bf16; reported: wall time per step (mean of the timed
steps after warm-up), tokens/s, the ratio to hf-sdpa, and peak memory (torch.cuda.max_memory_allocated).

On the CPU it measures what a CPU measures meaningfully: the loss's peak memory at seq 4096 for
vocab 32000 (Llama 2) and 128256 (Llama 3), fused against transformers' unfused loss, forward and
backward, each in a fresh process (peak resident memory above the process's baseline). The hidden
size is small there (the logits, seq x vocab, are what the loss's memory is made of).
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch

CONFIGS = ("hf-sdpa", "meditron", "liger")


def _llama(layers: int, vocab: int, hidden: int, inter: int, heads: int, dtype, device):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                   max_position_embeddings=4096, use_cache=False)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model


def _prepare(name: str, base, device="cpu"):
    model = copy.deepcopy(base).to(device)
    if name == "meditron":
        import meditron_kernels.transformers as mkt

        mkt.apply(model)
    elif name == "liger":
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError as e:
            raise RuntimeError(f"liger-kernel is not installed ({e})") from e
        _apply_liger_kernel_to_instance(model=model)
    return model


def run_gpu(args) -> list[dict]:
    device = torch.device("cuda")
    torch.manual_seed(args.seed)
    # Built once on the CPU: each configuration gets its own copy on the GPU, so peak memory is its own.
    base = _llama(args.layers, 32000, 4096, 11008, 32, torch.bfloat16, "cpu")
    ids = torch.randint(0, 32000, (args.batch, args.seq), device=device)
    rows = []
    for name in args.configs:
        try:
            model = _prepare(name, base, device)
        except RuntimeError as e:
            rows.append(dict(config=name, status=f"skipped: {e}"))
            continue
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        torch.cuda.reset_peak_memory_stats()  # weights and inputs count; the unpatched logits show up here
        times = []
        for step in range(args.warmup + args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        sec = sum(times) / len(times)
        rows.append(dict(config=name, status="ok", loss=float(loss), step_s=sec,
                         tokens_per_s=args.batch * args.seq / sec,
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30))
        del model, opt
        torch.cuda.empty_cache()
    ref = next((r for r in rows if r["config"] == "hf-sdpa" and r["status"] == "ok"), None)
    for r in rows:
        if ref is not None and r["status"] == "ok":
            r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["memory_ratio"] = r["peak_gib"] / ref["peak_gib"]
    return rows


# ---------------------------------------------------------------------------- the loss alone (CPU)
def _loss_child(kind: str, vocab: int, seq: int, hidden: int) -> dict:
    """In a fresh process: peak resident memory of one forward + backward of the loss, above the
    memory its inputs and the process already hold."""
    from benchmarks.common import rss_peak_bytes

    torch.manual_seed(0)
    h = torch.randn(1, seq, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, seq))
    if kind == "fused":
        import meditron_kernels as mk
    else:
        from transformers.loss.loss_utils import ForCausalLMLoss
    out = {}

    def step():
        if kind == "fused":
            target = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
            loss = mk.fused_linear_cross_entropy(h, w, target, -100, backend="torch")
        else:
            loss = ForCausalLMLoss(h @ w.t(), labels, vocab)
        loss.backward()
        out["loss"] = loss.item()

    t0 = time.perf_counter()
    peak = rss_peak_bytes(step)
    return dict(loss=out["loss"], peak_mib=peak / 2**20, seconds=time.perf_counter() - t0)


def run_loss_memory(args) -> list[dict]:
    rows = []
    for vocab in args.vocabs:
        for kind in ("unfused", "fused"):
            code = ("import json, sys; from benchmarks.hf_step import _loss_child; "
                    f"print(json.dumps(_loss_child({kind!r}, {vocab}, {args.seq}, {args.hidden})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                rows.append(dict(vocab=vocab, loss_impl=kind, status="error: " + out.stderr.strip()[-300:]))
                continue
            rows.append(dict(vocab=vocab, loss_impl=kind, status="ok", **json.loads(out.stdout.strip().splitlines()[-1])))
        pair = [r for r in rows[-2:] if r["status"] == "ok"]
        if len(pair) == 2 and pair[0]["peak_mib"] > 0:  # (a tiny run may fit in pages the process already had)
            pair[1]["fraction_of_unfused"] = pair[1]["peak_mib"] / pair[0]["peak_mib"]
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.hf_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers at the Llama-2-7B layer shape (GPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the loss-memory measurement (CPU)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--loss-memory", action="store_true", help="measure the loss alone (the default on the CPU)")
    p.add_argument("--vocabs", default="32000,128256", help="vocabulary sizes of the loss measurement")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)}; choose from {', '.join(CONFIGS)}")
    try:
        args.vocabs = [int(v) for v in args.vocabs.split(",")]
    except ValueError:
        p.error(f"--vocabs: comma-separated ints, got {args.vocabs!r}")
    for name in ("layers", "batch", "seq", "hidden", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = [[f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(f[i]) for f in fmt)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(f, widths)) for f in fmt]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("benchmarks.hf_step needs transformers (pip install transformers)")
        return 2
    if torch.cuda.is_available() and not args.loss_memory:
        print(f"Hugging Face training step on {torch.cuda.get_device_name()}: LlamaForCausalLM, {args.layers} "
              f"Llama-2-7B layers, batch {args.batch} x seq {args.seq}, bf16, AdamW")
        rows = run_gpu(args)
    else:
        print(f"The causal-LM loss alone on the CPU: seq {args.seq}, hidden {args.hidden}, float32, forward + "
              "backward; peak resident memory above the inputs, fresh process per row")
        rows = run_loss_memory(args)
    print(_table(rows))
    return 1 if any(str(r["status"]).startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
