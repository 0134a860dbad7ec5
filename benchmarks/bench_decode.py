"""python -m benchmarks.bench_decode: generation speed, ours against transformers, and the decoding kernel.

    python -m benchmarks.bench_decode              # this device: CPU (tiny model) or GPU (all of it)
    python -m benchmarks.bench_decode --json       # also write benchmarks/results/<device>-<date>-decode.json

Generation: Llama.generate (packed prefill, KV cache, our kernels on a GPU) against transformers'
LlamaForCausalLM.generate with SDPA attention on the same weights (saved with save_hf and read back),
greedy, equal-length prompts so that transformers needs no padding. Prefill tokens/s is the prompt
tokens over the time of a one-token generation; decode tokens/s is the further tokens over the extra
time of a longer one. On the CPU the model is the tiny preset in float32; on a GPU a Llama-2-7B-shaped
stack of layers in bf16.

Decoding kernel (GPU only): one query per sequence against a bf16 cache of 4k to 32k tokens at batch 1
to 64, Llama-2-70B heads (64 query, 8 kv) and 7B heads (32/32), head_dim 128. It must read the whole
cache once, so its floor is the cache's bytes over the measured copy bandwidth; SDPA (its default
backend choice) runs beside it.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import meditron_kernels as mk

from .common import default_json_path, environment, resolve_device, time_ms, write_json


def _wall(fn, device, reps: int) -> float:
    """Median seconds of fn() over reps runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generation_rows(device, dtype, cfg, batch: int, prompt_len: int, new_tokens: int, reps: int) -> list[dict]:
    import transformers

    from model import Llama

    torch.manual_seed(0)
    ours = Llama(cfg).to(device=device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_hf(tmp)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype)
    hf = hf.to(device).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
    prompts = ids.tolist()

    def ours_gen(n):
        return lambda: ours.generate(prompts, max_new_tokens=n, progress=False)

    def hf_gen(n):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        return lambda: hf.generate(ids, **kw)

    rows = []
    for name, make in (("ours", ours_gen), ("transformers-sdpa", hf_gen)):
        with torch.no_grad():
            t1 = _wall(make(1), device, reps)
            tn = _wall(make(new_tokens), device, reps)
        rows.append(dict(kind="generate", provider=name, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                         dtype=str(dtype).removeprefix("torch."), layers=cfg.n_layers, dim=cfg.dim,
                         prefill_tok_s=batch * prompt_len / t1, decode_tok_s=batch * (new_tokens - 1) / (tn - t1)))
    return rows


def kernel_rows(device, copy_gbps: float, batches, caches, rep_ms: int) -> list[dict]:
    import torch.nn.functional as F

    rows = []
    free = torch.cuda.mem_get_info(device)[0]
    for label, h, hkv in (("70b", 64, 8), ("7b", 32, 32)):
        for b in batches:
            for s in caches:
                d = 128
                cache_bytes = 2 * b * s * hkv * d * 2
                if 2 * cache_bytes > 0.8 * free:
                    rows.append(dict(kind="decode-attention", heads=label, batch=b, cache=s, skipped="memory"))
                    continue
                q = torch.randn(b, 1, h, d, device=device, dtype=torch.bfloat16)
                k = torch.randn(b, s, hkv, d, device=device, dtype=torch.bfloat16)
                v = torch.randn(b, s, hkv, d, device=device, dtype=torch.bfloat16)
                lens = torch.full((b,), s, dtype=torch.int32, device=device)
                ours = time_ms(lambda: mk.flash_attention(q, k, v, seqlens_k=lens), device, rep_ms=rep_ms)
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                sdpa = time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), device,
                               rep_ms=rep_ms)
                floor_ms = cache_bytes / (copy_gbps * 1e9) * 1e3
                rows.append(dict(kind="decode-attention", heads=label, batch=b, cache=s, ours_ms=ours, sdpa_ms=sdpa,
                                 ours_gbps=cache_bytes / ours / 1e6, of_bandwidth=floor_ms / ours,
                                 sdpa_of_bandwidth=floor_ms / sdpa))
                del q, k, v, qt, kt, vt
    return rows


def _print(rows: list[dict], env: dict) -> None:
    print(f"device: {env['device_name']}  torch {env['torch']} ({env['torch_threads']} threads)  "
          f"triton {env['triton']}")
    gen = [r for r in rows if r["kind"] == "generate"]
    if gen:
        print(f"\ngeneration, {gen[0]['layers']} layers of dim {gen[0]['dim']}, {gen[0]['dtype']}, batch "
              f"{gen[0]['batch']}, prompts of {gen[0]['prompt_len']}, {gen[0]['new_tokens']} new tokens (greedy)")
        print(f"{'provider':<20}{'prefill tok/s':>15}{'decode tok/s':>15}")
        for r in gen:
            print(f"{r['provider']:<20}{r['prefill_tok_s']:>15.0f}{r['decode_tok_s']:>15.0f}")
        if len(gen) == 2:
            print(f"{'ours / transformers':<20}{gen[0]['prefill_tok_s'] / gen[1]['prefill_tok_s']:>15.2f}"
                  f"{gen[0]['decode_tok_s'] / gen[1]['decode_tok_s']:>15.2f}")
    att = [r for r in rows if r["kind"] == "decode-attention"]
    if att:
        print(f"\ndecoding attention (bf16, d 128): fraction of the copy bandwidth ({env.get('copy_gbps', 0):.0f} GB/s)")
        print(f"{'heads':<6}{'batch':>6}{'cache':>7}{'ours ms':>10}{'ours':>7}{'sdpa ms':>10}{'sdpa':>7}")
        for r in att:
            if "skipped" in r:
                print(f"{r['heads']:<6}{r['batch']:>6}{r['cache']:>7}  skipped ({r['skipped']})")
                continue
            print(f"{r['heads']:<6}{r['batch']:>6}{r['cache']:>7}{r['ours_ms']:>10.3f}{r['of_bandwidth']:>7.0%}"
                  f"{r['sdpa_ms']:>10.3f}{r['sdpa_of_bandwidth']:>7.0%}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=None, help="prompts per generate call (CPU 4, GPU 16)")
    p.add_argument("--prompt-len", type=int, default=None, help="CPU 64, GPU 512")
    p.add_argument("--new-tokens", type=int, default=None, help="CPU 32, GPU 128")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default 1: the shared development machines are oversubscribed, "
                        "where more threads only add contention)")
    p.add_argument("--no-kernel", action="store_true", help="GPU: skip the decoding-kernel sweep")
    p.add_argument("--json", nargs="?", const="auto", metavar="PATH")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, device) -> int:
    from model import LlamaConfig

    env = environment(device)
    env["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        cfg = LlamaConfig(**dict(LlamaConfig.from_name("llama2-7b").__dict__, n_layers=4))
        dtype, batch, plen, new = torch.bfloat16, args.batch or 16, args.prompt_len or 512, args.new_tokens or 128
    else:
        cfg = LlamaConfig.from_name("tiny")
        dtype, batch, plen, new = torch.float32, args.batch or 4, args.prompt_len or 64, args.new_tokens or 32
    rows = generation_rows(device, dtype, cfg, batch, plen, new, args.reps)
    if device.type == "cuda" and not args.no_kernel:
        rows += kernel_rows(device, env["copy_gbps"], (1, 4, 16, 64), (4096, 8192, 16384, 32768), 100)
    _print(rows, env)
    if args.json:
        path = default_json_path(env, "-decode") if args.json == "auto" else args.json
        print("wrote", write_json(path, env, rows, kind="decode"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
