"""The training loss: one entry point for every layout.

Every layout (one process, TP with or without sequence parallelism, the last pipeline stage,
FSDP) hands ``lm_loss`` the hidden states that the head would read and the head's weight;
the head and the cross-entropy run as one fused op, so no layout materialises the logits.
Under tensor parallelism the head is split over the vocabulary (ColwiseParallel) and the op
runs vocabulary-parallel over the tp group: each rank reduces its slice of the vocabulary
and the ranks exchange 3 floats per token.
"""
from __future__ import annotations

import torch

import meditron_kernels as mk


def lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, *, tp_mesh=None,
            sequence_parallel: bool = False, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy, a float32 scalar (the same on every tp rank).

    hidden (batch, seq, dim) after the final norm; under sequence parallelism this rank's
    (batch, seq / tp, dim) slice of it. head_weight (vocab, dim), or under tensor parallelism
    the head's weight as a DTensor sharded over the vocabulary (Shard(0)) on ``tp_mesh``.
    targets (batch, seq) int with ``ignore_index`` where no loss is taken.
    """
    group = None
    w = head_weight
    if tp_mesh is not None:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        # This rank's vocabulary slice; its gradient goes back to the parameter as Shard(0).
        w = head_weight.to_local()
        if sequence_parallel:
            # Every rank needs every token. The op's hidden gradient is already summed over
            # the group (identical on every rank), so the way back is a local slice.
            hidden = DTensor.from_local(hidden, tp_mesh, (Shard(1),), run_check=False)
            hidden = hidden.redistribute(tp_mesh, (Replicate(),)).to_local()
        group = tp_mesh.get_group()
    return mk.fused_linear_cross_entropy(hidden, w.to(hidden.dtype), targets, ignore_index, process_group=group)
