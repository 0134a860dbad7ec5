"""Seconds one GPU spends on one transformer layer for one micro-batch: GEMMs, attention,
memory-bound element-wise kernels, tensor-parallel collectives and recomputation."""
from __future__ import annotations

from dataclasses import dataclass

from .comm import group_bus_bandwidth, ring_time
from .hardware import MEMORY_EFFICIENCY, Cluster
from .layout import PlanLayout
from .shapes import Architecture


def elementwise_bytes_per_token(arch: Architecture, layout: PlanLayout) -> tuple[float, float]:
    """HBM bytes moved per token by one layer's memory-bound kernels in the forward pass:
    (inside the attention core, everything else). A fused backward reads the saved input and
    the incoming gradient and writes one gradient: about 1.5 x the forward's bytes."""
    h, f, t, s = arch.dim, arch.ffn_dim, layout.tp, layout.seq_len
    heads = arch.n_heads / t
    sp = 1 / t if layout.sequence_parallel else 1.0  # norms and residuals run on s/t tokens under SP
    if arch.gpt:
        # Two LayerNorms (read + write 2h each), two fused bias-dropout-adds (read 2 x 2h,
        # write 2h, 1-byte mask), fused bias-GeLU on the ffn activations.
        other = sp * (2 * 4 * h + 2 * 7 * h) + 4 * f / t
    elif layout.fused_kernels:
        # Two RMSNorms, two residual adds (read 2 x 2h, write 2h), rotary on q and k, SwiGLU
        # (read gate and up, write the product).
        other = sp * (2 * 4 * h + 2 * 6 * h) + 4 * (h + arch.kv_dim) / t + 6 * f / t
    else:
        # Meta's reference Llama ops, as Megatron-LLM runs them (megatron/model/fused_layer_norm.py
        # RMSNorm, positional_embeddings.py apply_rotary_emb, transformer.py ParallelAttention).
        # Bytes per element: RMSNorm as x.float(), pow, mean, x * rsqrt, type_as, * weight moves
        # 6 + 8 + 4 + 8 + 6 + 4 = 36; rotary as float(), a transposing copy into complex, the
        # complex product, a transposing copy back and type_as moves 6 + 8 + 8 + 8 + 6 = 36, on
        # q and on k, which has been broadcast to every query head; the attention kernel gets
        # contiguous (batch, seq) copies of q, k, v and its output is copied back (4 x 4 per
        # element of h); with grouped-query attention q is first copied out of the fused
        # projection (4h) and k, v are materialised at full width (read 2 kv_dim, write 2h,
        # each); SwiGLU as silu(gate) * up moves 4 + 6 = 10 per element of ffn_dim.
        expand = 4 * h + 4 * (h + arch.kv_dim) if arch.kv_dim < h else 0.0
        other = sp * (2 * 36 * h + 2 * 6 * h) + (36 * 2 * h + 16 * h + expand + 10 * f) / t
    if layout.flash_attention:
        core = 0.0
    else:
        # Unfused attention: scale-mask-softmax reads and writes the s^2 scores per head; GPT
        # then applies dropout (read, write, 1-byte mask).
        core = heads * s * (4 + (5 if arch.gpt else 0))
    return core, other


@dataclass(frozen=True)
class LayerCost:
    """Seconds one GPU spends on one layer for one micro-batch."""

    fwd_compute: float       # GEMMs + attention + element-wise, forward
    bwd_compute: float       # the same, backward
    recompute: float         # extra forward work redone in the backward pass
    fwd_comm: float          # TP collectives of the forward pass (always exposed)
    bwd_comm_hidden: float   # TP collectives of the backward that can run under GEMMs
    bwd_comm_exposed: float  # TP collectives of the backward that cannot
    overlap_window: float    # GEMM time that the hideable backward collectives can run under
    recompute_comm: float    # the forward's collectives again, under full recomputation


