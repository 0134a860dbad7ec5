"""The training loop, single-process or 3-D parallel under torchrun.

One step = gradient accumulation over global_batch / (micro_batch x dp) micro batches (or one
pipeline schedule step over them), a global gradient-norm clip, AdamW, and the warmup + cosine
schedule. Host syncs happen once per step (the non-finite check on the all-reduced loss and
gradient norm), never per micro batch.

Layouts (train/parallelize.py): WORLD_SIZE = pp x dp x tp ranks on a DeviceMesh (pp, dp, tp).
Whatever the layout, step s reads the same global samples s*G .. s*G + G - 1 (G = global batch),
grouped into the same micro batches, so losses and gradient norms match a one-process run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

import meditron_kernels as mk
from model import LlamaConfig

from . import checkpoint as ckpt
from . import parallelize as par
from .config import Config, ConfigError, validate, validate_parallel
from .data import Blend, bundled_corpora, load_shard, make_batch
from .loss import lm_loss
from .metrics import device_peak_flops, memory_gb, mfu
from .tokenizer import load_tokenizer

# Test seam for the fault-tolerance test, read by fault_injection_hooks() only: "RANK:STEP" makes
# global rank RANK kill itself (SIGKILL) when it reaches step STEP, on the job's first attempt
# (TORCHELASTIC_RESTART_COUNT = 0), so that torchrun --max-restarts restarts the job.
FAULT_ENV = "MEDITRON_TRAIN_TEST_KILL_RANK_AT_STEP"


class TrainingStopped(RuntimeError):
    """Raised by nan_policy='stop' (after saving the last good state) and after too many skipped steps."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device is 'cuda' but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
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


def model_config(cfg: Config) -> LlamaConfig:
    """The model's shape, without building it: the preset, or an HF directory's config.json."""
    if cfg.model.init_from_hf:
        from model.hf import config_from_hf

        path = os.path.join(cfg.model.init_from_hf, "config.json")
        try:
            with open(path) as f:
                return config_from_hf(json.load(f))
        except FileNotFoundError:
            raise ConfigError(f"model.init_from_hf: {path} does not exist") from None
    mcfg = LlamaConfig.from_name(cfg.model.preset)
    mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.training.seq_len)
    return mcfg


def check_model_fits(cfg: Config, mcfg: LlamaConfig, vocab_needed: int) -> None:
    if vocab_needed > mcfg.vocab_size:
        raise ConfigError(f"data.tokenizer has {vocab_needed} tokens but the model's vocab_size is "
                          f"{mcfg.vocab_size} (model.preset / model.init_from_hf)")
    if cfg.training.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"training.seq_len {cfg.training.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")


def build_model(cfg: Config, device: torch.device, vocab_needed: int):
    """The whole model in one process: meta build, then allocate on the device and initialise
    (or load the HF checkpoint)."""
    mcfg = model_config(cfg)
    check_model_fits(cfg, mcfg, vocab_needed)
    model = par.build_stage(mcfg, 0, 1)
    if cfg.model.init_from_hf:
        par.load_hf_weights([model], cfg.model.init_from_hf, device)
    else:
        par.init_weights([model], mcfg, cfg.training.seed, device)
    return model


class PartOptimizers:
    """One AdamW per model part, driven as one: checkpointing pairs each part with its own
    optimizer (a pipeline rank may hold several stages)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


class PartSchedulers:
    """The warmup + cosine LambdaLR of each part's optimizer, stepped together. Loading an
    optimizer replaces its param-group dicts, so each scheduler must hold its own optimizer
    rather than a copy of the groups."""

    def __init__(self, optimizer: PartOptimizers, cfg: Config):
        fn = functools.partial(_lr_factor, cfg=cfg)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, fn) for o in optimizer.optimizers]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict:
        return self.schedulers[0].state_dict()  # the same on every part

    def load_state_dict(self, state: dict) -> None:
        for s in self.schedulers:
            s.load_state_dict(state)


def _lr_factor(step: int, cfg: Config) -> float:
    return lr_at(step, cfg) / cfg.training.lr


def build_optimizer(parts, cfg: Config, device: torch.device) -> PartOptimizers:
    """AdamW over every part this rank holds; no weight decay on norms (1-D) and the input
    embedding, as Megatron does."""
    t = cfg.training
    parts = parts if isinstance(parts, (list, tuple)) else [parts]
    optimizers = []
    for part in parts:
        decay, no_decay = [], []
        for name, p in part.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device.type == "cuda"
        optimizers.append(torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused))
    return PartOptimizers(optimizers)


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
    """Test seams. ``loss``: transform a micro batch's loss (e.g. inject a NaN at a given step;
    not called under pipeline parallelism, where the schedule owns the micro batches).
    ``before_step``: called with the step index before each step (fault injection)."""
    loss: callable = None
    before_step: callable = None


def fault_injection_hooks() -> Hooks:
    """Hooks for the command line: empty unless the fault-injection test variable is set."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return Hooks()
    rank, step = (int(v) for v in spec.split(":"))

    def before_step(s: int) -> None:
        if s == step and int(os.environ.get("RANK", "0")) == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    return Hooks(before_step=before_step)


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


