"""AdamW and the warmup + cosine learning-rate schedule, built from the training section."""
from __future__ import annotations

import functools
import math

import torch


def lr_at(step: int, t) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr; ``t`` is the
    config's training section."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay = t.decay_steps or max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


class PartOptimizers:
    """One AdamW per model part, driven as one: checkpointing pairs each part with its own
    optimizer (a pipeline rank may hold several stages)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


class PartSchedulers:
    """The warmup + cosine LambdaLR of each part's optimizer, stepped together. Loading an
    optimizer replaces its param-group dicts, so each scheduler must hold its own optimizer
    rather than a copy of the groups."""

    def __init__(self, optimizer: PartOptimizers, t):
        fn = functools.partial(_lr_factor, t=t)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, fn) for o in optimizer.optimizers]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict:
        return self.schedulers[0].state_dict()  # the same on every part

    def load_state_dict(self, state: dict) -> None:
        for s in self.schedulers:
            s.load_state_dict(state)


def _lr_factor(step: int, t) -> float:
    return lr_at(step, t) / t.lr


def build_optimizer(parts, t, device: torch.device) -> tuple[PartOptimizers, PartSchedulers]:
    """AdamW over every part this rank holds, and its schedule; ``t`` is the training section.
    No weight decay on norms (1-D) and the input embedding, as Megatron does."""
    parts = parts if isinstance(parts, (list, tuple)) else [parts]
    optimizers = []
    for part in parts:
        decay, no_decay = [], []
        for name, p in part.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device.type == "cuda"
        optimizers.append(torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused))
    optimizer = PartOptimizers(optimizers)
    return optimizer, PartSchedulers(optimizer, t)