def layer_cost(arch: Architecture, cluster: Cluster, layout: PlanLayout) -> LayerCost:
    gpu, t, s, b = cluster.gpu, layout.tp, layout.seq_len, layout.micro_batch
    tokens = b * s
    gemm_rate = gpu.peak_flops * gpu.gemm_efficiency
    mem_rate = gpu.hbm_bandwidth * MEMORY_EFFICIENCY

    gemm_fwd = 2 * tokens * arch.layer_matmul_params / t / gemm_rate
    col_gemm_fwd = 2 * tokens * (arch.qkv_params + arch.mlp_in_params) / t / gemm_rate

    # QK^T and PV: 4 s h FLOPs per token forward. Flash kernels skip the masked half of a causal
    # product and count their backward (which recomputes P) as 2.5 x forward; the unfused path
    # computes the whole square as batched GEMMs and its backward is 2 x forward.
    attn_flops = 4 * tokens * s * arch.dim / t
    if layout.flash_attention:
        attn_rate = gpu.peak_flops * gpu.attention_efficiency
        attn_fwd, attn_bwd = 0.5 * attn_flops / attn_rate, 2.5 * 0.5 * attn_flops / attn_rate
    else:
        attn_fwd, attn_bwd = attn_flops / gemm_rate, 2 * attn_flops / gemm_rate

    core_bytes, other_bytes = elementwise_bytes_per_token(arch, layout)
    core_fwd = tokens * core_bytes / mem_rate
    other_fwd = tokens * other_bytes / mem_rate

    fwd_compute = gemm_fwd + attn_fwd + core_fwd + other_fwd
    bwd_compute = 2 * gemm_fwd + attn_bwd + 1.5 * (core_fwd + other_fwd)

    # Tensor parallelism: per layer, two all-reduces forward (or, under SP, two all-gathers and
    # two reduce-scatters: the same bytes). Backward without SP: two all-reduces of the column-
    # parallel linears' input gradients, issued asynchronously under their weight-gradient GEMMs.
    # Backward with SP: per column-parallel linear an all-gather of its input (SP stores it
    # sharded) and a reduce-scatter of its input gradient, both under its GEMMs; per row-parallel
    # linear an all-gather of the output gradient that the GEMM waits for.
    act = tokens * arch.dim * 2  # bf16 activation of one micro-batch
    bw, lat = group_bus_bandwidth(cluster, t, 1)
    ag = ring_time(act, t, bw, lat, "all_gather")
    rs = ring_time(act, t, bw, lat, "reduce_scatter")
    ar = ring_time(act, t, bw, lat, "all_reduce")
    if layout.sequence_parallel:
        fwd_comm = 2 * ag + 2 * rs
        bwd_hidden, bwd_exposed = 2 * (ag + rs), 2 * ag
    else:
        fwd_comm = 2 * ar
        bwd_hidden, bwd_exposed = 2 * ar, 0.0

    if layout.recompute == "full":
        recompute, recompute_comm = fwd_compute, fwd_comm
    elif layout.recompute == "selective" and not layout.flash_attention:
        # Korthikanti et al. 2022 §4.2: redo the attention core (QK^T, softmax, dropout, PV).
        recompute, recompute_comm = attn_fwd + core_fwd, 0.0
    elif layout.recompute == "elementwise":
        # The trainer's selective policy: norms, rotary and SwiGLU run again (their forward
        # bytes, residual adds included: a slight overcount); under SP the all-gathers feeding
        # the column-parallel GEMMs run again too, since only matmul outputs are kept.
        recompute = other_fwd
        recompute_comm = 2 * ag if layout.sequence_parallel else 0.0
    else:  # nothing stored is recomputed (flash attention's own recomputation is in attn_bwd)
        recompute, recompute_comm = 0.0, 0.0

    return LayerCost(fwd_compute, bwd_compute, recompute, fwd_comm, bwd_hidden, bwd_exposed,
                     2 * col_gemm_fwd, recompute_comm)
