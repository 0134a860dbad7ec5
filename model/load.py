"""A model and its tokenizer from a Hugging Face directory or a training run.

``path`` is either a Hugging Face Llama directory (config.json and model.safetensors or its
index, e.g. what ``python -m train.export`` writes), loaded with ``Llama.from_hf``, or a training
run or checkpoint directory, whose newest checkpoint that verifies is resharded into one model.
The tokenizer is ``tokenizer`` when given (the spec of the trainer's ``data.tokenizer``: "byte",
a sentencepiece .model, an HF tokenizer.json, or a directory holding one); otherwise the HF
directory's own tokenizer, or the one the run was trained with.

``python -m model.generate`` and ``python -m train.evaluate`` both load through here, so a
directory means the same thing to both.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

from . import checkpoint as ckpt
from .llama import Llama
from .tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class Source:
    """What ``path`` resolved to: the directory read and the tokenizer spec to load."""
    path: str        # the HF directory, or the verified checkpoint directory
    hf: bool         # a Hugging Face directory (else a training checkpoint)
    tokenizer: str   # spec for load_tokenizer


def is_hf_dir(path: str) -> bool:
    """A Hugging Face model directory: config.json and model.safetensors (or its shard index)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def resolve(path: str, tokenizer: str | None = None) -> Source:
    """Find what ``path`` holds (verifying a training checkpoint) without loading the weights.

    Raises FileNotFoundError or ValueError, one line naming the path."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path!r}: no such directory")
    if is_hf_dir(path):
        if tokenizer is None:
            if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.model", "tokenizer.json")):
                raise ValueError(f"--checkpoint {path!r} has no tokenizer.model or tokenizer.json: pass --tokenizer")
            tokenizer = path
        return Source(path, True, tokenizer)
    try:
        found = ckpt.resolve_verified(path, note=lambda msg: print(f"note: {msg}", file=sys.stderr))
    except ckpt.CheckpointError as e:  # a corrupt checkpoint is the user's input too: one line
        raise ValueError(str(e)) from None
    if tokenizer is None:
        tokenizer = ckpt.tokenizer_spec(found)
        if tokenizer is None:
            raise ValueError(f"--checkpoint {path!r}: no run config names the tokenizer (data.tokenizer); "
                             "pass --tokenizer")
    return Source(found, False, tokenizer)


def load(path: str | Source, tokenizer: str | None = None, device=None, dtype: torch.dtype | None = None):
    """-> (Llama in eval mode, tokenizer) from an HF directory or a training run/checkpoint directory.

    device: default the CPU. dtype: default the HF checkpoint's own, or float32 for a training
    checkpoint. ``path`` may be what ``resolve`` returned (then ``tokenizer`` is ignored)."""
    src = path if isinstance(path, Source) else resolve(path, tokenizer)
    device = torch.device(device or "cpu")
    if src.hf:
        model = Llama.from_hf(src.path, device=device, dtype=dtype)
    else:
        model = ckpt.load_model(src.path).to(device=device, dtype=dtype or torch.float32)
    tok = load_tokenizer(src.tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {src.tokenizer!r} has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.cfg.vocab_size}")
    return model.eval(), tok
