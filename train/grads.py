"""The global gradient norm and clipping, over every shard, replica and pipeline stage.

Under TP a gradient is a DTensor: a Replicate piece is held whole by every tp rank and must
count once; a Partial one (norm weights under sequence parallelism, replicated kv projections)
is summed first, by FSDP or by settle_partial_grads.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


# ------------------------------------------------------------------------ gradient norm
def _local_and_weight(g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's piece of a gradient, and 1 / (how many ranks hold the same piece)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(g, DTensor):
        return g, 1.0
    copies = 1
    for dim, placement in enumerate(g.placements):
        if isinstance(placement, Replicate):
            copies *= g.device_mesh.size(dim)
    return g.to_local(), 1.0 / copies


@torch.no_grad()
def settle_partial_grads(parts: list[nn.Module]) -> None:
    """Sum the gradients left Partial over tp (norm weights under sequence parallelism,
    replicated kv projections) into their parameters' placement, when FSDP is not there to
    do it: one all-reduce for all of them rather than one per parameter."""
    from torch.distributed.tensor import DTensor, Partial

    pending = []
    for part in parts:
        for p in part.parameters():
            g = p.grad
            if isinstance(g, DTensor) and any(isinstance(pl, Partial) for pl in g.placements):
                pending.append((p, g))
    if not pending:
        return
    mesh = pending[0][1].device_mesh
    simple = all(g.device_mesh == mesh and g.placements == (Partial("sum"),) for _, g in pending)
    if not simple:  # not a layout this module makes; let DTensor do it one by one
        for p, g in pending:
            p.grad = g.redistribute(g.device_mesh, p.placements)
        return
    locals_ = [g.to_local() for _, g in pending]
    flat = torch.cat([t.reshape(-1) for t in locals_])
    dist.all_reduce(flat, group=mesh.get_group())
    for (p, _), t, piece in zip(pending, locals_, flat.split([t.numel() for t in locals_])):
        p.grad = DTensor.from_local(piece.view_as(t), mesh, p.placements, run_check=False)


@torch.no_grad()
def global_grad_norm(parts: list[nn.Module], layout, extra: torch.Tensor | None = None):
    """-> (L2 norm of the whole model's gradient, extra summed over all ranks).

    Each rank sums the squares of its own pieces, weighting a piece held by k ranks by 1 / k so
    it counts once; one all-reduce over the world (every stage, shard and replica) adds them
    up, together with ``extra`` (the step loss), so a step costs one collective here."""
    grads = [p.grad for part in parts for p in part.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    by_weight: dict[float, list[torch.Tensor]] = {}
    for g in grads:
        local, w = _local_and_weight(g)
        by_weight.setdefault(w, []).append(local)
    for w, tensors in by_weight.items():
        norms = torch._foreach_norm(tensors, 2.0)
        total += w * torch.stack([n.float() for n in norms]).square().sum()
    packed = torch.stack([total, extra.float() if extra is not None else torch.zeros_like(total)])
    if layout.distributed and layout.world > 1:
        dist.all_reduce(packed)
    return packed[0].sqrt(), packed[1]


@torch.no_grad()
def clip_grads_(parts: list[nn.Module], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every local gradient piece by min(1, max_norm / (norm + 1e-6)), as torch's
    clip_grad_norm_ does, without a host sync."""
    if not math.isfinite(max_norm):
        return
    locals_ = [_local_and_weight(p.grad)[0] for part in parts for p in part.parameters() if p.grad is not None]
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if locals_:
        torch._foreach_mul_(locals_, coef.to(locals_[0].device))
