"""The single-process training loop (the parallel path wraps the same pieces).

One step = gradient accumulation over global_batch / (micro_batch x dp) micro batches, a global
gradient-norm clip, AdamW, and the warmup + cosine schedule. Host syncs happen once per step
(the non-finite check), never per micro batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time

import numpy as np
import torch

import meditron_kernels as mk
from model import Llama, LlamaConfig

from . import checkpoint as ckpt
from .config import Config, ConfigError, validate
from .data import Blend, bundled_corpora, load_shard, make_batch
from .metrics import device_peak_flops, memory_gb, mfu
from .tokenizer import load_tokenizer


class TrainingStopped(RuntimeError):
    """Raised by nan_policy='stop' (after saving the last good state) and after too many skipped steps."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr."""
    t = cfg.training
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay = t.decay_steps or max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def build_model(cfg: Config, device: torch.device, vocab_needed: int) -> Llama:
    """Meta build, then allocate on the device and initialise (or load the HF checkpoint)."""
    if cfg.model.init_from_hf:
        model = Llama.from_hf(cfg.model.init_from_hf, device=device, dtype=torch.float32)
    else:
        mcfg = LlamaConfig.from_name(cfg.model.preset)
        mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.training.seq_len)
        with torch.device("meta"):
            model = Llama(mcfg)
        model.to_empty(device=device)
        model.init_weights()
    if vocab_needed > model.cfg.vocab_size:
        raise ConfigError(f"data.tokenizer has {vocab_needed} tokens but the model's vocab_size is "
                          f"{model.cfg.vocab_size} (model.preset / model.init_from_hf)")
    if cfg.training.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"training.seq_len {cfg.training.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    return model


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms (1-D) and the input embedding, as Megatron does."""
    t = cfg.training
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused)


def load_data(cfg: Config, tokenizer):
    d = cfg.data
    if d.paths:
        corpora = [load_shard(p, tokenizer.fingerprint, d.verify) for p in d.paths]
        weights = d.weights or [1.0] * len(corpora)
    else:
        corpora, weights = bundled_corpora(tokenizer)
        if d.weights:
            raise ConfigError("data.weights needs data.paths; the bundled corpus has its own mix")
    t = cfg.training
    train = Blend(corpora, weights, t.seq_len, t.seed, d.val_fraction, "train")
    val = Blend(corpora, weights, t.seq_len, t.seed, d.val_fraction, "val") if d.val_fraction > 0 else None
    return train, val


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("cu_seqlens", "max_seqlen") if k in batch}


@dataclasses.dataclass
class Hooks:
    """Test seams: transform the loss of a micro batch (e.g. inject a NaN at a given step)."""
    loss: callable = None


class MetricsWriter:
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


@torch.no_grad()
def evaluate(model, val: Blend, cfg: Config, device, autocast) -> float:
    model.eval()
    total = 0.0
    n = cfg.eval.batches
    for i in range(n):
        batch = to_device(make_batch(val, i * cfg.training.micro_batch, cfg.training.micro_batch, cfg.data.pack), device)
        with autocast():
            total += model.loss(batch["tokens"], batch["targets"], **model_inputs(batch)).item()
    model.train()
    return total / n


def run(cfg: Config, resume: bool = False, hooks: Hooks | None = None, progress: bool = True) -> list[dict]:
    """Train single-process on cfg; -> the logged metric rows."""
    from .parallelize import apply_activation_checkpointing, apply_compile

    hooks = hooks or Hooks()
    validate(cfg, world_size=1)
    t = cfg.training
    device = resolve_device(t.device)
    backend = None if cfg.model.backend == "auto" else cfg.model.backend
    if t.dtype == "bfloat16-params":
        raise ConfigError("training.dtype='bfloat16-params' needs FSDP mixed precision: run under torchrun "
                          "(parallel path), or use 'bfloat16' (autocast) single-process")
    os.makedirs(cfg.out_dir, exist_ok=True)
    seed_everything(t.seed)

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_data, val_data = load_data(cfg, tokenizer)
    model = build_model(cfg, device, tokenizer.vocab_size)
    apply_activation_checkpointing(model, t.activation_checkpointing)
    if t.compile:
        apply_compile(model)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / t.lr)

    accum = t.global_batch // t.micro_batch
    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    start_step, skipped_total = 0, 0
    if resume:
        found = ckpt.complete_checkpoints(ckpt_dir)
        if found:
            meta = ckpt.load(found[-1][1], model, optimizer, scheduler)
            start_step, skipped_total = meta["step"], meta.get("skipped_steps", 0)
            if meta.get("data_position") != start_step * t.global_batch:
                raise ConfigError(f"checkpoint {found[-1][1]} was written with another training.global_batch")
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    writer = MetricsWriter(cfg.out_dir, start_step if resume else None, cfg.metrics.tensorboard)

    mcfg = model.cfg
    flops_tok = mcfg.flops_per_token(t.seq_len)
    flops_tok_paper = 6 * mcfg.num_params()
    peak = device_peak_flops(device, cfg.metrics.peak_tflops)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if t.dtype == "bfloat16"
                else contextlib.nullcontext)

    def save(step: int):
        ckpt.save(ckpt_dir, step, model, optimizer, scheduler,
                  dict(data_position=step * t.global_batch, skipped_steps=skipped_total, config=cfg.to_dict(),
                       model_config=dataclasses.asdict(model.cfg)),
                  cfg.checkpoint.keep_last)

    rows = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    skipped_in_a_row = 0
    model.train()
    with mk.use_backend(backend):
        for step in range(start_step, t.steps):
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                start = step * t.global_batch + micro * t.micro_batch
                batch = to_device(make_batch(train_data, start, t.micro_batch, cfg.data.pack), device)
                with autocast():
                    loss = model.loss(batch["tokens"], batch["targets"], **model_inputs(batch))
                if hooks.loss is not None:
                    loss = hooks.loss(step, micro, loss)
                (loss / accum).backward()
                loss_sum += loss.detach()
                window_tokens += batch["tokens"].numel()
            clip = t.grad_clip if t.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
            step_loss = loss_sum / accum
            finite = bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))  # the one sync per step
            if finite:
                optimizer.step()
                skipped_in_a_row = 0
            else:
                skipped_total += 1
                skipped_in_a_row += 1
                if t.nan_policy == "stop":
                    optimizer.zero_grad(set_to_none=True)
                    save(step)
                    raise TrainingStopped(
                        f"non-finite loss ({step_loss.item()}) or gradient norm ({grad_norm.item()}) at step "
                        f"{step + 1}; the last good state (after step {step}) is saved in {ckpt_dir}")
                if skipped_in_a_row >= t.max_skipped_steps:
                    raise TrainingStopped(f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                                          f"norm (training.max_skipped_steps); stopping at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done = step + 1
            if bar is not None:
                bar.update(1)
            if done % cfg.metrics.log_interval == 0 or done == t.steps:
                now = time.perf_counter()
                tps = window_tokens / (now - window_start)
                row = dict(step=done, loss=step_loss.item(), lr=lr_at(step, cfg), grad_norm=grad_norm.item(), tokens_per_s=tps,
                           tflops_per_device=flops_tok * tps / 1e12, mfu=mfu(flops_tok, tps, 1, peak),
                           mfu_paper=mfu(flops_tok_paper, tps, 1, peak), memory_gb=memory_gb(device),
                           skipped_steps=skipped_total)
                if val_data is not None and cfg.eval.interval and (done % cfg.eval.interval == 0 or done == t.steps):
                    val_loss = evaluate(model, val_data, cfg, device, autocast)
                    row.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                writer.write(row)
                rows.append(row)
                msg = (f"step {done:>6} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad_norm {row['grad_norm']:.3f}"
                       f" | {tps:,.0f} tok/s" + (f" | mfu {row['mfu']:.1%}" if row["mfu"] is not None else "")
                       + (f" | val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""))
                (bar.write if bar is not None else print)(msg)
                window_tokens, window_start = 0, time.perf_counter()
            if (cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0) or done == t.steps:
                save(done)
    if bar is not None:
        bar.close()
    return rows
