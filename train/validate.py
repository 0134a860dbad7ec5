"""Validation: the mean held-out loss, on the cadence of the eval section."""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import pipeline
from .data import Blend, make_batch
from .engine import Engine, to_device


class Validator:
    """Built from the eval section; ``val`` is the held-out split (None: never validate)."""

    def __init__(self, section, engine: Engine, val: Blend | None):
        self.section, self.engine, self.val = section, engine, val

    def due(self, done: int, last: int) -> bool:
        return (self.val is not None and self.section.interval > 0
                and (done % self.section.interval == 0 or done == last))

    @torch.no_grad()
    def validate(self) -> float:
        """Mean validation loss over eval.batches micro batches (every rank sees the same ones).
        Under pipelining they go through the schedule in groups of its micro batch count."""
        e = self.engine
        for part in e.parts:
            part.eval()
        try:
            n = self.section.batches
            if not e.pipelined:
                total = torch.zeros((), device=e.device)
                for i in range(n):
                    batch = to_device(make_batch(self.val, i * e.micro_batch, e.micro_batch, e.pack), e.device)
                    total += e.micro_loss(batch).float()
                return (total / n).item()
            return self._pipelined(n)
        finally:
            for part in e.parts:
                part.train()

    def _pipelined(self, n: int) -> float:
        e, has_last = self.engine, self.engine.model.has_last
        losses: list[torch.Tensor] = []
        for g in range(-(-n // e.accum)):
            micros = [make_batch(self.val, (g * e.accum + i) * e.micro_batch, e.micro_batch, e.pack)
                      for i in range(e.accum)]
            args, target, kwargs = e.pipeline_inputs(micros)
            group: list[torch.Tensor] = []  # the schedule clears the list it is given
            with e.autocast():
                if e.forward_only_eval:
                    e.schedule.eval(*args, target=target, losses=group if has_last else None, **kwargs)
                else:
                    with torch.enable_grad():
                        pipeline.schedule_step(e.schedule, *args, target=target,
                                               losses=group if has_last else None, **kwargs)
                    for part in e.parts:
                        part.zero_grad(set_to_none=True)
            losses += group
        mean = torch.stack([x.float() for x in losses]).mean() if has_last else torch.zeros((), device=e.device)
        # the last stage's holder (tp rank 0, dp rank 0) speaks for everyone
        lay = e.layout
        share = mean if (has_last and lay.tp_rank == 0 and lay.dp_rank == 0) else mean * 0
        dist.all_reduce(share)
        return share.item()
