"""A model and its tokenizer from a Hugging Face directory or a training run.

``checkpoint`` is either a transformers Llama directory (config.json + safetensors), loaded with
``Llama.from_hf``, or a training run / checkpoint directory, loaded as ``python -m train.export``
loads it (the newest complete checkpoint, resharded into one model). The tokenizer is
``tokenizer`` when given (the spec of the trainer's ``data.tokenizer``: "byte", a sentencepiece
.model, an HF tokenizer.json, or a directory holding one); otherwise the HF directory's own
tokenizer file, or the tokenizer the run was trained with.
"""
from __future__ import annotations

import json
import os

import torch

from model import Llama

from ..export import load_model, resolve_checkpoint
from ..tokenizer import load_tokenizer


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def load_model_and_tokenizer(checkpoint: str, tokenizer: str | None = None, device=None, dtype=None):
    """-> (Llama in eval mode on ``device`` in ``dtype``, tokenizer, description dict for results.json).

    Raises FileNotFoundError or ValueError with a message naming the path."""
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint!r}: no such directory")
    device = torch.device(device or "cpu")
    if is_hf_dir(checkpoint):
        source = checkpoint
        model = Llama.from_hf(checkpoint, device=device, dtype=dtype)
        if tokenizer is None:
            if not any(os.path.isfile(os.path.join(checkpoint, f)) for f in ("tokenizer.model", "tokenizer.json")):
                raise ValueError(f"--checkpoint {checkpoint!r} has no tokenizer.model or tokenizer.json: "
                                 "pass --tokenizer")
            tokenizer = checkpoint
    else:
        source = resolve_checkpoint(checkpoint)
        model = load_model(source)
        model.to(device=device, dtype=dtype or torch.float32)
        if tokenizer is None:
            with open(os.path.join(source, "meta.json")) as f:
                tokenizer = json.load(f)["config"]["data"]["tokenizer"]
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.cfg.vocab_size}")
    model.eval()
    info = dict(checkpoint=os.path.abspath(source), tokenizer=tokenizer, dtype=str(next(model.parameters()).dtype),
                device=str(device))
    return model, tok, info
