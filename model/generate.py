"""python -m model.generate --checkpoint DIR --prompt "...": read what a trained model writes.

DIR is a Hugging Face directory (config.json + safetensors, e.g. from ``python -m train.export``),
whose tokenizer files are used, or a training run or checkpoint directory, whose run config names
the tokenizer it was trained with (data.tokenizer). Each prompt is encoded as BOS + text; generation
stops at EOS, which is not printed. Several --prompt values run as one batch.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from .load import load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="an HF directory, or a training run / checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="override: byte, or a tokenizer file or directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the checkpoint's (HF) or float32 (training checkpoint)")
    args = p.parse_args(argv)
    try:
        model, tok = load(args.checkpoint, args.tokenizer, args.device, getattr(torch, args.dtype) if args.dtype else None)
        prompts = [[tok.bos_id] + tok.encode(text) for text in args.prompt]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, stop_ids=(tok.eos_id,), seed=args.seed)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in caught:  # one line each (e.g. a prompt that reached the context length)
        print(f"warning: {w.message}", file=sys.stderr)
    for text, ids in zip(args.prompt, out):
        if ids and ids[-1] == tok.eos_id:
            ids = ids[:-1]
        print(text + tok.decode(ids), flush=True)
        if len(out) > 1:
            print("---")
    return 0


if __name__ == "__main__":
    sys.exit(main())
