"""Parallelism and memory/speed wrappers, applied to the plain model from outside.

The model (model/llama.py) knows nothing of these: activation checkpointing and
torch.compile wrap its blocks here.
"""
from __future__ import annotations

import functools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Selective recompute keeps what is expensive to redo (matmuls, attention) and recomputes the
# cheap elementwise and normalisation ops, whose outputs are as large as a matmul's.
_SAVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default}


def _selective_policy(ctx, op, *args, **kwargs):
    if op in _SAVE_OPS or "attention" in str(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """none; full: recompute each block in the backward; selective: recompute norms, rotary and
    SwiGLU activations but keep matmul and attention outputs."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpointing must be none, full or selective, got {mode!r}")
    for key, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False,
                                         context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                                      _selective_policy))
        model.layers[key] = wrapped


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each transformer block (blocks share code, so they share compiled graphs)."""
    for key, block in list(model.layers.items()):
        model.layers[key] = torch.compile(block, fullgraph=True)
