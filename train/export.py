"""python -m train.export --checkpoint PATH --out DIR: a training checkpoint as a Hugging Face
Llama directory (config.json + safetensors, the tokenizer and its special ids), loadable by
transformers.LlamaForCausalLM and AutoTokenizer.

PATH is a checkpoint directory (``.../checkpoints/step_00001000``) or a run directory, whose
newest complete checkpoint is taken. Checkpoints of any parallel layout load: DCP reshards
them into one full model on the CPU. The tokenizer is the one the run's configuration names
(data.tokenizer, as the checkpoint's meta.json or the run's config.json records it; a relative
path is taken from the current directory, as training did), or --tokenizer. The weights are
written in the dtype the run's parameters computed in (bfloat16 for training.dtype =
bfloat16-params, else float32), or --dtype.
"""
from __future__ import annotations

import argparse
import sys

import torch

from model.checkpoint import CheckpointError, load_model, parameter_dtype, resolve_verified, tokenizer_spec
from model.tokenizer import load_tokenizer, save_tokenizer


def resolve_checkpoint(path: str) -> str:
    """The checkpoint directory to export, verified against its manifest."""
    return resolve_verified(path, note=lambda msg: print(f"note: {msg}", file=sys.stderr))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory")
    p.add_argument("--out", required=True, help="output directory for the Hugging Face files")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the run's parameter dtype, bfloat16 for "
                        "training.dtype=bfloat16-params, else float32)")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--tokenizer", default=None,
                   help="byte, or a sentencepiece .model / HF tokenizer.json (default: the run's data.tokenizer)")
    args = p.parse_args(argv)
    try:
        ckpt_path = resolve_checkpoint(args.checkpoint)
        spec = args.tokenizer or tokenizer_spec(ckpt_path)
        tok = load_tokenizer(spec) if spec is not None else None
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = load_model(ckpt_path)
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        print(f"error: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
              f"{model.cfg.vocab_size}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else parameter_dtype(ckpt_path)
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id) if tok is not None else {}
    model.save_hf(args.out, max_shard_size=int(args.max_shard_gb * 2**30), dtype=dtype, **ids)
    if tok is not None:
        save_tokenizer(tok, args.out)
    else:
        print("warning: no run configuration names the tokenizer and no --tokenizer: exported without a "
              "tokenizer (special ids unknown)", file=sys.stderr)
    print(f"exported {ckpt_path} -> {args.out} ({str(dtype).removeprefix('torch.')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
