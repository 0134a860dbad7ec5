"""One training step, predicted: the pipeline's pace, exposed communication, the optimizer step,
tokens/s and MFU; and the search over layouts."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Mapping

from train.metrics import mfu

from .comm import group_bus_bandwidth, ring_time
from .cost import layer_cost
from .hardware import (DP_BUCKET_ELEMENTS, GPU, IB_LATENCY, LINK_EFFICIENCY, MEMORY_EFFICIENCY, NVLINK_LATENCY, GiB,
                       Cluster, make_cluster)
from .layout import RECOMPUTE, PlanLayout, validate
from .memory import Memory, stage_memory, stage_weights
from .shapes import Architecture, get_architecture


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
    layout: PlanLayout
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
    mfu_named: float                # (6 N_non_embedding + 12 L d s) per token (docs/design.md, "MFU")

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


def predict_layout(arch: Architecture, cluster: Cluster, layout: PlanLayout) -> Prediction:
    """The cost model. See the module docstring for its structure."""
    validate(arch, cluster, layout)
    gpu, t, p, d, v = cluster.gpu, layout.tp, layout.pp, layout.dp, layout.virtual_stages
    m = layout.n_microbatches
    layers = arch.n_layers // p
    tokens = layout.micro_batch * layout.seq_len
    gemm_rate = gpu.peak_flops * gpu.gemm_efficiency
    mem_rate = gpu.hbm_bandwidth * MEMORY_EFFICIENCY

    c = layer_cost(arch, cluster, layout)
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
    w_first, w_last = stage_weights(arch, layout)
    weights = max(w_first, w_last)
    if d > 1 and layout.fsdp:
        # FSDP2 as the trainer runs it, per micro-batch: all-gather the bf16 weights for the
        # forward (and again for the backward unless pipelined, where they stay gathered), and
        # reduce-scatter the gradients. It prefetches one layer ahead, so the first layer's
        # all-gather and the last one's reduce-scatter stay exposed, and whatever exceeds the
        # micro-batch's compute.
        bw, lat = group_bus_bandwidth(cluster, d, t)
        gathers = 1 if p > 1 else 2
        per_mb = (gathers * ring_time(2 * weights, d, bw, lat, "all_gather")
                  + ring_time(layout.grad_bytes * weights, d, bw, lat, "reduce_scatter"))
        one_layer = arch.layer_params / t
        edges = (ring_time(2 * one_layer, d, bw, lat, "all_gather")
                 + ring_time(layout.grad_bytes * one_layer, d, bw, lat, "reduce_scatter"))
        dp_s = m * per_mb
        dp_overlap_s = m * min(per_mb, max(edges, per_mb - compute_mb))
    elif d > 1:
        bw, lat = group_bus_bandwidth(cluster, d, t)
        grads = weights * layout.grad_bytes
        if layout.distributed_optimizer:
            dp_s = (ring_time(grads, d, bw, lat, "reduce_scatter")
                    + ring_time(2 * weights, d, bw, lat, "all_gather"))
        else:
            dp_s = ring_time(grads, d, bw, lat, "all_reduce")
        # Overlapped, buckets reduce while the last micro-batch's backward runs; the last
        # bucket, and whatever does not fit under that backward, stays exposed.
        last_bucket = ring_time(DP_BUCKET_ELEMENTS * layout.grad_bytes, d, bw, lat, "all_reduce")
        last_backward = layers * (c.bwd_compute + c.recompute)
        dp_overlap_s = max(min(dp_s, last_bucket), dp_s - last_backward)
    else:
        dp_s = dp_overlap_s = 0.0

    # Adam on the local shard: read gradient, fp32 master, m and v, write master, m, v and the
    # bf16 weight (30 B/param); clipping's norm and zeroing touch every local gradient.
    shard = weights / d if layout.optimizer_sharded else weights
    optimizer_s = (30 * shard + 2 * layout.grad_bytes * weights) / mem_rate

    slots_bubble = (p - 1) / v

    def step(tp_mb: float, dp: float) -> tuple[float, float]:
        slot = compute_mb + tp_mb + p2p_mb
        bubble = slots_bubble * slot
        return m * slot + bubble + dp + optimizer_s, bubble

    tp_mb = tp_all_mb if layout.overlap == "none" else tp_overlap_mb
    # FSDP2 always overlaps its collectives with compute; "none" still turns that off.
    dp_hidden = layout.overlap == "tp+dp" or (layout.fsdp and layout.overlap != "none")
    dp_exposed = dp_overlap_s if dp_hidden else dp_s
    step_s, bubble_s = step(tp_mb, dp_exposed)
    step_none, _ = step(tp_all_mb, dp_s)
    step_overlap, _ = step(tp_overlap_mb, dp_overlap_s)

    tps = layout.global_batch * layout.seq_len / step_s
    world = cluster.world_size
    return Prediction(
        model=arch.name, gpu=gpu.name, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node,
        layout=layout, memory=stage_memory(arch, layout), capacity_bytes=gpu.hbm_bytes,
        n_microbatches=m, bubble_fraction=slots_bubble / m,
        compute_s=m * compute_mb, bubble_s=bubble_s,
        tp_comm_s=m * tp_all_mb, tp_comm_exposed_s=m * tp_mb,
        tp_comm_exposed_no_overlap_s=m * tp_all_mb, tp_comm_exposed_overlap_s=m * tp_overlap_mb,
        pp_comm_s=m * p2p_mb,
        dp_comm_s=dp_s, dp_comm_exposed_s=dp_exposed, dp_comm_exposed_overlap_s=dp_overlap_s,
        optimizer_s=optimizer_s,
        step_time_s=step_s, step_time_no_overlap_s=step_none, step_time_overlap_s=step_overlap,
        tokens_per_s=tps,
        mfu=mfu(arch.paper_flops_per_token(), tps, world, gpu.peak_flops),
        mfu_named=mfu(arch.model_flops_per_token(layout.seq_len), tps, world, gpu.peak_flops),
    )


def predict(model: str | Architecture | Mapping[str, Any], gpu: str | GPU, nodes: int, gpus_per_node: int = 8, *,
            tp: int = 1, pp: int = 1, dp: int | None = None, micro_batch: int = 1, global_batch: int = 512,
            seq_len: int | None = None, recompute: str = "selective", **features: Any) -> Prediction:
    """Predict one training step. dp defaults to the GPUs left over by tp x pp; `features` are the
    remaining PlanLayout fields (sequence_parallel, distributed_optimizer, flash_attention, ...)."""
    arch = get_architecture(model)
    cluster = make_cluster(gpu, nodes, gpus_per_node)
    if dp is None:
        if tp <= 0 or pp <= 0 or cluster.world_size % (tp * pp):
            raise ValueError(f"--nodes x --gpus-per-node = {cluster.world_size} is not divisible by "
                             f"--tp x --pp = {tp} x {pp}")
        dp = cluster.world_size // (tp * pp)
    layout = PlanLayout(tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, global_batch=global_batch,
                    seq_len=arch.max_seq_len if seq_len is None else seq_len, recompute=recompute, **features)
    return predict_layout(arch, cluster, layout)


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
    cluster = make_cluster(gpu, nodes, gpus_per_node)
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
        layout = PlanLayout(tp=t, pp=p, dp=world // (t * p), micro_batch=mb, global_batch=global_batch,
                        seq_len=arch.max_seq_len if seq_len is None else seq_len, recompute=rc, **features)
        try:
            pred = predict_layout(arch, cluster, layout)
        except ValueError:
            continue
        if pred.fits:
            found.append(pred)
    found.sort(key=lambda pr: (-pr.mfu, pr.memory.total))
    return found
