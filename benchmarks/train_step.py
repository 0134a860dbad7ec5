"""python -m benchmarks.train_step: one full training step (forward, backward, AdamW) of a
Llama-2-7B-shaped model, under several implementations of the same model and parameters.

    python -m benchmarks.train_step                       # GPU: llama2-7b shape, as many layers as fit, seq 4096
    python -m benchmarks.train_step --layers 8 --batch 2 --configs ours,eager-sdpa
    python -m benchmarks.train_step --json                # benchmarks/results/<device>-<date>-train-step.json

Configurations (all on the same freshly initialised weights, one at a time):

- ``ours``: model.Llama as it is, every op through meditron_kernels (backend auto: Triton on a
  GPU, or ``--backend``), the loss through the fused linear cross-entropy.
- ``ours-compile``: the same with each transformer block under torch.compile(fullgraph=True)
  (train/parallelize.apply_compile), our ops staying opaque custom ops inside the graphs.
- ``eager-sdpa``: a plain-PyTorch forward over the same parameters, written in this file: the
  reference RMSNorm, rotary and SwiGLU (meditron_kernels.reference), F.scaled_dot_product_attention
  (causal; its own backend choice, FlashAttention-2 on an A100/H100), and the logits materialised and
  upcast for F.cross_entropy, as transformers' LlamaForCausalLM does.
- ``compile``: that eager-sdpa forward with each block and the head under torch.compile, the way
  torchtitan compiles its model.

Precision: ``bf16`` (default on a GPU) keeps parameters, gradients and AdamW states in bf16;
``autocast`` keeps fp32 parameters and runs matmuls under torch.autocast(bf16), as
``python -m train`` does in one process; ``fp32`` (default on the CPU) is plain float32.

Reported per configuration: median-free wall time per step over the timed steps (after warm-up
steps that include compilation), tokens/s, achieved TFLOP/s and MFU under the primary formula
(LlamaConfig.flops_per_token: 6 N_non_embedding + 12 L d s per token) and under the Meditron
paper's (6 N_total per token), against the dense bf16 peak of the part (989 TFLOP/s on an H100),
and peak memory. With fewer layers than the real model the head's share of the FLOPs is larger
than in the full model; both formulas count it, so MFU stays comparable across configurations.

Without a GPU it runs a tiny model for a few steps, so CI exercises every configuration's code.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import meditron_kernels as mk
from meditron_kernels import reference
from model import Llama, LlamaConfig, PRESETS

CONFIGS = ("ours", "ours-compile", "eager-sdpa", "compile")
DEFAULT_CONFIGS = ("ours", "eager-sdpa", "compile")
MODEL_OPS = ("rms_norm", "swiglu", "flash_attention", "fused_linear_cross_entropy")


class Skip(Exception):
    """A configuration that cannot run here; the message says why."""


# ---------------------------------------------------------------------------- the eager + SDPA model
class SdpaBlock(nn.Module):
    """A model.TransformerBlock's parameters driven by plain PyTorch ops and SDPA."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, h, cos, sin):
        # h (batch, seq, dim); cos, sin (seq, head_dim // 2) float32
        blk = self.block
        att, ff = blk.attention, blk.feed_forward
        b, s, _ = h.shape
        x = reference.rms_norm(h, blk.attention_norm.weight, blk.attention_norm.eps)
        q = att.wq(x).view(b, s, -1, att.head_dim)
        k = att.wk(x).view(b, s, -1, att.head_dim)
        v = att.wv(x).view(b, s, -1, att.head_dim)
        q, k = reference.apply_rotary(q, k, cos, sin)
        gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, **gqa)
        h = h + att.wo(o.transpose(1, 2).reshape(b, s, -1))
        y = reference.rms_norm(h, blk.ffn_norm.weight, blk.ffn_norm.eps)
        return h + ff.w2(F.silu(ff.w1(y)) * ff.w3(y))