class Engine:
    """The model parts this rank holds and how to run a step over them."""

    def __init__(self, cfg: Config, layout: par.Layout, device: torch.device, mcfg: LlamaConfig):
        t, p = cfg.training, cfg.parallel
        self.cfg, self.layout, self.device, self.mcfg = cfg, layout, device, mcfg
        self.accum = t.global_batch // (t.micro_batch * layout.dp)
        self.tp_mesh = layout.mesh["tp"] if layout.tp > 1 else None
        self.pipelined = layout.pp > 1
        if self.pipelined:
            per_rank = 2 if p.pp_schedule == "zbv" else p.virtual_stages
            self.n_stages = layout.pp * per_rank
            self.stage_ids = par.stage_indices(layout.pp_rank, layout.pp, per_rank, p.pp_schedule)
        else:
            self.n_stages, self.stage_ids = 1, [0]
        self.parts = [par.build_stage(mcfg, s, self.n_stages) for s in self.stage_ids]
        if self.tp_mesh is not None:
            for part in self.parts:
                par.apply_tp(part, self.tp_mesh, layout.sequence_parallel)
        if cfg.model.init_from_hf:
            par.load_hf_weights(self.parts, cfg.model.init_from_hf, device)
        else:
            par.init_weights(self.parts, mcfg, t.seed, device)
        for part in self.parts:
            par.apply_activation_checkpointing(part, t.activation_checkpointing)
            if t.compile:
                par.apply_compile(part)
        # A data-parallel wrapper is needed for dp > 1, and for bf16 parameters (FSDP's policy
        # keeps the float32 masters) even on one rank.
        self.fsdp = layout.distributed and (layout.dp > 1 or t.dtype == "bfloat16-params")
        if self.fsdp:
            for part in self.parts:
                par.apply_data_parallel(part, layout, t.dtype, self.pipelined)
        self.replicated_dp = self.fsdp and not p.fsdp
        if t.dtype == "bfloat16":
            self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext
        self.schedule = None
        if self.pipelined:
            if cfg.data.pack:
                for part in self.parts:
                    par.add_packing_hook(part, device)
            act_dtype = torch.bfloat16 if t.dtype == "bfloat16-params" else torch.float32
            self.schedule = par.build_schedule(
                self.parts, self.stage_ids, self.n_stages, layout, self.accum, t.micro_batch, t.seq_len,
                act_dtype, self.loss, device, p.pp_schedule)
        # ZBV's eval() still schedules backward actions on forward-only stages and fails (torch
        # 2.13), and older torch has no eval(): there, validation runs the training schedule
        # and drops the gradients.
        self.forward_only_eval = (self.schedule is not None and hasattr(self.schedule, "eval")
                                  and p.pp_schedule != "zbv")
        self.has_first = 0 in self.stage_ids
        self.has_last = self.n_stages - 1 in self.stage_ids
        # ranks whose loss counts towards the logged mean: one per dp replica
        self.loss_weight = (1.0 / layout.dp) if (self.has_last and layout.tp_rank == 0) else 0.0

    # -------------------------------------------------------------- losses
    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of every layout (train/loss.py), from the last stage's hidden states; also
        the pipeline schedule's loss_fn."""
        # Read the head at each call: FSDP swaps the module's parameters between their sharded
        # and gathered forms.
        head = self.parts[self.stage_ids.index(self.n_stages - 1)].output.weight
        return lm_loss(hidden, head, targets, tp_mesh=self.tp_mesh, sequence_parallel=self.layout.sequence_parallel)

    def micro_loss(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            hidden = self.parts[0](batch["tokens"], return_hidden=True, **model_inputs(batch))
            return self.loss(hidden, batch["targets"])

    # -------------------------------------------------------------- data
    def micro_batches(self, data: Blend, step: int) -> list[dict]:
        """This dp rank's micro batches of ``step``: micro m holds global samples
        step*G + (m*dp + dp_rank)*micro_batch + [0, micro_batch), so the micro batches of a step
        are the same groups of samples for every dp size."""
        t, lay = self.cfg.training, self.layout
        out = []
        for m in range(self.accum):
            start = step * t.global_batch + (m * lay.dp + lay.dp_rank) * t.micro_batch
            out.append(make_batch(data, start, t.micro_batch, self.cfg.data.pack))
        return out

    def _pipeline_inputs(self, micros: list[dict]):
        tokens = torch.cat([b["tokens"] for b in micros])
        targets = torch.cat([b["targets"] for b in micros])
        kwargs = {"return_hidden": True}  # the last stage stops before the head: the loss fuses it
        if self.cfg.data.pack:
            L = self.cfg.training.seq_len
            kwargs["doc_positions"] = torch.cat(
                [par.doc_positions(b["cu_seqlens"], b["tokens"].shape[0], L) for b in micros])
        args = (tokens.to(self.device, non_blocking=True),) if self.has_first else ()
        target = targets.to(self.device, non_blocking=True) if self.has_last else None
        return args, target, kwargs

    # -------------------------------------------------------------- one step
    def forward_backward(self, micros: list[dict], step: int, hooks: Hooks) -> torch.Tensor:
        """Run the step's forward and backward passes; -> this rank's mean loss (a device
        scalar; meaningful where the last stage lives)."""
        if self.pipelined:
            args, target, kwargs = self._pipeline_inputs(micros)
            losses: list[torch.Tensor] = []
            with self.autocast():
                par.schedule_step(self.schedule, *args, target=target,
                                  losses=losses if self.has_last else None, **kwargs)
            if not self.has_last:
                return torch.zeros((), device=self.device)
            return torch.stack([x.detach().float() for x in losses]).mean()
        loss_sum = torch.zeros((), device=self.device)
        root = self.parts[0]
        for micro, batch in enumerate(micros):
            if self.replicated_dp:  # all-reduce gradients once, after the last micro batch
                root.set_requires_gradient_sync(micro == self.accum - 1)
            batch = to_device(batch, self.device)
            loss = self.micro_loss(batch)
            if hooks.loss is not None:
                loss = hooks.loss(step, micro, loss)
            (loss / self.accum).backward()
            loss_sum += loss.detach()
        return loss_sum / self.accum

    @torch.no_grad()
    def evaluate(self, val: Blend) -> float:
        """Mean validation loss over eval.batches micro batches (every rank sees the same ones).
        Under pipelining they go through the schedule in groups of its micro batch count."""
        t = self.cfg.training
        for part in self.parts:
            part.eval()
        try:
            n = self.cfg.eval.batches
            if not self.pipelined:
                total = torch.zeros((), device=self.device)
                for i in range(n):
                    batch = to_device(make_batch(val, i * t.micro_batch, t.micro_batch, self.cfg.data.pack), self.device)
                    total += self.micro_loss(batch).float()
                return (total / n).item()
            groups = -(-n // self.accum)
            losses: list[torch.Tensor] = []
            for g in range(groups):
                micros = [make_batch(val, (g * self.accum + i) * t.micro_batch, t.micro_batch, self.cfg.data.pack)
                          for i in range(self.accum)]
                args, target, kwargs = self._pipeline_inputs(micros)
                group: list[torch.Tensor] = []  # the schedule clears the list it is given
                with self.autocast():
                    if self.forward_only_eval:
                        self.schedule.eval(*args, target=target, losses=group if self.has_last else None, **kwargs)
                    else:
                        with torch.enable_grad():
                            par.schedule_step(self.schedule, *args, target=target,
                                              losses=group if self.has_last else None, **kwargs)
                        for part in self.parts:
                            part.zero_grad(set_to_none=True)
                losses += group
            mean = (torch.stack([x.float() for x in losses]).mean() if self.has_last
                    else torch.zeros((), device=self.device))
            # the last stage's holder (tp rank 0, dp rank 0) speaks for everyone
            share = mean if (self.has_last and self.layout.tp_rank == 0 and self.layout.dp_rank == 0) else mean * 0
            dist.all_reduce(share)
            return share.item()
        finally:
            for part in self.parts:
                part.train()


def run(cfg: Config, resume: bool = False, hooks: Hooks | None = None, progress: bool = True) -> list[dict]:
    """Train on cfg, in this process alone or as one rank of a torchrun job; -> the logged
    metric rows (on every rank; rank 0 writes them)."""
    hooks = hooks or Hooks()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size=world_env)
    t = cfg.training
    device = resolve_device(t.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = None if cfg.model.backend == "auto" else cfg.model.backend
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    mcfg = model_config(cfg)
    check_model_fits(cfg, mcfg, tokenizer.vocab_size)
    validate_parallel(cfg, world_env, mcfg)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        resume = True  # torchrun restarted the job after a failure: continue from the last checkpoint

    layout = par.make_layout(cfg, device)
    rank0 = not layout.distributed or dist.get_rank() == 0
    if rank0:
        os.makedirs(cfg.out_dir, exist_ok=True)
    seed_everything(t.seed)
    train_data, val_data = load_data(cfg, tokenizer)
    engine = Engine(cfg, layout, device, mcfg)
    parts = engine.parts
    optimizer = build_optimizer(parts, cfg, device)
    scheduler = PartSchedulers(optimizer, cfg)

    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    start_step, skipped_total = 0, 0
    if resume:
        found = ckpt.complete_checkpoints(ckpt_dir)
        if layout.distributed:  # every rank must agree on the checkpoint (rank 0's view wins)
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        if found:
            meta = ckpt.load(found[-1][1], None, optimizer, scheduler, model_parts=parts, layout=layout.as_dict())
            start_step, skipped_total = meta["step"], meta.get("skipped_steps", 0)
            if rank0:
                print(f"resuming from {found[-1][1]} (step {start_step}, saved with layout {meta.get('layout')})",
                      flush=True)
            if meta.get("data_position") != start_step * t.global_batch:
                raise ConfigError(f"checkpoint {found[-1][1]} was written with another training.global_batch")
    writer = None
    if rank0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
        writer = MetricsWriter(cfg.out_dir, start_step if resume else None, cfg.metrics.tensorboard)

    flops_tok = mcfg.flops_per_token(t.seq_len)
    flops_tok_paper = 6 * mcfg.num_params()
    peak = device_peak_flops(device, cfg.metrics.peak_tflops)

    def save(step: int):
        ckpt.save(ckpt_dir, step, None, optimizer, scheduler,
                  dict(data_position=step * t.global_batch, skipped_steps=skipped_total, config=cfg.to_dict(),
                       model_config=dataclasses.asdict(mcfg), layout=layout.as_dict()),
                  cfg.checkpoint.keep_last, model_parts=parts)

    rows = []
    bar = None
    if progress and rank0:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    skipped_in_a_row = 0
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    for part in parts:
        part.train()
    with mk.use_backend(backend):
        for step in range(start_step, t.steps):
            if hooks.before_step is not None:
                hooks.before_step(step)
            micros = engine.micro_batches(train_data, step)
            local_loss = engine.forward_backward(micros, step, hooks)
            window_tokens += t.global_batch * t.seq_len
            if layout.distributed and not engine.fsdp and layout.tp > 1:
                par.settle_partial_grads(parts)
            # one all-reduce gives the global gradient norm and the global mean loss
            share = local_loss * engine.loss_weight if layout.distributed else local_loss
            grad_norm, step_loss = par.global_grad_norm(parts, layout, share)
            finite = bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))  # the one sync per step
            if finite:
                par.clip_grads_(parts, clip, grad_norm)
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
                row = dict(step=done, loss=step_loss.item(), lr=lr_at(step, cfg), grad_norm=grad_norm.item(),
                           tokens_per_s=tps, tflops_per_device=flops_tok * tps / layout.world / 1e12,
                           mfu=mfu(flops_tok, tps, layout.world, peak),
                           mfu_paper=mfu(flops_tok_paper, tps, layout.world, peak), memory_gb=memory_gb(device),
                           skipped_steps=skipped_total)
                if val_data is not None and cfg.eval.interval and (done % cfg.eval.interval == 0 or done == t.steps):
                    with mk.use_backend(backend):
                        val_loss = engine.evaluate(val_data)
                    row.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                rows.append(row)
                if rank0:
                    writer.write(row)
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
