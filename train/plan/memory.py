"""Bytes per GPU: weights, gradients and optimizer state of a pipeline stage, and the activations
a layer keeps until its backward pass."""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import FIXED_MEMORY_OVERHEAD, FRAGMENTATION
from .layout import PlanLayout
from .shapes import Architecture


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the most loaded pipeline stage."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.overhead


def activation_bytes_per_token(arch: Architecture, layout: PlanLayout, recompute: str) -> float:
    """Bytes one layer keeps per token of a micro-batch until its backward pass, on one GPU.

    Korthikanti et al. 2022 §4 (Table 2) for GPT: sbh(34 + 5as/h) without recomputation, the
    34 split as 10 replicated + 24 sharded over TP, all 34 sharded under SP, the 5as/h attention
    term gone under selective recomputation; 2sbh (layer input only) under full recomputation.
    The same accounting for Llama: SwiGLU keeps gate, up and their product (3 x 2f), grouped-
    query attention keeps k and v at kv_dim, flash attention keeps q, k, v, the output and the
    fp32 log-sum-exp instead of the s^2 terms.
    """
    h, f, t, s = arch.dim, arch.ffn_dim, layout.tp, layout.seq_len
    sp = 1 / t if layout.sequence_parallel else 1.0
    if recompute == "full":
        return 2 * h * sp
    if arch.gpt:
        # Replicated without SP: two LayerNorm inputs, the QKV and fc1 inputs, two dropout masks.
        kept = sp * (2 * 2 * h + 2 * 2 * h + 2 * h)
        # Sharded: q, k (4h), v (2h), projection input (2h), GeLU input and output (4f).
        kept += (8 * h + 4 * f) / t
    else:
        # Replicated without SP: two RMSNorm inputs, the attention and MLP inputs.
        kept = sp * (4 * 2 * h)
        # Sharded: q, k, v, attention output; gate, up and SwiGLU output.
        kept += (2 * h + 4 * arch.kv_dim + 2 * h + 6 * f) / t
        if not layout.fused_kernels:
            # Reference ops also keep fp32 copies (the norms' upcast inputs, the complex q and
            # k of the rotary product) and k, v at full width for the attention kernel.
            kept += sp * 2 * 4 * h + (8 * h + 4 * (h - arch.kv_dim)) / t
    if recompute == "elementwise":
        # The trainer's selective policy keeps matmul and attention outputs but recomputes the
        # two norm outputs (the attention and MLP inputs) and the activation output.
        kept -= sp * 2 * 2 * h + 2 * f / t
    heads = arch.n_heads / t
    if layout.flash_attention:
        kept += 4 * heads  # fp32 log-sum-exp per head
    elif recompute == "none":
        # Softmax output (2as), and for GPT the dropout mask (as) and dropout output (2as).
        kept += heads * s * (5 if arch.gpt else 2)
    return kept


def stage_weights(arch: Architecture, layout: PlanLayout) -> tuple[float, float]:
    """Parameters held by one GPU of the first and of the last pipeline stage.

    Megatron puts the embedding on the first stage and the head on the last; a tied GPT
    embedding is held by both. With one stage, both sit on it.
    """
    t, p = layout.tp, layout.pp
    layers = arch.n_layers // p * arch.layer_params / t
    if p == 1:
        both = layers + (arch.embedding_params + arch.head_params) / t
        return both, both
    return layers + arch.embedding_params / t, layers + arch.vocab_size * arch.dim / t


def stage_memory(arch: Architecture, layout: PlanLayout) -> Memory:
    t, p, d, v = layout.tp, layout.pp, layout.dp, layout.virtual_stages
    m = layout.n_microbatches
    layers = arch.n_layers // p
    tokens = layout.micro_batch * layout.seq_len
    per_layer = activation_bytes_per_token(arch, layout, layout.recompute) * tokens
    # 1F1B: the first stage runs p forwards before its first backward, so it holds p
    # micro-batches of its layers, i.e. L layers' worth. Interleaving with v chunks holds
    # L (1 + (p - 1) / (p v)) (Korthikanti et al. 2022 §4.2.3). The last stage holds one.
    if v == 1:
        first_layers = min(m, p) * layers
    else:
        first_layers = min(m * layers, arch.n_layers * (1 + (p - 1) / (p * v)))
    acts_first = per_layer * first_layers
    acts_last = per_layer * layers
    if layout.recompute == "full":  # the layer being recomputed briefly holds everything
        transient = activation_bytes_per_token(arch, layout, "none") * tokens
        acts_first, acts_last = acts_first + transient, acts_last + transient
    logits = tokens * arch.vocab_size / t * (2 + 4)  # bf16 logits and the fp32 loss input
    acts_last += logits
    if p == 1:
        acts_first = acts_last = max(acts_first, acts_last - logits) + logits

    w_first, w_last = stage_weights(arch, layout)

    layer_weights = arch.layer_params / t

    def stage(weights: float, acts: float) -> Memory:
        if layout.fsdp:
            # Sharded fp32 parameters (the master copy) and gradients, Adam's two moments (8 B);
            # gathered bf16 weights: the whole stage when pipelined (kept gathered between a
            # micro-batch's forward and backward), else the running and the prefetched layer;
            # one layer's unsharded gradients before their reduce-scatter.
            gathered = weights if p > 1 else 2 * layer_weights
            params = 4 * weights / d + 2 * gathered
            grads = layout.grad_bytes * (weights / d + layer_weights)
            opt = 8 * weights / d
        else:
            # bf16 weights; gradients accumulated at grad_bytes; fp32 master copy + Adam's two
            # moments (12 B/param), sharded over DP by the distributed optimizer (ZeRO-1).
            opt = 12 * (weights / d if layout.distributed_optimizer else weights)
            params, grads = 2 * weights, layout.grad_bytes * weights
        overhead = FIXED_MEMORY_OVERHEAD + FRAGMENTATION * (params + grads + opt + acts)
        return Memory(params, grads, opt, acts, overhead)

    first, last = stage(w_first, acts_first), stage(w_last, acts_last)
    return first if first.total >= last.total else last
