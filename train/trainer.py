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
import shutil
import signal
import threading
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

import meditron_kernels as mk
from model import LlamaConfig
from model.llama import PRESETS

from . import checkpoint as ckpt
from . import parallelize as par
from .config import MODEL_SHAPE_KEYS, Config, ConfigError, validate, validate_parallel
from .data import Blend, bundled_corpora, load_shard, make_batch
from .loss import lm_loss
from .metrics import device_peak_flops, memory_gb, mfu
from .tokenizer import load_tokenizer

# Test seam for the fault-tolerance test, read by fault_injection_hooks() only: "RANK:STEP" makes
# global rank RANK kill itself (SIGKILL) when it reaches step STEP, on the job's first attempt
# (TORCHELASTIC_RESTART_COUNT = 0), so that torchrun --max-restarts restarts the job.
FAULT_ENV = "MEDITRON_TRAIN_TEST_KILL_RANK_AT_STEP"
# The same for preemption: "RANK:STEP" sends SIGTERM to global rank RANK alone before step STEP.
SIGNAL_ENV = "MEDITRON_TRAIN_TEST_SIGTERM_RANK_AT_STEP"


class TrainingStopped(RuntimeError):
    """Raised by nan_policy='stop' (after saving the last good state) and after too many skipped steps."""


class TrainingInterrupted(RuntimeError):
    """Raised after SIGTERM or SIGINT, once the checkpoint of the last finished step is saved."""

    def __init__(self, signum: int, step: int, path: str):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"{signal.Signals(signum).name} after step {step}: checkpoint {path} saved; "
                         "continue with --resume")


class StopSignal:
    """SIGTERM and SIGINT handlers that ask the loop to stop at the next step boundary.

    The handler only records the signal: the loop saves a checkpoint after the step in flight
    and leaves. Repeats are ignored (torchrun's agent forwards the signal it got to workers
    that may have had it already), except a second Ctrl-C at least 2 s after the first, which
    quits at once without saving."""

    def __init__(self, announce: bool):
        self.signum = 0
        self.first_at = 0.0
        self.announce = announce
        self.previous = {}

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum:
            if signum == signal.SIGINT and now - self.first_at >= 2.0:
                os.write(2, b"\nsecond Ctrl-C: quitting without saving\n")
                os._exit(128 + signum)
            return
        self.signum, self.first_at = signum, now
        if self.announce:
            name = signal.Signals(signum).name
            os.write(2, f"\n{name}: saving a checkpoint after the current step, then stopping\n".encode())


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
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"model.init_from_hf: {path} is not a Llama config.json ({e})") from None
    shape = dict(PRESETS[cfg.model.preset])
    given = {k: getattr(cfg.model, k) for k in MODEL_SHAPE_KEYS if getattr(cfg.model, k)}
    shape.update(given)
    shape.setdefault("n_kv_heads", shape["n_heads"])

    def name(k):  # the key a user would change
        return f"model.{k}" if k in given else f"the preset's {k}"

    if shape["dim"] % shape["n_heads"]:
        raise ConfigError(f"{name('dim')} ({shape['dim']}) must be divisible by {name('n_heads')} ({shape['n_heads']})")
    if shape["n_heads"] % shape["n_kv_heads"]:
        raise ConfigError(f"{name('n_heads')} ({shape['n_heads']}) must be divisible by {name('n_kv_heads')} "
                          f"({shape['n_kv_heads']})")
    if (shape["dim"] // shape["n_heads"]) % 2:
        raise ConfigError(f"the head size {name('dim')} / {name('n_heads')} = {shape['dim']} / {shape['n_heads']} "
                          "must be even (rotary embeddings rotate pairs)")
    mcfg = LlamaConfig(**shape)
    mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.training.seq_len)
    return mcfg


def check_model_fits(cfg: Config, mcfg: LlamaConfig, vocab_needed: int) -> None:
    if vocab_needed > mcfg.vocab_size:
        hint = "model.init_from_hf" if cfg.model.init_from_hf else f"set --model.vocab_size={vocab_needed} or more"
        raise ConfigError(f"data.tokenizer has {vocab_needed} tokens but the model's vocab_size is "
                          f"{mcfg.vocab_size} ({hint})")
    if cfg.training.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"training.seq_len {cfg.training.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")


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


# Files of a run directory the trainer owns: --overwrite deletes these and nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "tensorboard")


