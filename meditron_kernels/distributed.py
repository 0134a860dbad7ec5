"""Sharding rules that let the Triton ops run on DTensors.

``import meditron_kernels.distributed`` registers them (it needs torch.distributed's tensor
APIs, so the package does not import it by itself; train/parallelize.py does). A custom op
called on DTensors needs a rule saying which input placements it accepts and what placements
its outputs then have; DTensor then runs the op on the local shards. Each rule lists, for one
mesh dimension, the layouts under which the op is purely local:

- RMSNorm (plain and with the fused residual add): rows split along any dim but the
  normalised one, weight replicated. In the backward the weight's gradient is a sum over the
  rows, so each rank holds a ``Partial`` share of it; DTensor (or FSDP) sums it when it is
  redistributed. That is what sequence parallelism needs: every rank normalises its slice of
  the sequence.
- SwiGLU: elementwise, so any common split (the packed w1|w3 form: any dim but the last).
- Attention (rotary fused or not) and rotary alone: split over heads (tensor parallelism: q
  and k/v split alike, which keeps each query head with its kv head under GQA when
  n_kv_heads % tp == 0) or over the batch; rotary tables replicated.
- Everything replicated, always.

The pure-PyTorch backend needs none of this: DTensor already knows its aten ops. The CUDA
extension's ops have no rules yet; on DTensors they fail with DTensor's "does not have a
sharding strategy registered" error.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from .ops import attention as _attention  # noqa: F401  (the ops must exist before rules name them)
from .ops import rms_norm as _rms_norm  # noqa: F401
from .ops import rotary as _rotary  # noqa: F401
from .ops import swiglu as _swiglu  # noqa: F401

_ops = torch.ops.meditron_kernels


def _opt(t, placement):
    """The placement of an optional tensor argument: None when it was not given."""
    return None if t is None else placement


# ---------------------------------------------------------------------------- RMSNorm
@register_sharding(_ops.triton_rms_norm.default)
def _rms_norm_rule(x, weight, eps):
    rules = [([Replicate()], [Replicate(), Replicate(), None])]
    for d in range(x.ndim - 1):
        rules.append(([Shard(d)], [Shard(d), Replicate(), None]))
    return rules


@register_sharding(_ops.triton_rms_norm_residual.default)
def _rms_norm_residual_rule(x, residual, weight, eps):
    rules = [([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), None])]
    for d in range(x.ndim - 1):
        rules.append(([Shard(d), Shard(d)], [Shard(d), Shard(d), Replicate(), None]))
    return rules


@register_sharding(_ops.triton_rms_norm_backward.default)
def _rms_norm_backward_rule(dy, x, weight, dh, eps, compute_dweight):
    rules = [([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), _opt(dh, Replicate()), None, None])]
    for d in range(x.ndim - 1):
        # dweight sums dy * x_hat over the rows: each rank has its rows' share
        rules.append(([Shard(d), Partial()], [Shard(d), Shard(d), Replicate(), _opt(dh, Shard(d)), None, None]))
    return rules


# ---------------------------------------------------------------------------- SwiGLU
@register_sharding(_ops.triton_swiglu.default)
def _swiglu_rule(gate, up):
    return [([Replicate()], [Replicate(), Replicate()])] + [([Shard(d)], [Shard(d), Shard(d)])
                                                            for d in range(gate.ndim)]


@register_sharding(_ops.triton_swiglu_backward.default)
def _swiglu_backward_rule(dout, gate, up):
    return [([Replicate(), Replicate()], [Replicate()] * 3)] + [([Shard(d), Shard(d)], [Shard(d)] * 3)
                                                                for d in range(gate.ndim)]


@register_sharding(_ops.triton_swiglu_packed.default)
def _swiglu_packed_rule(gate_up):
    # [gate | up] along the last dim: a split there would pair the wrong halves
    return [([Replicate()], [Replicate()])] + [([Shard(d)], [Shard(d)]) for d in range(gate_up.ndim - 1)]


@register_sharding(_ops.triton_swiglu_packed_backward.default)
def _swiglu_packed_backward_rule(dout, gate_up):
    return [([Replicate()], [Replicate()] * 2)] + [([Shard(d)], [Shard(d)] * 2) for d in range(gate_up.ndim - 1)]


# ---------------------------------------------------------------------------- rotary
@register_sharding(_ops.triton_apply_rotary.default)
def _rotary_rule(q, k, cos, sin, position_ids, interleaved, conjugate):
    # q (batch, seq, heads, head_dim); tables replicated, per-token tables and positions follow the batch
    rules = [([Replicate(), Replicate()], [Replicate()] * 4 + [_opt(position_ids, Replicate()), None, None]),
             ([Shard(2), Shard(2)], [Shard(2), Shard(2), Replicate(), Replicate(), _opt(position_ids, Replicate()),
                                     None, None])]
    if cos.ndim == 2:  # (positions, head_dim // 2) tables are the same for every sequence
        rules.append(([Shard(0), Shard(0)], [Shard(0), Shard(0), Replicate(), Replicate(),
                                             _opt(position_ids, Shard(0)), None, None]))
    return rules


# ---------------------------------------------------------------------------- attention
def _attention_layouts(q, cu_seqlens, position_ids):
    """(q/k/v placement, lse placement, position_ids placement, cu_seqlens placement) per split."""
    packed = cu_seqlens is not None
    heads = 1 if packed else 2  # q (total, heads, d) or (batch, seq, heads, d)
    lse_heads = 0 if packed else 1  # lse (heads, total) or (batch, heads, seq)
    out = [(Replicate(), Replicate(), _opt(position_ids, Replicate()), _opt(cu_seqlens, Replicate())),
           (Shard(heads), Shard(lse_heads), _opt(position_ids, Replicate()), _opt(cu_seqlens, Replicate()))]
    if not packed:
        out.append((Shard(0), Shard(0), _opt(position_ids, Shard(0)), None))
    return out


def _key_layouts(t, cu_seqlens_k, seqlens_k):
    """Placements of cu_seqlens_k (offsets: replicated) and seqlens_k (one per sequence: follows a
    batch split) for a q/k/v placement t."""
    return _opt(cu_seqlens_k, Replicate()), _opt(seqlens_k, t if t == Shard(0) else Replicate())


@register_sharding(_ops.triton_flash_attention_fwd.default)
def _attention_fwd_rule(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids,
                        cu_seqlens_k=None, max_seqlen_k=0, seqlens_k=None):
    rules = []
    for t, lse, pos, cu in _attention_layouts(q, cu_seqlens, position_ids):
        tables = _opt(cos, Replicate())
        cu_k, lens = _key_layouts(t, cu_seqlens_k, seqlens_k)
        rules.append(([t, lse], [t, t, t, None, None, cu, None, tables, tables, pos, cu_k, None, lens]))
    return rules


@register_sharding(_ops.triton_flash_attention_bwd.default)
def _attention_bwd_rule(do, q, k, v, o, lse, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids,
                        dlse=None, cu_seqlens_k=None, max_seqlen_k=0, seqlens_k=None):
    rules = []
    for t, lse_p, pos, cu in _attention_layouts(q, cu_seqlens, position_ids):
        tables = _opt(cos, Replicate())
        cu_k, lens = _key_layouts(t, cu_seqlens_k, seqlens_k)
        rules.append(([t, t, t], [t, t, t, t, t, lse_p, None, None, cu, None, tables, tables, pos,
                                  _opt(dlse, lse_p), cu_k, None, lens]))
    return rules
