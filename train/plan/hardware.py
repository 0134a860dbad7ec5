"""The hardware the planner knows: accelerators, their links, and the efficiencies shared by every run."""
from __future__ import annotations

from dataclasses import dataclass

from train.metrics import PEAK_FLOPS

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator and the links it sees. Bandwidths are per GPU and per direction."""

    name: str
    peak_flops: float        # dense bf16 tensor-core FLOP/s (train.metrics.PEAK_FLOPS, from the data sheets)
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
    # (docs/design.md, "Measured ceilings"). Assuming layer GEMMs keep the same share of a large square
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
    # A100 SXM4: 1555 GB/s (40GB) and 2039 GB/s (80GB) HBM2e; NVLink 3 600 GB/s bidirectional
    # = 300 GB/s per direction; DGX A100 has one 200 Gb/s HDR NIC per GPU.
    "A100-40": GPU("A100-40", PEAK_FLOPS["A100"], 40 * GiB, 1.555e12, 300e9, 25e9, 0.66, 0.55),
    "A100-80": GPU("A100-80", PEAK_FLOPS["A100"], 80 * GiB, 2.039e12, 300e9, 25e9, 0.66, 0.55),
    # H100 SXM5 80GB (79.6 GiB usable): 3.35 TB/s HBM3; NVLink 4 900 GB/s bidirectional; DGX
    # H100 has one 400 Gb/s NDR NIC per GPU.
    "H100": GPU("H100", PEAK_FLOPS["H100"], 79.6 * GiB, 3.35e12, 450e9, 50e9, 0.62, 0.35),
    # H200 SXM: the H100 die with 141 GB (140.4 GiB usable) HBM3e at 4.8 TB/s.
    "H200": GPU("H200", PEAK_FLOPS["H200"], 140.4 * GiB, 4.8e12, 450e9, 50e9, 0.62, 0.35),
}

# Fraction of HBM bandwidth that element-wise kernels reach. Device-to-device copies measured at
# 3.0 of 3.35 TB/s (H100) and 4.3 of 4.8 TB/s (H200) reach 0.90 (docs/design.md, "Measured
# ceilings"); kernels that read two or three streams and write one land a little lower.
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


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    nodes: int
    gpus_per_node: int = 8

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def get_gpu(gpu: str | GPU) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu!r}; choose one of {sorted(GPUS)}")
    return GPUS[gpu]


def make_cluster(gpu: str | GPU, nodes: int, gpus_per_node: int) -> Cluster:
    for name, v in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"--nodes and --gpus-per-node must be positive integers, got {name} {v!r}")
    return Cluster(get_gpu(gpu), nodes, gpus_per_node)
