"""The training objective: what the loop minimises, from the last stage's hidden states.

The loop and the pipeline schedule call an objective as ``objective(hidden, head_weight,
targets)`` and know nothing else about it, so other objectives (SFT's masked targets, DPO,
distillation) plug in here rather than into the loop.
"""
from __future__ import annotations

import torch

from .loss import lm_loss


class LMObjective:
    """Next-token cross-entropy over the targets (train/loss.py), the head fused with the loss;
    vocabulary-parallel over ``tp_mesh`` under tensor parallelism."""

    def __init__(self, tp_mesh=None, sequence_parallel: bool = False):
        self.tp_mesh, self.sequence_parallel = tp_mesh, sequence_parallel

    def __call__(self, hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (batch, seq, dim) after the final norm (seq / tp under sequence parallelism),
        head_weight (vocab, dim), targets (batch, seq) -> the mean loss, a float32 scalar."""
        return lm_loss(hidden, head_weight, targets, tp_mesh=self.tp_mesh, sequence_parallel=self.sequence_parallel)


def build_objective(layout) -> LMObjective:
    """The objective for this rank's place in ``layout`` (train/parallelize.Layout)."""
    tp_mesh = layout.mesh["tp"] if layout.tp > 1 else None
    return LMObjective(tp_mesh, layout.sequence_parallel)
