"""How a training step is laid out on a cluster, in the planner's terms, and which layouts can run.

This is not train.parallelize.Layout (where one process sits in the running job's mesh): it
describes a whole step, batch sizes and software features included, for a cost prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import Cluster
from .shapes import Architecture

# "selective" is Megatron's selective recomputation (Korthikanti et al. 2022 §4.2): the attention
# core (QK^T, softmax, dropout, PV) is recomputed, so nothing under flash attention. "elementwise"
# is this project's trainer's training.activation_checkpointing = "selective": norms, rotary and
# SwiGLU recomputed, matmul and attention outputs kept (train/parallelize.py). "full": every layer.
RECOMPUTE = ("none", "selective", "full", "elementwise")
OVERLAP = ("none", "tp", "tp+dp")


@dataclass(frozen=True)
class PlanLayout:
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
    recompute: str = "selective"     # one of RECOMPUTE (see there: Megatron's and the trainer's meanings)
    sequence_parallel: bool = True   # Megatron SP: norms/dropout sharded over TP, AG/RS instead of AR
    distributed_optimizer: bool = True  # ZeRO-1 (Megatron's distributed optimizer): fp32 master + Adam sharded over DP
    # FSDP2 as the trainer applies it (parallel.fsdp): parameters, gradients and optimizer state
    # sharded over DP; bf16 weights all-gathered per micro-batch (forward, and again for the
    # backward unless pipelined), fp32 gradients reduce-scattered per micro-batch. Supersedes
    # distributed_optimizer.
    fsdp: bool = False
    flash_attention: bool = True     # fused attention: no s^2 activations, causal blocks skipped
    # Norms, rotary and the MLP activation as fused kernels (one read, one write per tensor), or
    # as Meta's reference Llama code runs them: chains of eager PyTorch ops with fp32 round
    # trips, and layout copies around the attention kernel (see cost.elementwise_bytes_per_token).
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

    @property
    def optimizer_sharded(self) -> bool:
        """Whether the fp32 master weights and Adam moments are sharded over DP (ZeRO-1 or FSDP)."""
        return self.distributed_optimizer or self.fsdp


def validate(arch: Architecture, cluster: Cluster, layout: PlanLayout) -> None:
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
