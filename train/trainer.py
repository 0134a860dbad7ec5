"""The training loop, single-process or 3-D parallel under torchrun.

``run`` checks everything a run needs before anything is built or written; ``Trainer`` builds
the components, each from its own config section, and ``Trainer.train`` is the loop over them:

- train/parallelize.py: this rank's share of the model (``parallelize``), on a DeviceMesh;
- train/engine.py: a step's forward and backward (gradient accumulation or a pipeline schedule),
  under the objective of train/objective.py;
- train/grads.py: the global gradient norm and clipping; train/optim.py: AdamW and its schedule;
- train/validate.py, train/metrics.py, train/checkpoint.py: validation, logged rows, checkpoints;
- train/run_dir.py: the run directory and --resume; train/signals.py: SIGTERM/SIGINT and fault hooks.

Host syncs happen once per step (the non-finite check on the all-reduced loss and gradient norm,
together with the stop signal), never per micro batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import uuid

import numpy as np
import torch
import torch.distributed as dist

import meditron_kernels as mk
from model import LlamaConfig
from model.llama import PRESETS

from . import checkpoint as ckpt
from . import grads
from . import parallelize as par
from .config import MODEL_SHAPE_KEYS, Config, ConfigError, validate, validate_parallel
from .data import Blend, bundled_corpora, load_shard
from .engine import Engine
from .metrics import MetricsWriter, StepLog
from .objective import build_objective
from .optim import build_optimizer, lr_at
from .run_dir import changed_settings, check_out_dir, check_resume_compatible, prepare_out_dir, resume_checkpoint
from .signals import Hooks, StopSignal, TrainingInterrupted
from model.tokenizer import load_tokenizer
from .validate import Validator


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


def model_config(cfg: Config) -> LlamaConfig:
    """The model's shape, without building it: the preset with the model.* overrides, or an HF
    directory's config.json."""
    if cfg.model.init_from_hf:
        from model.hf import config_from_hf

        path = os.path.join(cfg.model.init_from_hf, "config.json")
        try:
            with open(path) as f:
                return config_from_hf(json.load(f))
        except FileNotFoundError:
            raise ConfigError(f"model.init_from_hf: {path} does not exist") from None
        except NotImplementedError as e:  # a family or rope type the model does not implement, named
            raise ConfigError(f"model.init_from_hf: {path}: {e}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"model.init_from_hf: {path} is not a model config.json we can read ({e})") from None
    shape = dict(PRESETS[cfg.model.preset])
    given = {k: getattr(cfg.model, k) for k in MODEL_SHAPE_KEYS if getattr(cfg.model, k)}
    shape.update(given)
    try:
        mcfg = LlamaConfig(**shape)  # LlamaConfig states the shape rules
    except ValueError as e:
        # ... in its own field names: say them as the keys a user would change, with their values
        def key(m: re.Match) -> str:
            name = f"model.{m[1]}" if m[1] in given else f"the preset's {m[1]}"
            return name + m[2] if m[2] else f"{name} ({shape[m[1]]})"

        msg = str(e).replace("LlamaConfig head_dim = ", "the head size ").replace("LlamaConfig.", "")
        raise ConfigError(re.sub(r"\b(" + "|".join(MODEL_SHAPE_KEYS) + r")\b( \()?", key, msg)) from None
    mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.training.seq_len)
    return mcfg


def check_model_fits(cfg: Config, mcfg: LlamaConfig, vocab_needed: int) -> None:
    if vocab_needed > mcfg.vocab_size:
        hint = "model.init_from_hf" if cfg.model.init_from_hf else f"set --model.vocab_size={vocab_needed} or more"
        raise ConfigError(f"data.tokenizer has {vocab_needed} tokens but the model's vocab_size is "
                          f"{mcfg.vocab_size} ({hint})")
    if cfg.training.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"training.seq_len {cfg.training.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")


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
    try:
        train = Blend(corpora, weights, t.seq_len, t.seed, d.val_fraction, "train")
        val = Blend(corpora, weights, t.seq_len, t.seed, d.val_fraction, "val") if d.val_fraction > 0 else None
    except ValueError as e:  # a corpus shorter than one sequence (of its split)
        raise ConfigError(f"training.seq_len = {t.seq_len} / data.val_fraction = {d.val_fraction}: {e}") from None
    return train, val


