"""Cluster cost model for training Llama-2-family transformers with tensor, pipeline and data parallelism.

    python -m train.plan --model llama2-70b --gpu A100-80 --nodes 16 --tp 8 --pp 8 --dp 2 \\
        --micro-batch 2 --global-batch 512 --seq-len 4096 --recompute selective
    python -m train.plan --model llama2-70b --gpu H100 --nodes 8 --global-batch 512 --search
    python -m train.plan --validate            # published runs, predicted against measured

The model walks one training step the way a Megatron-style 1F1B pipeline executes it:

* per transformer layer and micro-batch: GEMM FLOPs at a fixed fraction of the GPU's peak,
  attention FLOPs at the attention kernel's fraction, element-wise traffic (norms, residual adds,
  rotary, SwiGLU/GeLU, unfused softmax) at a fraction of HBM bandwidth, and the tensor-parallel
  collectives over NVLink; activation recomputation adds its share of the forward again;
* the slowest pipeline stage (the one holding the LM head) sets the pace: a step takes
  (m + (p - 1) / v) micro-batch slots, the (p - 1) / v extra being the pipeline bubble;
* then the data-parallel gradient reduction over InfiniBand and the memory-bound Adam step.

Every number it uses is a physical constant (data sheets) or one of a handful of efficiencies
shared by all runs (GPU.gemm_efficiency, GPU.attention_efficiency, MEMORY_EFFICIENCY,
LINK_EFFICIENCY); each is documented where it is defined, with its source. There are no per-run
corrections: PUBLISHED_RUNS lists each run's own published layout and nothing else, and
`--validate` (and tests/train/test_plan.py) checks every prediction against the published figure.

Units: seconds, bytes, FLOP; memory is reported in GiB (2**30 bytes, as nvidia-smi and
torch.cuda report it) under the name `memory_gb_per_gpu`.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass
from typing import Any, Mapping

GiB = 2**30

# ---------------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """One accelerator and the links it sees. Bandwidths are per GPU and per direction."""

    name: str
    peak_flops: float        # dense bf16 tensor-core FLOP/s (data sheet)
    hbm_bytes: float         # usable device memory, as nvidia-smi reports it
    hbm_bandwidth: float     # B/s (data sheet)
    nvlink_bandwidth: float  # B/s per direction, intra-node (data sheet)
    ib_bandwidth: float      # B/s per direction, the GPU's own InfiniBand NIC (DGX-style node)
    # Fraction of peak that the bf16 GEMMs of a transformer layer reach inside a training step.
    # A100: chosen so that this model reproduces the five per-layer timings that Korthikanti et
    # al. 2022 (arXiv 2205.05198, Table 4) measured on one layer of their 22B GPT (h 6144, 64
    # heads, TP 8, micro-batch 4, seq 2048; no recomputation, SP, full, selective, selective +
    # SP): with 0.66 every forward and backward time lands within 4% (tests/train/test_plan.py
    # checks it). That is a single-layer measurement, independent of the end-to-end runs in
    # PUBLISHED_RUNS. H100/H200: an 8192^3 bf16 GEMM runs at 798 TFLOP/s = 0.81 of peak
    # (CONVENTIONS.md §5, measured). Assuming layer GEMMs keep the same share of a large square
    # GEMM as on the A100 (0.66 against roughly 0.86 there) gives 0.81 x 0.77 = 0.62. This is an
    # assumption: no published H100 run checks it yet (docs/plan.md).
    gemm_efficiency: float
    # Fraction of peak for fused (flash) attention, its FLOPs counted the way FlashAttention-2
    # counts them (causal half only; backward = 2.5 x forward). The FlashAttention-2 paper
    # (Dao 2023, arXiv 2307.08691) reports 50-73% of peak on the A100, the backward at the low
    # end: 0.55. On the H100 the same kernel (what SDPA's flash backend runs) reaches 35-40% of
    # peak (FlashAttention-3 paper, Shah et al. 2024, arXiv 2407.08608): 0.35.
    attention_efficiency: float


GPUS: dict[str, GPU] = {
    # A100 SXM4: 312 TFLOP/s bf16 dense; 1555 GB/s (40GB) and 2039 GB/s (80GB) HBM2e; NVLink 3
    # 600 GB/s bidirectional = 300 GB/s per direction; DGX A100 has one 200 Gb/s HDR NIC per GPU.
    "A100-40": GPU("A100-40", 312e12, 40 * GiB, 1.555e12, 300e9, 25e9, 0.66, 0.55),
    "A100-80": GPU("A100-80", 312e12, 80 * GiB, 2.039e12, 300e9, 25e9, 0.66, 0.55),
    # H100 SXM5 80GB (79.6 GiB usable): 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3; NVLink 4 900 GB/s
    # bidirectional; DGX H100 has one 400 Gb/s NDR NIC per GPU.
    "H100": GPU("H100", 989e12, 79.6 * GiB, 3.35e12, 450e9, 50e9, 0.62, 0.35),
    # H200 SXM: the H100 die with 141 GB (140.4 GiB usable) HBM3e at 4.8 TB/s.
    "H200": GPU("H200", 989e12, 140.4 * GiB, 4.8e12, 450e9, 50e9, 0.62, 0.35),
}

# Fraction of HBM bandwidth that element-wise kernels reach. CONVENTIONS.md §5 measured
# device-to-device copies at 3.0 of 3.35 TB/s (H100) and 4.3 of 4.8 TB/s (H200): 0.90; kernels
# that read two or three streams and write one land a little lower.
MEMORY_EFFICIENCY = 0.80
# Fraction of link bandwidth that NCCL's large all-reduce / all-gather / reduce-scatter reach as
# "bus bandwidth" (nccl-tests' busbw): about 230 of 300 GB/s on a DGX A100's NVLink and 20-22
# of 25 GB/s per HDR NIC across nodes.
LINK_EFFICIENCY = 0.78
# Fixed start-up cost per collective or point-to-point transfer (ring latency, kernel launch).
NVLINK_LATENCY = 20e-6
IB_LATENCY = 40e-6
# Memory that is not tensors: CUDA context, NCCL buffers, cuBLAS workspaces (a fixed part), and
# the caching allocator's fragmentation (a proportional part).
FIXED_MEMORY_OVERHEAD = 2.0 * GiB
FRAGMENTATION = 0.05
# Megatron's default gradient bucket (40M elements): with DP overlap, the last bucket's reduction
# is what remains exposed after the backward pass ends.
DP_BUCKET_ELEMENTS = 40e6


# ---------------------------------------------------------------------------------------------
# Model architectures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """Shape of a decoder-only transformer. Field names follow model.LlamaConfig.

    family "llama": RMSNorm, rotary positions, bias-free SwiGLU MLP (3 matrices), untied head,
    no dropout. family "gpt": Megatron's GPT (LayerNorm, biases, learned positions, GeLU MLP with
    2 matrices, dropout 0.1, embedding tied to the head), for validating against Megatron runs.
    """

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int = 4096
    family: str = "llama"

    def __post_init__(self):
        for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"model {f} must be a positive int, got {v!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"model dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.family not in ("llama", "gpt"):
            raise ValueError(f"model family must be 'llama' or 'gpt', got {self.family!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any, name: str = "custom") -> "Architecture":
        """From a preset dict or any object with LlamaConfig's attribute names."""
        get = d.get if isinstance(d, Mapping) else (lambda k, default=None: getattr(d, k, default))
        missing = [k for k in ("dim", "n_layers", "n_heads") if get(k) is None]
        if missing:
            raise ValueError(f"model dict is missing {missing}; it needs dim, n_layers, n_heads "
                             "and optionally n_kv_heads, ffn_dim, vocab_size, max_seq_len, family")
        n_kv = get("n_kv_heads") or get("n_heads")
        return cls(name=str(get("name", name) or name), dim=get("dim"), n_layers=get("n_layers"),
                   n_heads=get("n_heads"), n_kv_heads=n_kv, ffn_dim=get("ffn_dim", 11008),
                   vocab_size=get("vocab_size", 32000), max_seq_len=get("max_seq_len", 4096),
                   family=get("family", "llama"))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def gpt(self) -> bool:
        return self.family == "gpt"

    # Parameters, split the way the layers own them.
    @property
    def qkv_params(self) -> int:
        return self.dim * (self.dim + 2 * self.kv_dim)

    @property
    def out_params(self) -> int:
        return self.dim * self.dim

    @property
    def mlp_in_params(self) -> int:  # gate and up (SwiGLU) or fc1 (GeLU): column-parallel
        return (1 if self.gpt else 2) * self.dim * self.ffn_dim

    @property
    def mlp_out_params(self) -> int:  # down / fc2: row-parallel
        return self.dim * self.ffn_dim

    @property
    def layer_matmul_params(self) -> int:
        return self.qkv_params + self.out_params + self.mlp_in_params + self.mlp_out_params

    @property
    def layer_params(self) -> int:
        if self.gpt:  # biases of the four linears (3h + h + f + h) and two LayerNorms (4h)
            return self.layer_matmul_params + 9 * self.dim + self.ffn_dim
        return self.layer_matmul_params + 2 * self.dim  # two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        pos = self.max_seq_len * self.dim if self.gpt else 0
        return self.vocab_size * self.dim + pos

    @property
    def head_params(self) -> int:
        """Output projection weights (a separate tensor unless tied to the embedding)."""
        return 0 if self.gpt else self.vocab_size * self.dim

    @property
    def n_params(self) -> int:
        """N_total: every parameter once (a tied embedding counts once)."""
        final_norm = 2 * self.dim if self.gpt else self.dim
        return self.n_layers * self.layer_params + self.embedding_params + self.head_params + final_norm

    @property
    def n_params_non_embedding(self) -> int:
        """N_non_embedding of the MFU formula: every weight used in a matmul, the output head
        included, the input embedding (a lookup) and position table excluded."""
        return self.n_params - self.embedding_params + self.vocab_size * self.dim - self.head_params

    def model_flops_per_token(self, seq_len: int) -> float:
        """CONVENTIONS §5 primary MFU formula: 6 N_non_embedding + 12 n_layers dim seq."""
        return 6 * self.n_params_non_embedding + 12 * self.n_layers * self.dim * seq_len

    def paper_flops_per_token(self) -> float:
        """The Meditron paper's formula: 6 N_total."""
        return 6 * self.n_params


_LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000)
_LLAMA2_13B = dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, vocab_size=32000)
_LLAMA2_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=32000)


def _gpt(name: str, heads: int, dim: int, layers: int) -> Architecture:
    # Megatron's GPT runs: 4h GeLU MLP, vocabulary 51,200, sequence 2048 (Narayanan et al. 2021 §5.1).
    return Architecture(name, dim, layers, heads, heads, 4 * dim, 51200, 2048, "gpt")


ARCHITECTURES: dict[str, Architecture] = {
    "llama2-7b": Architecture("llama2-7b", **_LLAMA2_7B),
    "llama2-13b": Architecture("llama2-13b", **_LLAMA2_13B),
    "llama2-70b": Architecture("llama2-70b", **_LLAMA2_70B),
    # Meditron's continued pretraining kept the Llama-2 architectures.
    "meditron-7b": Architecture("meditron-7b", **_LLAMA2_7B),
    "meditron-70b": Architecture("meditron-70b", **_LLAMA2_70B),
    # Megatron-LM's GPT family, for the published runs: Narayanan et al. 2021 Table 1 (heads,
    # hidden, layers) and Korthikanti et al. 2022 Table 3 (22B and GPT-3 175B).
    **{name: _gpt(name, heads, dim, layers) for name, heads, dim, layers in (
        ("gpt-1.7b", 24, 2304, 24), ("gpt-3.6b", 32, 3072, 30), ("gpt-7.5b", 32, 4096, 36),
        ("gpt-18b", 48, 6144, 40), ("gpt-22b", 64, 6144, 48), ("gpt-39b", 64, 8192, 48),
        ("gpt-76b", 80, 10240, 60), ("gpt-145b", 96, 12288, 80), ("gpt3-175b", 96, 12288, 96),
        ("gpt-310b", 128, 16384, 96), ("gpt-530b", 128, 20480, 105), ("gpt-1t", 160, 25600, 128))},
}


