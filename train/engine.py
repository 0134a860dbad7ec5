"""One training step's forward and backward over the model parts this rank holds.

One step = gradient accumulation over global_batch / (micro_batch x dp) micro batches, or one
pipeline schedule step over them. Whatever the layout, step s reads the same global samples
s*G .. s*G + G - 1 (G = global batch), grouped into the same micro batches, so losses and
gradient norms match a one-process run.
"""
from __future__ import annotations

import contextlib

import torch

from meditron_kernels import packing

from . import pipeline
from .data import Blend, make_batch


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("cu_seqlens", "max_seqlen") if k in batch}


class Engine:
    """Runs ``model`` (a parallelize.ParallelModel) under ``objective`` for the training
    section ``t``; ``pack`` is data.pack, ``schedule_name`` parallel.pp_schedule."""

    def __init__(self, model, objective, layout, device: torch.device, t, pack: bool, schedule_name: str):
        self.model, self.objective, self.layout, self.device = model, objective, layout, device
        self.parts = model.parts
        self.micro_batch, self.global_batch, self.seq_len, self.pack = t.micro_batch, t.global_batch, t.seq_len, pack
        self.accum = t.global_batch // (t.micro_batch * layout.dp)
        self.pipelined = layout.pp > 1
        if t.dtype == "bfloat16":
            self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext
        self.schedule = None
        if self.pipelined:
            if pack:
                for part in self.parts:
                    pipeline.add_packing_hook(part, device)
            act_dtype = torch.bfloat16 if t.dtype == "bfloat16-params" else torch.float32
            self.schedule = pipeline.build_schedule(
                self.parts, model.stage_ids, model.n_stages, layout, self.accum, t.micro_batch, t.seq_len,
                act_dtype, self.loss, device, schedule_name)
        # ZBV's eval() still schedules backward actions on forward-only stages and fails (torch
        # 2.13), and older torch has no eval(): there, validation runs the training schedule
        # and drops the gradients.
        self.forward_only_eval = (self.schedule is not None and hasattr(self.schedule, "eval")
                                  and schedule_name != "zbv")
        # ranks whose loss counts towards the logged mean: one per dp replica
        self.loss_weight = (1.0 / layout.dp) if (model.has_last and layout.tp_rank == 0) else 0.0

    # -------------------------------------------------------------- losses
    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The objective from the last stage's hidden states; also the pipeline schedule's loss_fn."""
        # Read the head at each call: FSDP swaps the module's parameters between their sharded
        # and gathered forms.
        return self.objective(hidden, self.model.last.output.weight, targets)

    def micro_loss(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            hidden = self.parts[0](batch["tokens"], return_hidden=True, **model_inputs(batch))
            return self.loss(hidden, batch["targets"])

    # -------------------------------------------------------------- data
    def micro_batches(self, data: Blend, step: int) -> list[dict]:
        """This dp rank's micro batches of ``step``: micro m holds global samples
        step*G + (m*dp + dp_rank)*micro_batch + [0, micro_batch), so the micro batches of a step
        are the same groups of samples for every dp size."""
        lay, mb = self.layout, self.micro_batch
        return [make_batch(data, step * self.global_batch + (m * lay.dp + lay.dp_rank) * mb, mb, self.pack)
                for m in range(self.accum)]

    def pipeline_inputs(self, micros: list[dict]):
        """The schedule's (args, target, kwargs) for a list of micro batches."""
        tokens = torch.cat([b["tokens"] for b in micros])
        targets = torch.cat([b["targets"] for b in micros])
        kwargs = {"return_hidden": True}  # the last stage stops before the head: the loss fuses it
        if self.pack:
            kwargs["doc_positions"] = torch.cat([packing.document_positions(b["cu_seqlens"], b["tokens"].numel())
                                                 .to(torch.int32).view(b["tokens"].shape) for b in micros])
        args = (tokens.to(self.device, non_blocking=True),) if self.model.has_first else ()
        target = targets.to(self.device, non_blocking=True) if self.model.has_last else None
        return args, target, kwargs

    # -------------------------------------------------------------- one step
    def forward_backward(self, micros: list[dict], step: int, hooks) -> torch.Tensor:
        """Run the step's forward and backward passes; -> this rank's mean loss (a device
        scalar; meaningful where the last stage lives). ``hooks``: signals.Hooks."""
        if self.pipelined:
            args, target, kwargs = self.pipeline_inputs(micros)
            losses: list[torch.Tensor] = []
            with self.autocast():
                pipeline.schedule_step(self.schedule, *args, target=target,
                                       losses=losses if self.model.has_last else None, **kwargs)
            if not self.model.has_last:
                return torch.zeros((), device=self.device)
            return torch.stack([x.detach().float() for x in losses]).mean()
        loss_sum = torch.zeros((), device=self.device)
        root = self.parts[0]
        for micro, batch in enumerate(micros):
            if self.model.replicated:  # all-reduce gradients once, after the last micro batch
                root.set_requires_gradient_sync(micro == self.accum - 1)
            batch = to_device(batch, self.device)
            loss = self.micro_loss(batch)
            if hooks.loss is not None:
                loss = hooks.loss(step, micro, loss)
            (loss / self.accum).backward()
            loss_sum += loss.detach()
        return loss_sum / self.accum
