"""Joining the job's process group: the one bootstrap shared by training and evaluation."""
from __future__ import annotations

import os

import torch.distributed as dist


def init_process_group(device_type: str) -> None:
    """Join (or create) the default process group once: NCCL for CUDA devices, gloo otherwise.

    Under torchrun (MASTER_ADDR or WORLD_SIZE > 1 set) this joins the job's group; a lone process
    gets a 1-rank group on an in-memory store, so no port is picked. A second call is a no-op.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun shares its rendezvous store with the workers and keeps it across restarts;
        # keys a dead attempt left there (gloo's peer addresses) are read by the next one, which
        # then connects to a dead port (1 restart in 3 failed so on the CPU). With one agent (one
        # node) every worker has the same restart count, so it names a fresh namespace. Agents on
        # several nodes count restarts each for itself: there, launch with
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a new store per round).
        store, rank, size = next(dist.rendezvous("env://"))
        if os.environ.get("GROUP_WORLD_SIZE", "1") == "1":
            store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