def get_architecture(model: str | Mapping[str, Any] | Architecture | Any) -> Architecture:
    """A preset name, an Architecture, a preset dict, or a LlamaConfig-like object."""
    if isinstance(model, Architecture):
        return model
    if isinstance(model, str):
        if model not in ARCHITECTURES:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(ARCHITECTURES)} "
                             "or pass a JSON dict with dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size")
        return ARCHITECTURES[model]
    return Architecture.from_dict(model)


# ---------------------------------------------------------------------------------------------
# Cluster and layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    nodes: int
    gpus_per_node: int = 8

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


RECOMPUTE = ("none", "selective", "full")
OVERLAP = ("none", "tp", "tp+dp")


@dataclass(frozen=True)
class Layout:
    """How one training step is laid out on the cluster, and the software features it uses.

    Rank order is Megatron's: tensor-parallel ranks are adjacent (inside a node), then data
    parallel, then pipeline stages.
    """

    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    seq_len: int
    recompute: str = "selective"     # none | selective (attention core) | full (whole layer)
    sequence_parallel: bool = True   # Megatron SP: norms/dropout sharded over TP, AG/RS instead of AR
    distributed_optimizer: bool = True  # ZeRO-1: fp32 master + Adam moments sharded over DP
    flash_attention: bool = True     # fused attention: no s^2 activations, causal blocks skipped
    # Norms, rotary and the MLP activation as fused kernels (one read, one write per tensor), or
    # as Meta's reference Llama code runs them: chains of eager PyTorch ops with fp32 round
    # trips, and layout copies around the attention kernel (see _elementwise_bytes_per_token).
    fused_kernels: bool = True
    virtual_stages: int = 1          # interleaved 1F1B: model chunks per pipeline rank
    grad_bytes: int = 4              # fp32 gradient accumulation (Megatron's default under bf16)
    # What communication hides under compute. "tp": backward TP collectives of the column-parallel
    # linears run under their GEMMs (Megatron's async grad all-reduce / SP all-gather); DP gradient
    # reduction runs after the last micro-batch (Megatron before --overlap-grad-reduce, 2021-2023).
    # "tp+dp": also the DP reduction under the last micro-batch's backward. "none": nothing hides.
    overlap: str = "tp"

    @property
    def n_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)


