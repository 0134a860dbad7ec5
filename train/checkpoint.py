"""Checkpoints: atomic, complete, and resumable exactly.

Layout: ``DIR/checkpoints/step_00000050/`` holding the model and optimizer as a
torch.distributed.checkpoint (DCP) directory, ``extra_rank<r>.pt`` per rank (RNG states,
scheduler) and ``meta.json`` (step, data position, skipped steps, config). A checkpoint is
written under a temporary name and renamed once complete, so a kill mid-save leaves the
previous one intact; only complete ones (final name and meta.json) are ever resumed from.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

_NAME = re.compile(r"step_(\d{8})")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _pairs(model_parts, optimizer):
    """(module, its optimizer) pairs: one optimizer per model part (a pipeline rank may hold
    several stages), as train.trainer.PartOptimizers keeps them."""
    opts = list(getattr(optimizer, "optimizers", [optimizer]))
    if len(opts) != len(model_parts):
        raise ValueError(f"{len(model_parts)} model parts but {len(opts)} optimizers")
    return list(zip(model_parts, opts))


def state_dicts(model_parts, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state of every part, merged and keyed by parameter name.

    The optimizer state is flattened ("state.<fqn>.exp_avg", ...), so the keys do not depend on
    how parameters are split into parts: any layout can load what any other saved."""
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    msd, osd = {}, {}
    for part, opt in _pairs(model_parts, optimizer):
        m, o = get_state_dict(part, opt, options=options)
        msd.update(m)
        osd.update(o)
    return msd, osd


def set_state_dicts(model_parts, optimizer, msd: dict, osd: dict) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
    for part, opt in _pairs(model_parts, optimizer):
        set_state_dict(part, opt, model_state_dict=msd, optim_state_dict=osd, options=options)


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _NAME.fullmatch(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, "meta.json")):
            found.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(found)


def save(ckpt_dir: str, step: int, model, optimizer, scheduler, meta: dict, keep_last: int,
         model_parts=None) -> str:
    """Write checkpoint ``step`` atomically; prune to the newest ``keep_last``. Collective when distributed."""
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = os.path.join(ckpt_dir, f".tmp-step_{step:08d}")
    rank = _rank()
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    msd, osd = state_dicts(model_parts if model_parts is not None else [model], optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "state"))
    torch.save({"rng": rng_state(), "scheduler": scheduler.state_dict()}, os.path.join(tmp, f"extra_rank{rank}.pt"))
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, step=step), f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str, model, optimizer, scheduler, model_parts=None, load_rng: bool = True,
         layout: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; -> its meta dict.

    DCP reshards the model and optimizer into whatever layout is loading them. ``layout`` is the
    loader's (world, pp, dp, tp): when it differs from the saver's, rank r of the new job is not
    the old rank r, so RNG states are not restored (the scheduler, equal on every rank, is).
    """
    models = model_parts if model_parts is not None else [model]
    msd, osd = state_dicts(models, optimizer)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dicts(models, optimizer, state["model"], state["optim"])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    saved = meta.get("layout", dict(world=1, pp=1, dp=1, tp=1))
    if layout is not None and saved != layout:
        load_rng = False
    extra_path = os.path.join(path, f"extra_rank{_rank()}.pt")
    if not os.path.exists(extra_path):  # resuming with more ranks than saved: rank 0's scheduler
        extra_path = os.path.join(path, "extra_rank0.pt")
        load_rng = False
    extra = torch.load(extra_path, weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    if load_rng:
        set_rng_state(extra["rng"])
    return meta