def check_out_dir(cfg: Config, resume: bool, overwrite: bool) -> None:
    """A run directory belongs to one run: a used one needs --resume (continue it) or
    --overwrite (start over). Reads only, so every rank of a job can check before any writes."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    out = cfg.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out_dir {out!r} exists and is not a directory")
    existing = out
    while not os.path.isdir(existing):  # the deepest part that exists must let us create the rest
        parent = os.path.dirname(os.path.abspath(existing))
        if parent == os.path.abspath(existing):
            break
        existing = parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out!r} is not writable ({existing!r} does not let this user create files)")
    if os.path.isdir(out) and not resume and not overwrite:
        entries = sorted(os.listdir(out))
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(f"out_dir {out!r} is not empty ({shown}): continue its run with --resume, "
                              "start over with --overwrite, or choose another --out-dir")


def prepare_out_dir(cfg: Config, overwrite: bool) -> None:
    """Rank 0 only: create out_dir; under --overwrite remove the previous run's files."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                path = os.path.join(cfg.out_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
    except OSError as e:
        raise ConfigError(f"out_dir {cfg.out_dir!r}: {e.strerror or e}") from None


def check_environment(cfg: Config, device: torch.device) -> None:
    """What the config asks of the installation, checked before anything is built."""
    if cfg.metrics.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("metrics.tensorboard = true needs the tensorboard package (pip install tensorboard)")
    if cfg.model.backend == "cuda":
        if device.type != "cuda":
            raise ConfigError(f"model.backend = 'cuda' needs a CUDA device; training.device resolves to {device}")
        if not mk.backend.cuda_extension_available():
            from meditron_kernels import _cuda_ext

            raise ConfigError(f"model.backend = 'cuda' needs the compiled extension: {_cuda_ext.why_unavailable()}")
    if cfg.model.backend == "triton":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ConfigError("model.backend = 'triton' needs the triton package")


# Keys whose change breaks the exact data order or the saved tensors' meaning: a resumed run
# must keep them. (training.global_batch is checked through the data position.)
RESUME_KEYS = ("training.seed", "training.seq_len", "training.global_batch", "data.paths", "data.weights",
               "data.val_fraction", "data.tokenizer")


def _blend(paths: list, weights: list) -> tuple:
    paths = [os.path.normpath(p) for p in paths]
    w = weights or [1.0] * len(paths)
    total = sum(w) or 1.0
    return paths, [round(x / total, 12) for x in w]


def check_resume_compatible(cfg: Config, mcfg: LlamaConfig, meta: dict, path: str, fingerprint: str) -> None:
    """Refuse a checkpoint written with another seed, sequence length, data blend or model shape."""
    saved = meta.get("config", {})
    now = cfg.to_dict()
    for key in RESUME_KEYS:
        section, name = key.split(".")
        if name not in saved.get(section, {}):
            continue
        was, is_ = saved[section][name], now[section][name]
        if key == "data.tokenizer" and meta.get("tokenizer_fingerprint") == fingerprint:
            continue  # the same tokenizer at another path
        if key in ("data.paths", "data.weights"):
            i = 0 if key == "data.paths" else 1
            same = (_blend(saved["data"]["paths"], saved["data"]["weights"])[i]
                    == _blend(now["data"]["paths"], now["data"]["weights"])[i])
        else:
            same = was == is_
        if not same:
            raise ConfigError(f"cannot resume from {path}: {key} was {was!r} there and is {is_!r} now (it fixes "
                              "the data order); keep it, or start a new run in another --out-dir")
    saved_shape = meta.get("model_config", {})
    for name in MODEL_SHAPE_KEYS:
        if name in saved_shape and saved_shape[name] != getattr(mcfg, name):
            raise ConfigError(f"cannot resume from {path}: model.{name} was {saved_shape[name]!r} there and is "
                              f"{getattr(mcfg, name)!r} now (the model's shape); keep it, or start a new run in "
                              "another --out-dir")


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
    """Hooks for the command line: empty unless a fault-injection test variable is set."""
    kill = os.environ.get(FAULT_ENV, "")
    term = os.environ.get(SIGNAL_ENV, "")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        kill = ""
    if not kill and not term:
        return Hooks()
    actions = {}
    for spec, sig in ((kill, signal.SIGKILL), (term, signal.SIGTERM)):
        if spec:
            rank, step = (int(v) for v in spec.split(":"))
            if int(os.environ.get("RANK", "0")) == rank:
                actions[step] = sig

    def before_step(s: int) -> None:
        if s in actions:
            os.kill(os.getpid(), actions[s])

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


def run(cfg: Config, resume: bool = False, hooks: Hooks | None = None, progress: bool = True,
        overwrite: bool = False) -> list[dict]:
    """Train on cfg, in this process alone or as one rank of a torchrun job; -> the logged
    metric rows (on every rank; rank 0 writes them).

    Every user error is a ConfigError (or data.ShardError, checkpoint.CheckpointError) raised
    before anything is built or written where it can be. SIGTERM and SIGINT save a checkpoint
    after the step in flight and raise TrainingInterrupted."""
    hooks = hooks or Hooks()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size=world_env)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        # torchrun restarted the job after a failure: continue from the last checkpoint (an
        # --overwrite applied to the first attempt only)
        resume, overwrite = True, False
    check_out_dir(cfg, resume, overwrite)
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
        return _train(cfg, resume, overwrite, hooks, progress, device, tokenizer, mcfg, data, stop)
    finally:
        stop.restore()