class SdpaHead(nn.Module):
    """Final norm, lm head and cross-entropy on the full float32 logits."""

    def __init__(self, model):
        super().__init__()
        self.norm, self.output = model.norm, model.output

    def forward(self, h, targets):
        h = reference.rms_norm(h, self.norm.weight, self.norm.eps)
        logits = self.output(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def sdpa_loss_fn(model, compile_blocks: bool):
    blocks = [SdpaBlock(b) for b in model.layers.values()]
    head = SdpaHead(model)
    if compile_blocks:
        blocks = [torch.compile(b, fullgraph=True) for b in blocks]
        head = torch.compile(head, fullgraph=True)

    def loss(tokens, targets):
        s = tokens.shape[1]
        h = model.tok_embeddings(tokens)
        cos, sin = model.rope_cos[:s], model.rope_sin[:s]
        for blk in blocks:
            h = blk(h, cos, sin)
        return head(h, targets)

    return loss


# ---------------------------------------------------------------------------- configurations
def model_backends(backend: str | None, device: torch.device) -> dict[str, str]:
    """The backend each op of the model resolves to; Skip when one cannot run here."""
    from meditron_kernels import backend as B

    out, missing = {}, []
    for op in MODEL_OPS:
        name, why = B.choose(op, device, backend)
        if why:
            missing.append(why)
        out[op] = name
    if missing:
        raise Skip("; ".join(missing))
    return out


def build_model(cfg: LlamaConfig, device: torch.device, precision: str, seed: int) -> Llama:
    """On the meta device first, so no full-size float32 copy is ever made for a bf16 model."""
    with torch.device("meta"):
        model = Llama(cfg)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model = model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def make_loss(name: str, model: Llama, backend: str | None, device: torch.device):
    """-> (loss_fn(tokens, targets), backends used, context manager for each step)."""
    if name in ("ours", "ours-compile"):
        backends = model_backends(backend, device)
        if name == "ours-compile":
            from train.parallelize import apply_compile

            apply_compile(model)
        return model.loss, backends, (lambda: mk.use_backend(backend))
    if name in ("eager-sdpa", "compile"):
        backends = {"rms_norm": "torch", "swiglu": "torch", "flash_attention": "sdpa",
                    "fused_linear_cross_entropy": "logits + F.cross_entropy"}
        return sdpa_loss_fn(model, compile_blocks=name == "compile"), backends, contextlib.nullcontext
    raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_config(name: str, cfg: LlamaConfig, args, device: torch.device, steps: int, warmup: int) -> dict:
    """Warm up, then time ``steps`` training steps of one configuration. Everything it allocated is
    released before it returns (the next configuration gets the whole device)."""
    row = dict(config=name, preset=args.preset, layers=cfg.n_layers, batch=args.batch, seq=args.seq,
               precision=args.precision)
    try:
        row.update(_measure(name, cfg, args, device, steps, warmup, row))
    except Skip as e:
        row.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001 (one configuration failing must not end the run)
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.update(status="skipped" if oom else "error",
                   reason=f"out of memory at {cfg.n_layers} layers" if oom else f"{type(e).__name__}: {msg}"[:300])
    if name in ("compile", "ours-compile"):
        from torch import _dynamo

        _dynamo.reset()  # compiled graphs hold on to the parameters they were traced with
    _free(device)
    return row


def _measure(name: str, cfg: LlamaConfig, args, device: torch.device, steps: int, warmup: int, row: dict) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg, device, args.precision, args.seed)
    loss_fn, backends, step_ctx = make_loss(name, model, args.backend, device)
    row["backends"] = backends
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    # Several pre-drawn batches: no RNG and no copies in the timed steps.
    batches = []
    for _ in range(4):
        seq = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen, device=device)
        batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "autocast"
                else contextlib.nullcontext)

    def step(i):
        tokens, targets = batches[i % len(batches)]
        with step_ctx(), autocast():
            loss = loss_fn(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    out = {}
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    out["warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        last = step(i)
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    out["loss"] = float(last)
    out.update(_throughput(cfg, args, device, dt))
    out["status"] = "ok" if math.isfinite(out["loss"]) else "error"
    if out["status"] == "error":
        out["reason"] = f"non-finite loss {out['loss']}"
    return out


def _throughput(cfg: LlamaConfig, args, device: torch.device, step_s: float) -> dict:
    from train.metrics import device_peak_flops

    tokens = args.batch * args.seq
    tps = tokens / step_s
    fpt = cfg.flops_per_token(args.seq)
    fpt_paper = 6 * cfg.num_params(include_embedding=True)
    peak = device_peak_flops(device)
    out = dict(step_ms=step_s * 1e3, tokens_per_s=tps, tflops=fpt * tps / 1e12, tflops_paper=fpt_paper * tps / 1e12,
               flops_per_token=fpt, flops_per_token_paper=fpt_paper, peak_tflops=peak / 1e12 if peak else None,
               mfu=fpt * tps / peak if peak else None, mfu_paper=fpt_paper * tps / peak if peak else None,
               peak_mem_gb=(torch.cuda.max_memory_allocated(device) / 1e9) if device.type == "cuda" else None)
    return out


# ---------------------------------------------------------------------------- how many layers fit
def fit_layers(base: LlamaConfig, args, device: torch.device, configs) -> tuple[int, str]:
    """The most layers (up to the preset's) whose training step fits in 85% of free memory.

    Measured, not modelled: one step of each eager configuration at 1 and 2 layers gives the
    fixed cost (embedding, head, logits) and the cost per layer (weights, gradients, AdamW
    states, activations); compiled configurations use no more than their eager counterparts."""
    probes = [c for c in configs if c in ("ours", "eager-sdpa")] or ["eager-sdpa"]
    free = torch.cuda.mem_get_info(device)[0]
    per_layer = fixed = 0.0
    for name in probes:
        peaks = []
        for n in (1, 2):
            cfg = LlamaConfig(**{**_cfg_dict(base), "n_layers": n})
            row = run_config(name, cfg, args, device, steps=1, warmup=1)
            if row["status"] != "ok":
                break
            peaks.append(row["peak_mem_gb"] * 1e9)
        if len(peaks) == 2:
            per_layer = max(per_layer, peaks[1] - peaks[0])
            fixed = max(fixed, 2 * peaks[0] - peaks[1])
    if per_layer <= 0:
        return min(base.n_layers, 2), "probe failed; 2 layers"
    n = int((0.85 * free - fixed) // per_layer)
    n = max(1, min(base.n_layers, n))
    return n, f"{per_layer / 1e9:.2f} GB per layer, {fixed / 1e9:.2f} GB fixed, {free / 1e9:.0f} GB free"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}e9" if n >= 1e8 else f"{n / 1e6:.2f}e6"


def _cfg_dict(cfg: LlamaConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default llama2-7b (tiny on the CPU)")
    p.add_argument("--layers", type=int, default=None, help="default: as many as fit (GPU), the preset's (CPU)")
    p.add_argument("--seq", type=int, default=None, help="default 4096 (128 on the CPU)")
    p.add_argument("--batch", type=int, default=None, help="micro batch, default 1 (2 on the CPU)")
    p.add_argument("--configs", default=None, help=f"comma-separated: {', '.join(CONFIGS)}; default "
                                                   f"{','.join(DEFAULT_CONFIGS)} ({'ours,eager-sdpa'} on the CPU)")
    p.add_argument("--backend", default=None, choices=("triton", "cuda", "torch"),
                   help="backend of the 'ours' configurations (default: auto)")
    p.add_argument("--precision", default=None, choices=("bf16", "autocast", "fp32"),
                   help="default bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 3; 1)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", nargs="?", const="auto", metavar="PATH",
                   help="write results (default benchmarks/results/<device>-<date>-train-step.json)")
    args = p.parse_args(argv)
    from .common import resolve_device

    args.device = resolve_device(args.device)
    gpu = args.device.type == "cuda"
    args.preset = args.preset or ("llama2-7b" if gpu else "tiny")
    args.seq = args.seq or (4096 if gpu else 128)
    args.batch = args.batch or (1 if gpu else 2)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.steps = args.steps or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    configs = args.configs.split(",") if args.configs else list(DEFAULT_CONFIGS if gpu else ("ours", "eager-sdpa"))
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)}; choose from {', '.join(CONFIGS)}")
    args.configs = configs
    for name in ("seq", "batch", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if args.layers is not None and args.layers <= 0:
        p.error("--layers must be positive")
    return args


def format_table(rows: list[dict]) -> str:
    head = (f"{'config':14}{'layers':>7}{'step ms':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'MFU 6N':>8}"
            f"{'vs eager':>9}{'mem GB':>8}{'warmup s':>9}  backends")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['config']:14}{r['layers']:>7}  {r['status']}: {r.get('reason', '')}")
            continue

        def pct(v):
            return f"{100 * v:.1f}%" if v is not None else "-"

        sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "-"
        be = ",".join(sorted(set(r.get("backends", {}).values())))
        lines.append(f"{r['config']:14}{r['layers']:>7}{r['step_ms']:10.1f}{r['tokens_per_s']:11.0f}{r['tflops']:9.1f}"
                     f"{pct(r.get('mfu')):>7}{pct(r.get('mfu_paper')):>8}{sp:>9}{mem:>8}{r['warmup_s']:9.1f}  {be}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    base = LlamaConfig.from_name(args.preset)
    if args.seq > base.max_seq_len:
        base = LlamaConfig(**{**_cfg_dict(base), "max_seq_len": args.seq})
    fit_note = "--layers"
    if args.layers is not None:
        n_layers = args.layers
    elif device.type == "cuda":
        n_layers, fit_note = fit_layers(base, args, device, args.configs)
    else:
        n_layers, fit_note = base.n_layers, "the preset's"
    cfg = LlamaConfig(**{**_cfg_dict(base), "n_layers": n_layers})
    print(f"{args.preset} shape with {n_layers} of {base.n_layers} layers ({fit_note}), seq {args.seq}, "
          f"micro batch {args.batch}, {args.precision}, {_count(cfg.num_params())} parameters; "
          f"{args.warmup} warm-up + {args.steps} timed steps on {device}", flush=True)
    save = _saver(args, device, n_layers, fit_note)
    rows = []
    for name in args.configs:
        t0 = time.perf_counter()
        row = run_config(name, cfg, args, device, args.steps, args.warmup)
        print(f"  {name}: {row['status']} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        rows.append(row)
        _speedups(rows)
        save(rows)  # after every configuration: a run cut short still leaves what it measured
    print(format_table(rows))
    if device.type != "cuda":
        print("(CPU: a code-path check of every configuration; throughput and MFU need a GPU.)")
    if args.json:
        print(f"wrote {save(rows)}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


def _speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["config"] == "eager-sdpa" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and base:
            r["speedup_vs_eager"] = base["step_ms"] / r["step_ms"]


def _saver(args, device: torch.device, n_layers: int, fit_note: str):
    if not args.json:
        return lambda rows: None
    from .common import default_json_path, environment, write_json

    env = environment(device, measure=False)
    env.update(model=args.preset, layers=n_layers, layers_note=fit_note)
    path = default_json_path(env, "-train-step") if args.json == "auto" else args.json

    def save(rows):
        for r in rows:
            r["device"] = env["device_name"]
        return write_json(path, env, rows, kind="train_step")

    return save


if __name__ == "__main__":
    sys.exit(main())
