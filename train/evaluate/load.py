"""A model and its tokenizer for evaluation: ``model.load`` plus what results.json records.

``checkpoint`` is a Hugging Face Llama directory or a training run / checkpoint directory, read as
``python -m model.generate`` reads it (``model/load.py`` says how).
"""
from __future__ import annotations

import os

import torch

from model.load import load, resolve


def load_model_and_tokenizer(checkpoint: str, tokenizer: str | None = None, device=None, dtype=None):
    """-> (Llama in eval mode on ``device`` in ``dtype``, tokenizer, description dict for results.json).

    Raises FileNotFoundError or ValueError with a message naming the path."""
    src = resolve(checkpoint, tokenizer)
    model, tok = load(src, device=device, dtype=dtype)
    info = dict(checkpoint=os.path.abspath(src.path), tokenizer=src.tokenizer,
                dtype=str(next(model.parameters()).dtype), device=str(torch.device(device or "cpu")))
    return model, tok, info
