"""Checkpoints: atomic, verified, and resumable exactly.

Layout: ``DIR/checkpoints/step_00000050/`` holding the model and optimizer as a
torch.distributed.checkpoint (DCP) directory ``state/``, ``extra_rank<r>.pt`` per rank (RNG
states, scheduler), ``meta.json`` (step, data position, skipped steps, run id, config) and
``manifest.json`` (size and sha256 of every other file). A checkpoint is written under a
temporary name, the manifest last (atomically), and the directory renamed once complete, so a
kill mid-save leaves the previous one intact. Resume and export verify the manifest before
loading anything: a flipped byte or a truncated file is named, never loaded.

Reading (finding, verifying, loading the model alone) lives in ``model.checkpoint``, so that
the model package reads runs without the trainer; its names are re-exported here. This module
adds writing, pruning and the full restore (optimizer, scheduler, RNG) that resuming needs.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from model.checkpoint import (MANIFEST, CheckpointError, complete_checkpoints, file_digest, file_owner,  # noqa: F401
                              gather_objects, newest_valid, read_meta, resolve_verified, verify)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for n in names]
    return sorted(out)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def set_aside(path: str) -> str:
    """Rename a checkpoint that failed verification to rejected-<name> (never deleted)."""
    parent, name = os.path.split(path)
    target, n = os.path.join(parent, f"rejected-{name}"), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(parent, f"rejected-{name}.{n}")
    os.replace(path, target)
    return target


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
    several stages), as train.optim.PartOptimizers keeps them."""
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


def _run_id_of(path: str) -> str | None:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def prune(ckpt_dir: str, step: int, run_id: str | None, keep_last: int) -> list[str]:
    """Delete this run's checkpoints older than the newest ``keep_last`` up to ``step`` (the one
    just written); -> the deleted paths. Another run's checkpoints, and steps after ``step``
    (a discarded future that will be overwritten), are never touched."""
    mine = [p for s, p in complete_checkpoints(ckpt_dir) if s <= step and _run_id_of(p) == run_id]
    doomed = mine[:-keep_last] if run_id is not None else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


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
    # every rank hashes what it wrote (rank 0 also .metadata and meta.json), in parallel
    world = _world()
    mine = {rel: file_digest(os.path.join(tmp, rel)) for rel in _files(tmp)
            if file_owner(rel) == rank or (rank == 0 and file_owner(rel) >= world)}
    digests = gather_objects(mine)
    if rank == 0:
        files = {}
        for d in digests:
            files.update(d)
        _write_json_atomic(os.path.join(tmp, MANIFEST), {"format": 1, "algorithm": "sha256", "files": files})
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(ckpt_dir, step, meta.get("run_id"), keep_last)
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
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    except Exception as e:  # verified files that still do not load: say which checkpoint, in one line
        raise CheckpointError(f"{path}: the model and optimizer state do not load: {_one_line(e)}") from None
    set_state_dicts(models, optimizer, state["model"], state["optim"])
    meta = read_meta(path)
    saved = meta.get("layout", dict(world=1, pp=1, dp=1, tp=1))
    if layout is not None and saved != layout:
        load_rng = False
    extra_path = os.path.join(path, f"extra_rank{_rank()}.pt")
    if not os.path.exists(extra_path):  # resuming with more ranks than saved: rank 0's scheduler
        extra_path = os.path.join(path, "extra_rank0.pt")
        load_rng = False
    try:
        extra = torch.load(extra_path, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{extra_path}: unreadable: {_one_line(e)}") from None
    scheduler.load_state_dict(extra["scheduler"])
    if load_rng:
        set_rng_state(extra["rng"])
    return meta


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
    """The checkpoint component of a training run, built from the checkpoint section: when to
    save, and this run's state (``parts``, ``optimizer``, ``scheduler``) saved to or loaded
    from ``ckpt_dir``. ``meta(step)`` gives the run's metadata as of ``step``."""

    def __init__(self, section, ckpt_dir: str, parts, optimizer, scheduler, meta):
        self.section, self.dir = section, ckpt_dir
        self.parts, self.optimizer, self.scheduler, self.meta = parts, optimizer, scheduler, meta

    def due(self, done: int, last: int) -> bool:
        return bool(self.section.interval and done % self.section.interval == 0) or done == last

    def save(self, step: int) -> str:
        return save(self.dir, step, None, self.optimizer, self.scheduler, self.meta(step), self.section.keep_last,
                    model_parts=self.parts)

    def load(self, path: str, layout: dict) -> dict:
        return load(path, None, self.optimizer, self.scheduler, model_parts=self.parts, layout=layout)