def describe_data(cfg: Config, data: Blend) -> str:
    names = [c.name for c in data.corpora]
    mix = ", ".join(f"{n} {w:.0%}" for n, w in zip(names, data.weights))
    source = "the bundled corpus" if not cfg.data.paths else f"{len(names)} shard(s)"
    return f"{source} ({mix}), tokenizer {cfg.data.tokenizer}, {cfg.data.val_fraction:.0%} held out"


def check_environment(cfg: Config, device: torch.device) -> None:
    """What the config asks of the installation, checked before anything is built."""
    if cfg.metrics.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("metrics.tensorboard = true needs the tensorboard package (pip install tensorboard)")
    if cfg.model.backend == "cuda":
        if device.type != "cuda":
            raise ConfigError(f"model.backend = 'cuda' needs a CUDA device; training.device resolves to {device}")
        why = mk.backend.unavailable_reason("rms_norm", "cuda", device)
        if why is not None:
            raise ConfigError(f"model.backend = 'cuda' needs the compiled extension; {why}")
    if cfg.model.backend == "triton":
        if not mk.backend.triton_available():
            raise ConfigError("model.backend = 'triton' needs the triton package")
        if device.type != "cuda" and not mk.backend.interpreting():
            # Triton compiles for GPUs; on CPU tensors its kernels run only under its interpreter
            raise ConfigError(f"model.backend = 'triton' on {device} needs the Triton interpreter: start with "
                              "TRITON_INTERPRET=1 in the environment (slow; meant for checking kernels), or use "
                              "model.backend = 'torch'")


class NonFinitePolicy:
    """training.nan_policy for a step whose loss or gradient norm is not finite: skip it (its
    gradients are dropped and it is counted), or save the last good state and stop. Too many
    skipped in a row stops too."""

    def __init__(self, t, skipped_total: int = 0):
        self.policy, self.max_in_a_row = t.nan_policy, t.max_skipped_steps
        self.skipped_total, self.in_a_row = skipped_total, 0

    def after_step(self, finite: bool, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, save_last_good) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.skipped_total += 1
        self.in_a_row += 1
        if self.policy == "stop":
            path = save_last_good(step)
            raise TrainingStopped(f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) at step "
                                  f"{step + 1}; the last good state (after step {step}) is saved in "
                                  f"{os.path.dirname(path)}")
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingStopped(f"{self.in_a_row} steps in a row had a non-finite loss or gradient norm "
                                  f"(training.max_skipped_steps); stopping at step {step + 1}")