def validate(arch: Architecture, cluster: Cluster, layout: Layout) -> None:
    """Raise ValueError, naming the flag, for any layout that cannot run."""
    L = layout
    for name in ("tp", "pp", "dp", "micro_batch", "global_batch", "seq_len", "virtual_stages"):
        v = getattr(L, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cluster.nodes <= 0 or cluster.gpus_per_node <= 0:
        raise ValueError(f"--nodes and --gpus-per-node must be positive integers, got {cluster.nodes} and "
                         f"{cluster.gpus_per_node}")
    if L.tp * L.pp * L.dp != cluster.world_size:
        raise ValueError(f"--tp x --pp x --dp = {L.tp} x {L.pp} x {L.dp} = {L.tp * L.pp * L.dp} must equal "
                         f"--nodes x --gpus-per-node = {cluster.nodes} x {cluster.gpus_per_node} "
                         f"= {cluster.world_size}")
    if L.global_batch % (L.micro_batch * L.dp):
        raise ValueError(f"--global-batch ({L.global_batch}) must be divisible by --micro-batch x --dp "
                         f"= {L.micro_batch} x {L.dp} = {L.micro_batch * L.dp}")
    if arch.n_layers % (L.pp * L.virtual_stages):
        what = "--pp" if L.virtual_stages == 1 else "--pp x --virtual-stages"
        raise ValueError(f"the model's {arch.n_layers} layers must be divisible by {what} ({L.pp * L.virtual_stages})")
    if arch.n_heads % L.tp:
        raise ValueError(f"the model's {arch.n_heads} attention heads must be divisible by --tp ({L.tp})")
    if arch.n_kv_heads % L.tp:
        raise ValueError(f"the model's {arch.n_kv_heads} key/value heads must be divisible by --tp ({L.tp})")
    if arch.ffn_dim % L.tp:
        raise ValueError(f"the model's ffn_dim ({arch.ffn_dim}) must be divisible by --tp ({L.tp})")
    if L.sequence_parallel and L.tp > 1 and L.seq_len % L.tp:
        raise ValueError(f"--seq-len ({L.seq_len}) must be divisible by --tp ({L.tp}) under sequence parallelism")
    if L.recompute not in RECOMPUTE:
        raise ValueError(f"--recompute must be one of {RECOMPUTE}, got {L.recompute!r}")
    if L.overlap not in OVERLAP:
        raise ValueError(f"--overlap must be one of {OVERLAP}, got {L.overlap!r}")
    if L.virtual_stages > 1 and (L.pp == 1 or L.n_microbatches % L.pp):
        raise ValueError(f"--virtual-stages > 1 needs --pp > 1 and a micro-batch count ({L.n_microbatches}) "
                         f"divisible by --pp ({L.pp})")
    if L.grad_bytes not in (2, 4):
        raise ValueError(f"grad_bytes must be 2 (bf16) or 4 (fp32), got {L.grad_bytes!r}")


# ---------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------


def _group_bus_bandwidth(cluster: Cluster, size: int, stride: int) -> tuple[float, float]:
    """(bus bandwidth, latency) of a collective over `size` ranks spaced `stride` apart.

    Inside one node a ring runs over NVLink. Across nodes each node's k members of the group
    drive k NICs of their own, so the ring's bus bandwidth is k x the per-GPU NIC rate, capped
    by NVLink (what NCCL reaches across DGX nodes: about 190 GB/s with all 8 GPUs in the group).
    """
    gpn, gpu = cluster.gpus_per_node, cluster.gpu
    if size * stride <= gpn:
        return gpu.nvlink_bandwidth * LINK_EFFICIENCY, NVLINK_LATENCY
    members_per_node = max(1, min(size, gpn // stride))
    bw = min(gpu.nvlink_bandwidth, members_per_node * gpu.ib_bandwidth)
    return bw * LINK_EFFICIENCY, IB_LATENCY


def _ring_time(nbytes: float, ranks: int, bw: float, latency: float, kind: str) -> float:
    """Time of a ring collective on a tensor of `nbytes` (the full, gathered size)."""
    if ranks == 1:
        return 0.0
    share = (ranks - 1) / ranks
    factor = {"all_reduce": 2 * share, "all_gather": share, "reduce_scatter": share}[kind]
    return nbytes * factor / bw + latency


# ---------------------------------------------------------------------------------------------
# Per-layer costs
# ---------------------------------------------------------------------------------------------


def _elementwise_bytes_per_token(arch: Architecture, layout: Layout) -> tuple[float, float]:
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


def _layer_cost(arch: Architecture, cluster: Cluster, layout: Layout) -> LayerCost:
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

    core_bytes, other_bytes = _elementwise_bytes_per_token(arch, layout)
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
    bw, lat = _group_bus_bandwidth(cluster, t, 1)
    ag = _ring_time(act, t, bw, lat, "all_gather")
    rs = _ring_time(act, t, bw, lat, "reduce_scatter")
    ar = _ring_time(act, t, bw, lat, "all_reduce")
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
    else:  # nothing stored is recomputed (flash attention's own recomputation is in attn_bwd)
        recompute, recompute_comm = 0.0, 0.0

    return LayerCost(fwd_compute, bwd_compute, recompute, fwd_comm, bwd_hidden, bwd_exposed,
                     2 * col_gemm_fwd, recompute_comm)


def _activation_bytes_per_token(arch: Architecture, layout: Layout, recompute: str) -> float:
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
    heads = arch.n_heads / t
    if layout.flash_attention:
        kept += 4 * heads  # fp32 log-sum-exp per head
    elif recompute == "none":
        # Softmax output (2as), and for GPT the dropout mask (as) and dropout output (2as).
        kept += heads * s * (5 if arch.gpt else 2)
    return kept


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Prediction:
    """One training step, predicted. Times are seconds per step on the slowest GPU.

    step_time_s = compute_s + tp_comm_exposed_s + pp_comm_s + bubble_s + dp_comm_exposed_s
                  + optimizer_s
    """

    model: str
    gpu: str
    nodes: int
    gpus_per_node: int
    layout: Layout
    memory: Memory
    capacity_bytes: float
    n_microbatches: int
    bubble_fraction: float          # (p - 1) / (v m): idle micro-batch slots per useful one
    compute_s: float                # forward, backward and recomputation of every micro-batch
    bubble_s: float                 # pipeline fill and drain
    tp_comm_s: float                # every tensor-parallel collective of the step
    tp_comm_exposed_s: float        # the part left on the critical path under layout.overlap
    tp_comm_exposed_no_overlap_s: float
    tp_comm_exposed_overlap_s: float
    pp_comm_s: float                # point-to-point sends between pipeline stages
    dp_comm_s: float                # data-parallel gradient reduction (+ weight all-gather)
    dp_comm_exposed_s: float
    dp_comm_exposed_overlap_s: float
    optimizer_s: float
    step_time_s: float              # under layout.overlap
    step_time_no_overlap_s: float   # nothing hidden
    step_time_overlap_s: float      # TP backward and DP reduction hidden where they can be
    tokens_per_s: float
    mfu: float                      # 6 N_total per token (the Meditron paper's formula)
    mfu_named: float                # (6 N_non_embedding + 12 L d s) per token (CONVENTIONS §5)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity_bytes

    @property
    def memory_gb_per_gpu(self) -> float:
        return self.memory.total / GiB

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / (self.nodes * self.gpus_per_node)

    def to_dict(self) -> dict:
        m = self.memory
        return {
            "model": self.model, "gpu": self.gpu, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
            **dataclasses.asdict(self.layout),
            "fits": self.fits,
            "memory_gb_per_gpu": self.memory_gb_per_gpu,
            "memory_capacity_gb": self.capacity_bytes / GiB,
            "memory_breakdown_gb": {"parameters": m.parameters / GiB, "gradients": m.gradients / GiB,
                                    "optimizer": m.optimizer / GiB, "activations": m.activations / GiB,
                                    "overhead": m.overhead / GiB},
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("model", "gpu", "nodes", "gpus_per_node", "layout", "memory", "capacity_bytes")},
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
        }


def mfu(tokens_per_s: float, flops_per_token: float, n_gpus: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: useful FLOP/s over the cluster's peak FLOP/s."""
    return tokens_per_s * flops_per_token / (n_gpus * peak_flops)


def _stage_weights(arch: Architecture, layout: Layout) -> tuple[float, float]:
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


def _memory(arch: Architecture, layout: Layout) -> Memory:
    t, p, d, v = layout.tp, layout.pp, layout.dp, layout.virtual_stages
    m = layout.n_microbatches
    layers = arch.n_layers // p
    tokens = layout.micro_batch * layout.seq_len
    per_layer = _activation_bytes_per_token(arch, layout, layout.recompute) * tokens
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
        transient = _activation_bytes_per_token(arch, layout, "none") * tokens
        acts_first, acts_last = acts_first + transient, acts_last + transient
    logits = tokens * arch.vocab_size / t * (2 + 4)  # bf16 logits and the fp32 loss input
    acts_last += logits
    if p == 1:
        acts_first = acts_last = max(acts_first, acts_last - logits) + logits

    w_first, w_last = _stage_weights(arch, layout)

    def stage(weights: float, acts: float) -> Memory:
        # bf16 weights; gradients accumulated at grad_bytes; fp32 master copy + Adam's two
        # moments (12 B/param), sharded over DP by the distributed optimizer.
        opt = 12 * (weights / d if layout.distributed_optimizer else weights)
        params, grads = 2 * weights, layout.grad_bytes * weights
        overhead = FIXED_MEMORY_OVERHEAD + FRAGMENTATION * (params + grads + opt + acts)
        return Memory(params, grads, opt, acts, overhead)

    first, last = stage(w_first, acts_first), stage(w_last, acts_last)
    return first if first.total >= last.total else last


def predict_layout(arch: Architecture, cluster: Cluster, layout: Layout) -> Prediction:
    """The cost model. See the module docstring for its structure."""
    validate(arch, cluster, layout)
    gpu, t, p, d, v = cluster.gpu, layout.tp, layout.pp, layout.dp, layout.virtual_stages
    m = layout.n_microbatches
    layers = arch.n_layers // p
    tokens = layout.micro_batch * layout.seq_len
    gemm_rate = gpu.peak_flops * gpu.gemm_efficiency
    mem_rate = gpu.hbm_bandwidth * MEMORY_EFFICIENCY

    c = _layer_cost(arch, cluster, layout)
    # The last stage also runs the head (logits GEMM forward, two backward) and the fp32 loss
    # over the logits (about 20 B per logit, forward and backward): it is the slowest stage
    # and sets the pipeline's pace.
    head = 3 * 2 * tokens * arch.dim * arch.vocab_size / t / gemm_rate
    head += 20 * tokens * arch.vocab_size / t / mem_rate
    compute_mb = layers * (c.fwd_compute + c.bwd_compute + c.recompute) + head

    tp_all_mb = layers * (c.fwd_comm + c.recompute_comm + c.bwd_comm_exposed + c.bwd_comm_hidden)
    tp_overlap_mb = layers * (c.fwd_comm + c.recompute_comm + c.bwd_comm_exposed
                              + max(0.0, c.bwd_comm_hidden - c.overlap_window))

    # Pipeline point-to-point: per micro-batch and model chunk, one activation forward and one
    # gradient back; Megatron sends the 1/t slice (scatter-gather, or SP's sharded sequence)
    # and the 1F1B schedule waits for it. The neighbouring stage is t x d ranks away.
    if p > 1:
        if t * d >= cluster.gpus_per_node:
            link, lat = gpu.ib_bandwidth * LINK_EFFICIENCY, IB_LATENCY
        else:
            link, lat = gpu.nvlink_bandwidth * LINK_EFFICIENCY, NVLINK_LATENCY
        p2p_mb = 2 * v * (tokens * arch.dim * 2 / t / link + lat)
    else:
        p2p_mb = 0.0

    # Data parallelism: the distributed optimizer reduce-scatters the gradients and all-gathers
    # the updated bf16 weights; plain DP all-reduces the gradients. DP ranks sit t apart.
    w_first, w_last = _stage_weights(arch, layout)
    weights = max(w_first, w_last)
    if d > 1:
        bw, lat = _group_bus_bandwidth(cluster, d, t)
        grads = weights * layout.grad_bytes
        if layout.distributed_optimizer:
            dp_s = (_ring_time(grads, d, bw, lat, "reduce_scatter")
                    + _ring_time(2 * weights, d, bw, lat, "all_gather"))
        else:
            dp_s = _ring_time(grads, d, bw, lat, "all_reduce")
        # Overlapped, buckets reduce while the last micro-batch's backward runs; the last
        # bucket, and whatever does not fit under that backward, stays exposed.
        last_bucket = _ring_time(DP_BUCKET_ELEMENTS * layout.grad_bytes, d, bw, lat, "all_reduce")
        last_backward = layers * (c.bwd_compute + c.recompute)
        dp_overlap_s = max(min(dp_s, last_bucket), dp_s - last_backward)
    else:
        dp_s = dp_overlap_s = 0.0

    # Adam on the local shard: read gradient, fp32 master, m and v, write master, m, v and the
    # bf16 weight (30 B/param); clipping's norm and zeroing touch every local gradient.
    shard = weights / d if layout.distributed_optimizer else weights
    optimizer_s = (30 * shard + 2 * layout.grad_bytes * weights) / mem_rate

    slots_bubble = (p - 1) / v

    def step(tp_mb: float, dp: float) -> tuple[float, float]:
        slot = compute_mb + tp_mb + p2p_mb
        bubble = slots_bubble * slot
        return m * slot + bubble + dp + optimizer_s, bubble

    tp_mb = tp_all_mb if layout.overlap == "none" else tp_overlap_mb
    dp_exposed = dp_overlap_s if layout.overlap == "tp+dp" else dp_s
    step_s, bubble_s = step(tp_mb, dp_exposed)
    step_none, _ = step(tp_all_mb, dp_s)
    step_overlap, _ = step(tp_overlap_mb, dp_overlap_s)

    tps = layout.global_batch * layout.seq_len / step_s
    world = cluster.world_size
    return Prediction(
        model=arch.name, gpu=gpu.name, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node,
        layout=layout, memory=_memory(arch, layout), capacity_bytes=gpu.hbm_bytes,
        n_microbatches=m, bubble_fraction=slots_bubble / m,
        compute_s=m * compute_mb, bubble_s=bubble_s,
        tp_comm_s=m * tp_all_mb, tp_comm_exposed_s=m * tp_mb,
        tp_comm_exposed_no_overlap_s=m * tp_all_mb, tp_comm_exposed_overlap_s=m * tp_overlap_mb,
        pp_comm_s=m * p2p_mb,
        dp_comm_s=dp_s, dp_comm_exposed_s=dp_exposed, dp_comm_exposed_overlap_s=dp_overlap_s,
        optimizer_s=optimizer_s,
        step_time_s=step_s, step_time_no_overlap_s=step_none, step_time_overlap_s=step_overlap,
        tokens_per_s=tps,
        mfu=mfu(tps, arch.paper_flops_per_token(), world, gpu.peak_flops),
        mfu_named=mfu(tps, arch.model_flops_per_token(layout.seq_len), world, gpu.peak_flops),
    )


def _cluster(gpu: str | GPU, nodes: int, gpus_per_node: int) -> Cluster:
    for name, v in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"--nodes and --gpus-per-node must be positive integers, got {name} {v!r}")
    return Cluster(_get_gpu(gpu), nodes, gpus_per_node)


def _get_gpu(gpu: str | GPU) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu!r}; choose one of {sorted(GPUS)}")
    return GPUS[gpu]


def predict(model: str | Architecture | Mapping[str, Any], gpu: str | GPU, nodes: int, gpus_per_node: int = 8, *,
            tp: int = 1, pp: int = 1, dp: int | None = None, micro_batch: int = 1, global_batch: int = 512,
            seq_len: int | None = None, recompute: str = "selective", **features: Any) -> Prediction:
    """Predict one training step. dp defaults to the GPUs left over by tp x pp; `features` are the
    remaining Layout fields (sequence_parallel, distributed_optimizer, flash_attention, ...)."""
    arch = get_architecture(model)
    cluster = _cluster(gpu, nodes, gpus_per_node)
    if dp is None:
        if tp <= 0 or pp <= 0 or cluster.world_size % (tp * pp):
            raise ValueError(f"--nodes x --gpus-per-node = {cluster.world_size} is not divisible by "
                             f"--tp x --pp = {tp} x {pp}")
        dp = cluster.world_size // (tp * pp)
    layout = Layout(tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, global_batch=global_batch,
                    seq_len=arch.max_seq_len if seq_len is None else seq_len, recompute=recompute, **features)
    return predict_layout(arch, cluster, layout)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def search(model: str | Architecture | Mapping[str, Any], gpu: str | GPU, nodes: int, gpus_per_node: int = 8, *,
           global_batch: int = 512, seq_len: int | None = None, recompute: str | None = None,
           micro_batches: tuple[int, ...] = (1, 2, 4), **features: Any) -> list[Prediction]:
    """Every layout that fits, best predicted MFU first.

    tp: powers of two up to gpus_per_node (TP stays inside a node); pp: divisors of the layer
    count; dp: the GPUs left over; micro-batch 1, 2, 4; recompute: the one given, or else all
    three (under flash attention "none" keeps exactly what "selective" keeps, so only
    "selective" and "full"). Layouts that cannot run (divisibility) or do not fit are skipped.
    """
    arch = get_architecture(model)
    cluster = _cluster(gpu, nodes, gpus_per_node)
    world = cluster.world_size
    tps = [1 << i for i in range(gpus_per_node.bit_length()) if (1 << i) <= gpus_per_node]
    pps = [p for p in range(1, arch.n_layers + 1) if arch.n_layers % p == 0]
    if recompute is not None:
        modes: tuple[str, ...] = (recompute,)
    elif features.get("flash_attention", True):
        modes = ("selective", "full")
    else:
        modes = RECOMPUTE
    found = []
    for t, p, mb, rc in itertools.product(tps, pps, micro_batches, modes):
        if world % (t * p):
            continue
        layout = Layout(tp=t, pp=p, dp=world // (t * p), micro_batch=mb, global_batch=global_batch,
                        seq_len=arch.max_seq_len if seq_len is None else seq_len, recompute=rc, **features)
        try:
            pred = predict_layout(arch, cluster, layout)
        except ValueError:
            continue
        if pred.fits:
            found.append(pred)
    found.sort(key=lambda pr: (-pr.mfu, pr.memory.total))
    return found


# ---------------------------------------------------------------------------------------------
# Published runs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedRun:
    """A training run with published throughput, described by its own published layout only."""

    name: str
    source: str
    model: str
    gpu: str
    nodes: int
    layout: Layout
    published: str          # the figure as the source states it
    tokens_per_s: float     # the same figure, converted to tokens/s
    note: str = ""

    def predict(self) -> Prediction:
        return predict_layout(ARCHITECTURES[self.model], Cluster(GPUS[self.gpu], self.nodes, 8), self.layout)


def _megatron_tflops_to_tokens_per_s(model: str, n_gpus: int, tflops_per_gpu: float) -> float:
    """Narayanan et al. 2021 count F = 96 B s l h^2 (1 + s/6h + V/16lh) FLOPs per step (their
    eq. 3, full recomputation included): B s tokens take F / (n X) seconds."""
    a = ARCHITECTURES[model]
    s, l, h, vocab = a.max_seq_len, a.n_layers, a.dim, a.vocab_size
    flops_per_token = 96 * l * h * h * (1 + s / (6 * h) + vocab / (16 * l * h))
    return n_gpus * tflops_per_gpu * 1e12 / flops_per_token


def _published_runs() -> list[PublishedRun]:
    runs = [PublishedRun(
        "Meditron-70B", "Chen et al. 2023 (arXiv 2311.16079), Megatron-LLM", "meditron-70b", "A100-80", 16,
        # Megatron-LLM's documented Llama-2 flags (docs/guide/faq.md, examples/finetune.sh):
        # --use_flash_attn --sequence_parallel --recompute_granularity selective, no distributed
        # optimizer; its Llama ops are Meta's reference code (fused_kernels=False).
        Layout(tp=8, pp=8, dp=2, micro_batch=2, global_batch=512, seq_len=4096, recompute="selective",
               flash_attention=True, sequence_parallel=True, distributed_optimizer=False, fused_kernels=False),
        "40,200 tokens/s (42.3% MFU, 6 x 70e9 per token)", 40200.0)]

    # Korthikanti et al. 2022, Tables 3 and 5 ("present work": sequence parallelism + selective
    # recomputation, data parallel size 1), also the MFU table of the Megatron-LM README.
    for model, nodes, pp, gbs, mb, step, mfu_pub in (
            ("gpt-22b", 1, 1, 4, 4, 1.10, 41.5), ("gpt3-175b", 8, 8, 64, 1, 13.75, 51.4),
            ("gpt-530b", 35, 35, 280, 1, 37.83, 56.0), ("gpt-1t", 64, 64, 512, 1, 71.49, 56.3)):
        runs.append(PublishedRun(
            f"{model} (SP + selective)", "Korthikanti et al. 2022 (arXiv 2205.05198) Tables 3, 5; Megatron-LM README",
            model, "A100-80", nodes,
            Layout(tp=8, pp=pp, dp=1, micro_batch=mb, global_batch=gbs, seq_len=2048, recompute="selective",
                   flash_attention=False, sequence_parallel=True, distributed_optimizer=False),
            f"{step} s/iteration ({mfu_pub}% MFU)", gbs * 2048 / step))

    # Narayanan et al. 2021 Table 1 (weak scaling, full recomputation, fp16). Micro-batch sizes,
    # interleaving and DDP flavour from the paper's own launch script, examples/sc21/run_table_1.sh
    # in Megatron-LM: torch DDP (overlapped all-reduce) up to 18B, Megatron's local DDP beyond.
    table1 = (  # model, tp, pp, GPUs, batch, micro-batch, model chunks per rank, TFLOP/s per GPU
        ("gpt-1.7b", 1, 1, 32, 512, 16, 1, 137), ("gpt-3.6b", 2, 1, 64, 512, 16, 1, 138),
        ("gpt-7.5b", 4, 1, 128, 512, 16, 1, 142), ("gpt-18b", 8, 1, 256, 1024, 8, 1, 135),
        ("gpt-39b", 8, 2, 512, 1536, 4, 1, 138), ("gpt-76b", 8, 4, 1024, 1792, 2, 3, 140),
        ("gpt-145b", 8, 8, 1536, 2304, 2, 2, 148), ("gpt-310b", 8, 16, 1920, 2160, 1, 2, 155),
        ("gpt-530b", 8, 35, 2520, 2520, 1, 3, 163), ("gpt-1t", 8, 64, 3072, 3072, 1, 1, 163))
    for model, t, p, n, gbs, mb, v, tflops in table1:
        runs.append(PublishedRun(
            f"{model} (Table 1)", "Narayanan et al. 2021 (arXiv 2104.04473) Table 1", model, "A100-80", n // 8,
            Layout(tp=t, pp=p, dp=n // (t * p), micro_batch=mb, global_batch=gbs, seq_len=2048, recompute="full",
                   flash_attention=False, sequence_parallel=False, distributed_optimizer=False,
                   virtual_stages=v, grad_bytes=2, overlap="tp+dp" if p == 1 else "tp"),
            f"{tflops} TFLOP/s per GPU", _megatron_tflops_to_tokens_per_s(model, n, tflops)))
    return runs


PUBLISHED_RUNS: list[PublishedRun] = _published_runs()


def validation_table(markdown: bool = False) -> str:
    """Every published run: its figure, the prediction, and both as MFU under 6 N_total."""
    rows = []
    for run in PUBLISHED_RUNS:
        pred = run.predict()
        L = run.layout
        chunks = f"x{L.virtual_stages}" if L.virtual_stages > 1 else ""
        layout = f"TP{L.tp} PP{L.pp}{chunks} DP{L.dp} mb{L.micro_batch} gbs{L.global_batch} {L.recompute}"
        flops = ARCHITECTURES[run.model].paper_flops_per_token()
        published_mfu = mfu(run.tokens_per_s, flops, run.nodes * 8, GPUS[run.gpu].peak_flops)
        rows.append((run.name, f"{run.nodes * 8} x {run.gpu}", layout, run.published,
                     f"{run.tokens_per_s:,.0f}", f"{pred.tokens_per_s:,.0f}",
                     f"{pred.tokens_per_s / run.tokens_per_s - 1:+.1%}",
                     f"{published_mfu:.1%}", f"{pred.mfu:.1%}", f"{pred.memory_gb_per_gpu:.0f}", run.source))
    head = ("run", "GPUs", "layout", "published", "tokens/s published", "tokens/s predicted", "error",
            "MFU published", "MFU predicted", "GiB/GPU", "source")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    rows = [r[:-1] for r in rows]  # sources are in docs/plan.md and PUBLISHED_RUNS
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [head[:-1], *rows])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _report(pred: Prediction) -> str:
    L, m = pred.layout, pred.memory
    gb = lambda x: f"{x / GiB:7.2f} GiB"  # noqa: E731
    verdict = "fits" if pred.fits else (f"DOES NOT FIT: needs {pred.memory_gb_per_gpu:.1f} GiB per GPU, "
                                        f"the {pred.gpu} has {pred.capacity_bytes / GiB:.1f} GiB")
    lines = [
        f"{pred.model} on {pred.nodes} x {pred.gpus_per_node} {pred.gpu}: TP {L.tp}, PP {L.pp}"
        + (f" x {L.virtual_stages} chunks" if L.virtual_stages > 1 else "")
        + f", DP {L.dp}; micro-batch {L.micro_batch}, global batch {L.global_batch}, seq {L.seq_len}, "
          f"recompute {L.recompute}",
        "",
        f"memory per GPU (most loaded stage): {pred.memory_gb_per_gpu:.2f} GiB of "
        f"{pred.capacity_bytes / GiB:.1f} GiB: {verdict}",
        f"  parameters  {gb(m.parameters)}   (bf16)",
        f"  gradients   {gb(m.gradients)}   ({'fp32' if L.grad_bytes == 4 else 'bf16'})",
        f"  optimizer   {gb(m.optimizer)}   (fp32 master + Adam m, v"
        + (f"; sharded over DP {L.dp})" if L.distributed_optimizer and L.dp > 1 else ")"),
        f"  activations {gb(m.activations)}",
        f"  overhead    {gb(m.overhead)}   (context, NCCL, workspaces, fragmentation)",
        "",
        f"pipeline: {pred.n_microbatches} micro-batches, bubble (p-1)/(v m) = {pred.bubble_fraction:.1%} "
        f"= {pred.bubble_s:.3f} s",
        "step time breakdown (s):",
        f"  compute             {pred.compute_s:9.3f}",
        f"  TP comm exposed     {pred.tp_comm_exposed_s:9.3f}   (all {pred.tp_comm_s:.3f}; "
        f"with backward overlap {pred.tp_comm_exposed_overlap_s:.3f})",
        f"  PP send/recv        {pred.pp_comm_s:9.3f}",
        f"  pipeline bubble     {pred.bubble_s:9.3f}",
        f"  DP comm exposed     {pred.dp_comm_exposed_s:9.3f}   (all {pred.dp_comm_s:.3f}; "
        f"overlapped with backward {pred.dp_comm_exposed_overlap_s:.3f})",
        f"  optimizer step      {pred.optimizer_s:9.3f}",
        f"  step (overlap {L.overlap}) {pred.step_time_s:9.3f}   (no overlap {pred.step_time_no_overlap_s:.3f}; "
        f"TP + DP overlap {pred.step_time_overlap_s:.3f})",
        "",
        f"tokens/s {pred.tokens_per_s:,.0f} ({pred.tokens_per_s_per_gpu:,.0f} per GPU)",
        f"MFU {pred.mfu:.1%} (6 N_total per token), {pred.mfu_named:.1%} (6 N_non_embedding + 12 L d s)",
    ]
    return "\n".join(lines)


