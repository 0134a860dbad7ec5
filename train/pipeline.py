"""Pipeline parallelism's schedule, and the packing hooks that carry document boundaries
through it.

A schedule cuts the step's batch into micro batches along the batch dimension, which
cu_seqlens (offsets into the flattened batch) cannot follow: the batch travels with per-token
document positions instead (meditron_kernels.packing.document_positions), and each stage turns
its micro batch's positions back into cu_seqlens on the host (add_packing_hook). The stages themselves are cut in
train/parallelize.py.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from meditron_kernels import packing


# ------------------------------------------------------------------------ packed documents
def add_packing_hook(part: nn.Module, device: torch.device) -> None:
    """Stage forward(x, doc_positions=(mb, seq) CPU int tensor) -> forward(x, cu_seqlens, max_seqlen).

    The positions stay on the host, so rebuilding cu_seqlens and max_seqlen costs no device
    sync; only the small offsets tensor is copied. Registered in front of FSDP's hooks, which
    would otherwise move the positions to the device first."""
    def hook(module, args, kwargs):
        pos = kwargs.pop("doc_positions", None)
        if pos is not None:
            cu = packing.cu_seqlens_from_positions(pos.cpu())
            kwargs["cu_seqlens"] = cu.to(device, non_blocking=True)
            kwargs["max_seqlen"] = packing.longest_document(cu)
        return args, kwargs

    part.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


# ------------------------------------------------------------------------ pipeline schedule
def build_schedule(parts: list[nn.Module], stage_ids: list[int], n_stages: int, layout,
                   n_microbatches: int, micro_batch: int, seq_len: int, act_dtype: torch.dtype,
                   loss_fn, device: torch.device, name: str):
    """A torch.distributed.pipelining schedule over this rank's stages.

    Stage input and output shapes are given up front (static mode): the stream between stages
    is (micro_batch, seq / tp under sequence parallelism, dim) in the activation dtype, and the
    last stage returns the hidden states the head reads, of the same shape: ``loss_fn`` fuses
    the head with the loss (train/loss.py), so no stage materialises logits.
    """
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B, ScheduleZBVZeroBubble)

    cfg = parts[0].cfg
    seq_local = seq_len // layout.tp if layout.sequence_parallel else seq_len
    group = layout.group("pp")
    stages = []
    for part, s in zip(parts, stage_ids):
        # float activations carry requires_grad: static mode derives the gradient traffic from it
        stream = torch.empty(micro_batch, seq_local, cfg.dim, dtype=act_dtype, device="meta", requires_grad=True)
        if s == 0:
            inp = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
        else:
            inp = stream
        stages.append(PipelineStage(part, s, n_stages, device, input_args=(inp,), output_args=(stream,), group=group))
    cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved-1f1b": ScheduleInterleaved1F1B,
           "zbv": ScheduleZBVZeroBubble}[name]
    if name in ("1f1b", "gpipe"):
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)


def schedule_step(schedule, *args, **kwargs):
    """schedule.step without merging the last stage's outputs when torch can skip it."""
    if "return_outputs" in inspect.signature(schedule.step).parameters:
        kwargs["return_outputs"] = False
    return schedule.step(*args, **kwargs)
