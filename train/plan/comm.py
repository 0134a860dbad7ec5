"""Collectives: the bandwidth a group of ranks sees, and the time of one ring collective."""
from __future__ import annotations

from .hardware import IB_LATENCY, LINK_EFFICIENCY, NVLINK_LATENCY, Cluster


def group_bus_bandwidth(cluster: Cluster, size: int, stride: int) -> tuple[float, float]:
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


def ring_time(nbytes: float, ranks: int, bw: float, latency: float, kind: str) -> float:
    """Time of a ring collective on a tensor of `nbytes` (the full, gathered size)."""
    if ranks == 1:
        return 0.0
    share = (ranks - 1) / ranks
    factor = {"all_reduce": 2 * share, "all_gather": share, "reduce_scatter": share}[kind]
    return nbytes * factor / bw + latency