def _parse_model(text: str) -> Architecture:
    """A preset name, a JSON object, or a path to a JSON file."""
    if text in ARCHITECTURES:
        return ARCHITECTURES[text]
    if text.lstrip().startswith("{"):
        try:
            return Architecture.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"--model is not valid JSON: {e}") from None
    if text.endswith(".json"):
        try:
            with open(text) as f:
                return Architecture.from_dict(json.load(f), name=text)
        except OSError as e:
            raise ValueError(f"--model file {text!r} cannot be read: {e}") from None
    return get_architecture(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m train.plan", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets: " + ", ".join(ARCHITECTURES) + ". --model also takes a JSON object or file "
               "with dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size.")
    ap.add_argument("--model", help="preset name, JSON object or .json file")
    ap.add_argument("--gpu", choices=sorted(GPUS))
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=None, help="default: the GPUs left over by tp x pp")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--global-batch", type=int, default=512, help="sequences per step (default 512)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    ap.add_argument("--recompute", choices=RECOMPUTE, default=None,
                    help="default: selective; --search tries all three unless given")
    ap.add_argument("--virtual-stages", type=int, default=1, help="interleaved 1F1B model chunks per rank")
    ap.add_argument("--no-sequence-parallel", action="store_true")
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--no-flash-attention", action="store_true")
    ap.add_argument("--eager-kernels", action="store_true", help="norms/rotary/SwiGLU as eager op chains")
    ap.add_argument("--grad-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--overlap", choices=OVERLAP, default="tp")
    ap.add_argument("--json", action="store_true", help="print the prediction (or search results) as JSON")
    ap.add_argument("--search", action="store_true", help="list the best layouts for this cluster and model")
    ap.add_argument("--top", type=int, default=10, help="layouts --search prints")
    ap.add_argument("--validate", action="store_true", help="predict the published runs against their figures")
    ap.add_argument("--markdown", action="store_true", help="with --validate: a markdown table")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.validate:
        print(validation_table(markdown=args.markdown))
        return 0
    missing = [f"--{n}" for n in ("model", "gpu", "nodes") if getattr(args, n) is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")
    features = dict(virtual_stages=args.virtual_stages, sequence_parallel=not args.no_sequence_parallel,
                    distributed_optimizer=not args.no_distributed_optimizer,
                    flash_attention=not args.no_flash_attention, fused_kernels=not args.eager_kernels,
                    grad_bytes=4 if args.grad_dtype == "fp32" else 2, overlap=args.overlap)
    try:
        arch = _parse_model(args.model)
        if args.search:
            results = search(arch, args.gpu, args.nodes, args.gpus_per_node, global_batch=args.global_batch,
                             seq_len=args.seq_len, recompute=args.recompute, **features)
        else:
            pred = predict(arch, args.gpu, args.nodes, args.gpus_per_node, tp=args.tp, pp=args.pp, dp=args.dp,
                           micro_batch=args.micro_batch, global_batch=args.global_batch, seq_len=args.seq_len,
                           recompute=args.recompute or "selective", **features)
    except ValueError as e:
        ap.error(str(e))

    if not args.search:
        print(json.dumps(pred.to_dict(), indent=2) if args.json else _report(pred))
        return 0
    shown = results[: args.top]
    if args.json:
        print(json.dumps([r.to_dict() for r in shown], indent=2))
        return 0
    world = args.nodes * args.gpus_per_node
    if not shown:
        print(f"no layout of {arch.name} fits on {world} x {args.gpu} with global batch {args.global_batch}")
        return 1
    print(f"best layouts for {arch.name} on {args.nodes} x {args.gpus_per_node} {args.gpu}, "
          f"global batch {args.global_batch} ({len(results)} fit):")
    print(f"{'tp':>3} {'pp':>3} {'dp':>4} {'mb':>3} {'recompute':>9} {'tokens/s':>11} {'MFU':>6} "
          f"{'MFU named':>9} {'step s':>8} {'bubble':>7} {'GiB/GPU':>8}")
    for r in shown:
        L = r.layout
        print(f"{L.tp:>3} {L.pp:>3} {L.dp:>4} {L.micro_batch:>3} {L.recompute:>9} {r.tokens_per_s:>11,.0f} "
              f"{r.mfu:>6.1%} {r.mfu_named:>9.1%} {r.step_time_s:>8.2f} {r.bubble_fraction:>7.1%} "
              f"{r.memory_gb_per_gpu:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