class Trainer:
    """One training run on this rank: the components, each built from its config section, and
    the loop over them. ``data`` is (train, val or None) from load_data; ``stop`` the installed
    StopSignal; ``hooks`` the test seams."""

    def __init__(self, cfg: Config, device: torch.device, tokenizer, mcfg: LlamaConfig, data: tuple,
                 stop: StopSignal, hooks: Hooks, resume: bool = False, overwrite: bool = False, progress: bool = True):
        t = cfg.training
        self.cfg, self.device, self.stop, self.hooks = cfg, device, stop, hooks
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.backend = None if cfg.model.backend == "auto" else cfg.model.backend
        self.layout = par.make_layout(cfg.parallel, t.dtype, device)
        self.rank0 = not self.layout.distributed or dist.get_rank() == 0
        seed_everything(t.seed)
        self.train_data, val_data = data
        model = par.parallelize(mcfg, self.layout, device, t, cfg.parallel, cfg.model.init_from_hf)
        self.engine = Engine(model, build_objective(self.layout), self.layout, device, t, cfg.data.pack,
                             cfg.parallel.pp_schedule)
        self.optimizer, self.scheduler = build_optimizer(model.parts, t, device)
        self.validator = Validator(cfg.eval, self.engine, val_data)
        self.nan = NonFinitePolicy(t)
        self.clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        self.run_id = uuid.uuid4().hex[:12]

        def meta(step: int) -> dict:
            return dict(data_position=step * t.global_batch, skipped_steps=self.nan.skipped_total,
                        run_id=self.run_id, config=cfg.to_dict(), model_config=dataclasses.asdict(mcfg),
                        layout=self.layout.as_dict(), tokenizer_fingerprint=tokenizer.fingerprint)

        self.checkpointer = ckpt.Checkpointer(cfg.checkpoint, os.path.join(cfg.out_dir, "checkpoints"),
                                              model.parts, self.optimizer, self.scheduler, meta)
        resumed_at = self._resume_from(mcfg, tokenizer.fingerprint) if resume else None
        self.start_step = resumed_at or 0
        self.metrics = self._open_run_dir(mcfg, overwrite, resumed_at, progress)

    def say(self, msg: str) -> None:
        if self.rank0:
            print(msg, flush=True)

    def _resume_from(self, mcfg: LlamaConfig, fingerprint: str) -> int | None:
        """Load the checkpoint --resume continues from; -> its step, or None when there is none."""
        cfg = self.cfg
        path = resume_checkpoint(self.checkpointer.dir, self.layout.distributed, self.rank0, self.say)
        if path is None:
            return None
        meta = ckpt.read_meta(path)
        check_resume_compatible(cfg, mcfg, meta, path, fingerprint)
        meta = self.checkpointer.load(path, self.layout.as_dict())
        self.nan.skipped_total = meta.get("skipped_steps", 0)
        self.run_id = meta.get("run_id") or self.run_id
        self.say(f"resuming from {path} (step {meta['step']}, saved with layout {meta.get('layout')})")
        changed = changed_settings(meta.get("config", {}), cfg.to_dict())
        if changed:
            self.say(f"--resume: settings changed since that checkpoint: {', '.join(changed)}")
        if meta["step"] >= cfg.training.steps:
            self.say(f"--resume: nothing to train: the checkpoint is at step {meta['step']} and training.steps is "
                     f"{cfg.training.steps} (raise --steps to train on)")
        return meta["step"]

    def _open_run_dir(self, mcfg: LlamaConfig, overwrite: bool, resume_step: int | None, progress: bool) -> StepLog:
        """Write into out_dir, now that every start-up check has passed; -> the metrics component."""
        cfg, t = self.cfg, self.cfg.training
        if self.layout.distributed:
            dist.barrier()  # every rank has checked out_dir before rank 0 writes there
        writer = bar = None
        if self.rank0:
            prepare_out_dir(cfg, overwrite)
            writer = MetricsWriter(cfg.out_dir, resume_step, cfg.metrics.tensorboard)
            print(banner(cfg, mcfg, self.layout, self.device, self.backend, self.train_data), flush=True)
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=t.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True)
        flops = (mcfg.flops_per_token(t.seq_len), 6 * mcfg.num_params())
        return StepLog(cfg.metrics, flops, self.layout.world, self.device, writer, bar)

    def train(self) -> list[dict]:
        """Steps start_step .. training.steps; -> the logged rows (on every rank; rank 0 writes them)."""
        t, rows = self.cfg.training, []
        for part in self.engine.parts:
            part.train()
        with mk.use_backend(self.backend):
            for step in range(self.start_step, t.steps):
                if self.hooks.before_step is not None:
                    self.hooks.before_step(step)
                loss, grad_norm, signum = self.train_step(step)
                self.metrics.count(t.global_batch * t.seq_len)
                done = step + 1
                validate_now = self.validator.due(done, t.steps)
                # a validation step is also a logged step: every row carries the training metrics
                if self.metrics.due(done, t.steps) or validate_now:
                    row = self.metrics.row(done, loss.item(), lr_at(step, t), grad_norm.item(), self.nan.skipped_total)
                    if validate_now:
                        val_loss = self.validator.validate()
                        row.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                    rows.append(row)
                    self.metrics.write(row)
                saved = self.checkpointer.save(done) if self.checkpointer.due(done, t.steps) else None
                if signum and done < t.steps:
                    self.metrics.close()
                    raise TrainingInterrupted(signum, done, saved or self.checkpointer.save(done))
        self.metrics.close()
        return rows

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Forward, backward and the optimizer step (skipped when not finite); -> the step's
        global mean loss and gradient norm (device scalars), and the signal to stop on (or 0)."""
        e, lay = self.engine, self.layout
        local_loss = e.forward_backward(e.micro_batches(self.train_data, step), step, self.hooks)
        if lay.distributed and not e.model.data_parallel and lay.tp > 1:
            grads.settle_partial_grads(e.parts)
        # one all-reduce gives the global gradient norm and the global mean loss
        share = local_loss * e.loss_weight if lay.distributed else local_loss
        grad_norm, loss = grads.global_grad_norm(e.parts, lay, share)
        finite, signum = self.stop.agree(torch.isfinite(loss) & torch.isfinite(grad_norm), lay.distributed)
        if finite:
            grads.clip_grads_(e.parts, self.clip, grad_norm)
            self.optimizer.step()
        self.nan.after_step(finite, step, loss, grad_norm, self._save_last_good)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss, grad_norm, signum

    def _save_last_good(self, step: int) -> str:
        self.optimizer.zero_grad(set_to_none=True)
        return self.checkpointer.save(step)


def run(cfg: Config, resume: bool = False, hooks: Hooks | None = None, progress: bool = True,
        overwrite: bool = False) -> list[dict]:
    """Train on cfg, in this process alone or as one rank of a torchrun job; -> the logged
    metric rows (on every rank; rank 0 writes them).

    Every user error is a ConfigError (or data.ShardError, checkpoint.CheckpointError) raised
    before anything is written to out_dir. SIGTERM and SIGINT save a checkpoint after the step
    in flight and raise TrainingInterrupted."""
    hooks = hooks or Hooks()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size=world_env)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        # torchrun restarted the job after a failure: continue from the last checkpoint (an
        # --overwrite applied to the first attempt only)
        resume, overwrite = True, False
    check_out_dir(cfg.out_dir, resume, overwrite)
    device = resolve_device(cfg.training.device)
    check_environment(cfg, device)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(msg if "data.tokenizer" in msg else f"data.tokenizer {cfg.data.tokenizer!r}: {msg}") from None
    mcfg = model_config(cfg)
    check_model_fits(cfg, mcfg, tokenizer.vocab_size)
    validate_parallel(cfg, world_env, mcfg)
    data = load_data(cfg, tokenizer)  # a missing shard or a too short corpus is refused before any write
    stop = StopSignal(announce=int(os.environ.get("RANK", "0")) == 0).install()
    try:
        return Trainer(cfg, device, tokenizer, mcfg, data, stop, hooks, resume, overwrite, progress).train()
    finally:
        stop.restore()


def banner(cfg: Config, mcfg: LlamaConfig, layout, device: torch.device, backend: str | None, data: Blend) -> str:
    """What this run is, in a few lines, before the first step."""
    t = cfg.training
    model_name = cfg.model.init_from_hf or cfg.model.preset
    overrides = [f"{k}={getattr(cfg.model, k)}" for k in MODEL_SHAPE_KEYS if getattr(cfg.model, k)]
    kernels = mk.backend.resolve(backend, device)
    return "\n".join([
        f"model   {model_name}{' (' + ', '.join(overrides) + ')' if overrides else ''}: "
        f"{mcfg.num_params() / 1e6:,.2f}M parameters (dim {mcfg.dim}, {mcfg.n_layers} layers, {mcfg.n_heads} heads, "
        f"{mcfg.n_kv_heads} kv heads, ffn {mcfg.ffn_dim}, vocab {mcfg.vocab_size})",
        f"tokens  {t.global_batch * t.seq_len:,} per step (global_batch {t.global_batch} x seq_len {t.seq_len}), "
        f"{t.steps} steps",
        f"data    {describe_data(cfg, data)}",
        f"device  {device} x {layout.world} (pp {layout.pp} x dp {layout.dp} x tp {layout.tp}), {t.dtype}, "
        f"kernels {cfg.model.backend}{' -> ' + kernels if cfg.model.backend == 'auto' else ''}",
        f"output  {cfg.out_dir} (checkpoints in {os.path.join(cfg.out_dir, 'checkpoints')}, metrics in "
        f"{os.path.join(cfg.out_dir, 'metrics.jsonl')})",
    ])