def _train(cfg: Config, resume: bool, overwrite: bool, hooks: Hooks, progress: bool, device: torch.device,
           tokenizer, mcfg: LlamaConfig, data: tuple, stop: StopSignal) -> list[dict]:
    t = cfg.training
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = None if cfg.model.backend == "auto" else cfg.model.backend

    layout = par.make_layout(cfg, device)
    rank0 = not layout.distributed or dist.get_rank() == 0
    if layout.distributed:
        dist.barrier()  # every rank has checked out_dir before rank 0 writes there
    if rank0:
        prepare_out_dir(cfg, overwrite)
    seed_everything(t.seed)
    train_data, val_data = data
    engine = Engine(cfg, layout, device, mcfg)
    parts = engine.parts
    optimizer = build_optimizer(parts, cfg, device)
    scheduler = PartSchedulers(optimizer, cfg)

    def say(msg: str) -> None:
        if rank0:
            print(msg, flush=True)

    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    start_step, skipped_total, resumed = 0, 0, False
    run_id = uuid.uuid4().hex[:12]
    if resume:
        found = ckpt.complete_checkpoints(ckpt_dir)
        if layout.distributed:  # every rank must agree on the checkpoint (rank 0's view wins)
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        if not found:
            say(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            path, rejected = ckpt.newest_valid(found)
            if path is None:
                raise ckpt.CheckpointError(f"--resume: no checkpoint in {ckpt_dir} verifies ({'; '.join(rejected)})")
            if rejected:
                # moved aside (kept for inspection) so that pruning and later resumes skip them
                if rank0:
                    for line in rejected:
                        ckpt.set_aside(os.path.join(ckpt_dir, line.split(":")[0]))
                if layout.distributed:
                    dist.barrier()
                say(f"--resume: {'; '.join(rejected)}; falling back to {os.path.basename(path)}, the newest "
                    "checkpoint that verifies (the others are renamed rejected-step_*)")
            meta = ckpt.read_meta(path)
            check_resume_compatible(cfg, mcfg, meta, path, tokenizer.fingerprint)
            if meta.get("data_position") != meta["step"] * t.global_batch:
                raise ConfigError(f"checkpoint {path} was written with another training.global_batch")
            meta = ckpt.load(path, None, optimizer, scheduler, model_parts=parts, layout=layout.as_dict())
            start_step, skipped_total, resumed = meta["step"], meta.get("skipped_steps", 0), True
            run_id = meta.get("run_id") or run_id
            say(f"resuming from {path} (step {start_step}, saved with layout {meta.get('layout')})")
    writer = None
    if rank0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
        writer = MetricsWriter(cfg.out_dir, start_step if resumed else None, cfg.metrics.tensorboard)

    flops_tok = mcfg.flops_per_token(t.seq_len)
    flops_tok_paper = 6 * mcfg.num_params()
    peak = device_peak_flops(device, cfg.metrics.peak_tflops)
    if rank0:
        print(banner(cfg, mcfg, layout, device, backend, train_data), flush=True)

    def save(step: int) -> str:
        return ckpt.save(ckpt_dir, step, None, optimizer, scheduler,
                         dict(data_position=step * t.global_batch, skipped_steps=skipped_total, run_id=run_id,
                              config=cfg.to_dict(), model_config=dataclasses.asdict(mcfg), layout=layout.as_dict(),
                              tokenizer_fingerprint=tokenizer.fingerprint),
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
            finite_t = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
            if layout.distributed:
                # every rank stops after the same step: the largest signal number seen by any rank
                flag = torch.tensor(float(stop.signum), device=finite_t.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                finite, signum = torch.stack([finite_t.float(), flag]).tolist()  # the one sync per step
                finite, signum = bool(finite), int(signum)
            else:
                finite, signum = bool(finite_t), stop.signum  # the one sync per step
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
            evaluate = (val_data is not None and cfg.eval.interval > 0
                        and (done % cfg.eval.interval == 0 or done == t.steps))
            # a validation step is also a logged step: every row carries the training metrics
            if done % cfg.metrics.log_interval == 0 or done == t.steps or evaluate:
                now = time.perf_counter()
                tps = window_tokens / (now - window_start)
                row = dict(step=done, loss=step_loss.item(), lr=lr_at(step, cfg), grad_norm=grad_norm.item(),
                           tokens_per_s=tps, tflops_per_device=flops_tok * tps / layout.world / 1e12,
                           mfu=mfu(flops_tok, tps, layout.world, peak),
                           mfu_paper=mfu(flops_tok_paper, tps, layout.world, peak), memory_gb=memory_gb(device),
                           skipped_steps=skipped_total)
                if evaluate:
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
            saved = None
            if (cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0) or done == t.steps:
                saved = save(done)
            if signum and done < t.steps:
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(signum, done, saved or save(done))
    if bar is not None:
        bar.close()
    return rows


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
