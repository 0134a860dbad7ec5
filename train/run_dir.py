"""The run directory: who may use it, what --overwrite deletes, and which checkpoint --resume
continues from (and whether the settings allow it).

Everything here that checks only reads, so every rank of a job can check before rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch.distributed as dist

from . import checkpoint as ckpt
from .config import MODEL_SHAPE_KEYS, Config, ConfigError

# Files of a run directory the trainer owns: --overwrite deletes these and nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "tensorboard")

# Keys whose change breaks the exact data order or the saved tensors' meaning: a resumed run
# must keep them. (training.global_batch is checked through the data position.)
RESUME_KEYS = ("training.seed", "training.seq_len", "training.global_batch", "data.paths", "data.weights",
               "data.val_fraction", "data.tokenizer")


def check_out_dir(out: str, resume: bool, overwrite: bool) -> None:
    """A run directory belongs to one run: a used one needs --resume (continue it) or
    --overwrite (start over). Reads only."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
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
    """Rank 0 only, once every start-up check has passed: create out_dir (under --overwrite
    removing the previous run's files) and record the config there."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                path = os.path.join(cfg.out_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    except OSError as e:
        raise ConfigError(f"out_dir {cfg.out_dir!r}: {e.strerror or e}") from None


def resume_checkpoint(ckpt_dir: str, distributed: bool, rank0: bool, say) -> str | None:
    """The newest checkpoint in ckpt_dir that verifies, or None when there is none at all.

    Ones that fail verification are named (``say``) and set aside as rejected-step_*, so that
    pruning and later resumes skip them; none verifying is a CheckpointError. Every rank of a
    job gets rank 0's choice."""
    found = ckpt.complete_checkpoints(ckpt_dir)
    if distributed:
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    if not found:
        say(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        return None
    path, rejected = ckpt.newest_valid(found)
    if path is None:
        raise ckpt.CheckpointError(f"--resume: no checkpoint in {ckpt_dir} verifies ({'; '.join(rejected)})")
    if rejected:
        if rank0:
            for line in rejected:
                ckpt.set_aside(os.path.join(ckpt_dir, line.split(":")[0]))
        if distributed:
            dist.barrier()
        say(f"--resume: {'; '.join(rejected)}; falling back to {os.path.basename(path)}, the newest "
            "checkpoint that verifies (the others are renamed rejected-step_*)")
    return path


def _blend(paths: list, weights: list) -> tuple:
    paths = [os.path.normpath(p) for p in paths]
    w = weights or [1.0] * len(paths)
    total = sum(w) or 1.0
    return paths, [round(x / total, 12) for x in w]


def check_resume_compatible(cfg: Config, mcfg, meta: dict, path: str, fingerprint: str) -> None:
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
    # every field of the model's config (family switches included), as JSON holds them; max_seq_len
    # follows training.seq_len, checked above
    now = json.loads(json.dumps(dataclasses.asdict(mcfg)))
    for name, was in saved_shape.items():
        if name != "max_seq_len" and name in now and now[name] != was:
            key = f"model.{name}" if name in MODEL_SHAPE_KEYS else f"the model's {name}"
            raise ConfigError(f"cannot resume from {path}: {key} was {was!r} there and is {now[name]!r} now "
                              "(the model's shape); keep it, or start a new run in another --out-dir")
    if "step" in meta and meta.get("data_position") != meta["step"] * cfg.training.global_batch:
        raise ConfigError(f"checkpoint {path} was written with another training.global_batch")


def _flat(cfg: dict):
    for section, values in cfg.items():
        if isinstance(values, dict):
            for name, value in values.items():
                yield f"{section}.{name}", value
        else:
            yield section, values


def changed_settings(saved: dict, now: dict) -> list[str]:
    """'key was -> now' for each setting a resumed run changed that check_resume_compatible lets
    through (learning rate, steps, intervals, layout, ...); saved and now are Config.to_dict()s.
    out_dir is not a setting of the run: a run directory may be moved or copied."""
    kept = set(RESUME_KEYS) | {f"model.{k}" for k in MODEL_SHAPE_KEYS} | {"out_dir"}
    before = dict(_flat(saved))
    return [f"{k} {before[k]!r} -> {v!r}" for k, v in _flat(now)
            if k in before and k not in kept and before[k] != v]
