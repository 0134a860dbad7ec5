"""Throughput and model-FLOPs utilisation.

Two MFU formulas are logged side by side:

- ``mfu`` (primary): (6 N_non_embedding + 12 n_layers dim seq) FLOPs per token, where the
  output head counts as a matmul and the input embedding (a lookup) does not; the second term
  is attention's score and value matmuls, forward and backward, without causal halving.
- ``mfu_paper``: 6 N_total FLOPs per token, the formula of the Meditron paper (and of many
  others), so numbers stay comparable with theirs.

Both divide by the dense bf16 peak of the devices doing the work. ``StepLog`` turns a training
step into a logged row (metrics.jsonl, TensorBoard, the console line).
"""
from __future__ import annotations

import json
import os
import resource
import time

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


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step) and, if asked, TensorBoard events."""

    def __init__(self, out_dir: str, resume_step: int | None, tensorboard: bool):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # rows logged after the checkpoint we resume from will be logged again
            with open(self.path) as f:
                rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(rows)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])


class StepLog:
    """The metrics component: counts tokens between logged steps and turns a step into a row.

    Built from the metrics section; ``flops_per_token`` is (primary, paper) per token of the
    model, ``world`` the devices doing the work. Every rank builds rows (the loop returns them);
    only one writes them, given ``writer``, and shows the progress bar, given ``bar``."""

    def __init__(self, section, flops_per_token: tuple[float, float], world: int, device: torch.device,
                 writer: MetricsWriter | None, bar=None):
        self.section, self.world, self.device = section, world, device
        self.flops, self.flops_paper = flops_per_token
        self.peak = device_peak_flops(device, section.peak_tflops)
        self.writer, self.bar = writer, bar
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def due(self, done: int, last: int) -> bool:
        return done % self.section.log_interval == 0 or done == last

    def count(self, tokens: int) -> None:
        """A step has run over ``tokens`` tokens."""
        self.window_tokens += tokens
        if self.bar is not None:
            self.bar.update(1)

    def row(self, step: int, loss: float, lr: float, grad_norm: float, skipped_steps: int) -> dict:
        """The logged metrics after ``step`` steps, throughput over the steps since the last row."""
        tps = self.window_tokens / (time.perf_counter() - self.window_start)
        return dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tps,
                    tflops_per_device=self.flops * tps / self.world / 1e12,
                    mfu=mfu(self.flops, tps, self.world, self.peak),
                    mfu_paper=mfu(self.flops_paper, tps, self.world, self.peak), memory_gb=memory_gb(self.device),
                    skipped_steps=skipped_steps)

    def write(self, row: dict) -> None:
        """Record ``row`` (where there is a writer) and start the next throughput window."""
        if self.writer is not None:
            self.writer.write(row)
            msg = (f"step {row['step']:>6} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                   f"grad_norm {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s"
                   + (f" | mfu {row['mfu']:.1%}" if row["mfu"] is not None else "")
                   + (f" | val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""))
            (self.bar.write if self.bar is not None else print)(msg)
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
