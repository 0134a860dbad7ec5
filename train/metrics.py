"""Throughput and model-FLOPs utilisation.

Two MFU formulas are logged side by side:

- ``mfu`` (primary): (6 N_non_embedding + 12 n_layers dim seq) FLOPs per token, where the
  output head counts as a matmul and the input embedding (a lookup) does not; the second term
  is attention's score and value matmuls, forward and backward, without causal halving.
- ``mfu_paper``: 6 N_total FLOPs per token, the formula of the Meditron paper (and of many
  others), so numbers stay comparable with theirs.

Both divide by the dense bf16 peak of the devices doing the work.
"""
from __future__ import annotations

import os
import resource

import torch

# Dense bf16 tensor-core peaks, FLOP/s per device.
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (the CPU, an unlisted GPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int, peak_flops: float | None) -> float | None:
    if peak_flops is None:
        return None
    return flops_per_token * tokens_per_s / (n_devices * peak_flops)


def memory_gb(device: torch.device) -> float:
    """Peak allocated memory on a GPU, or the process's peak RSS on the CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb * 1024 / 1e9 if os.uname().sysname == "Linux" else kb / 1e9
