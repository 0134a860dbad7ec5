"""Checkpoints: atomic, verified, and resumable exactly.

Layout: ``DIR/checkpoints/step_00000050/`` holding the model and optimizer as a
torch.distributed.checkpoint (DCP) directory ``state/``, ``extra_rank<r>.pt`` per rank (RNG
states, scheduler), ``meta.json`` (step, data position, skipped steps, run id, config) and
``manifest.json`` (size and sha256 of every other file). A checkpoint is written under a
temporary name, the manifest last (atomically), and the directory renamed once complete, so a
kill mid-save leaves the previous one intact. Resume and export verify the manifest before
loading anything: a flipped byte or a truncated file is named, never loaded.

Hashing is split by writer: rank r hashes the DCP files it wrote (``__<r>_*.distcp``) and its
``extra_rank<r>.pt``; rank 0 hashes the rest (``.metadata``, ``meta.json``) and writes the
manifest. Verification splits the files the same way over the ranks of the loading job.
"""
from __future__ import annotations

import hashlib
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
MANIFEST = "manifest.json"
_OWNED = (re.compile(r"(?:.*/)?__(\d+)_\d+\.distcp"), re.compile(r"extra_rank(\d+)\.pt"))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, incomplete or unreadable); the
    message is one line naming the checkpoint and the file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _owner(rel: str) -> int:
    """The rank that wrote (and hashes) file ``rel`` of a checkpoint directory."""
    for pattern in _OWNED:
        m = pattern.fullmatch(rel)
        if m:
            return int(m.group(1))
    return 0


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for n in names]
    return sorted(out)


def file_digest(path: str) -> dict:
    """{"size", "sha256"} of a file, read in 4 MiB chunks (memory stays flat for any size)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _gather(obj) -> list:
    """obj of every rank, on every rank (a list of one outside a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(path: str) -> str | None:
    """Check checkpoint ``path`` against its manifest; -> None when every file matches, else
    the first problem, naming the file. Collective in a process group: each rank hashes its
    share of the files and all ranks return the same answer."""
    problem = None
    manifest_path = os.path.join(path, MANIFEST)
    files = {}
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
        for required in ("meta.json", "state/.metadata"):
            if required not in files:
                raise ValueError(f"{required} not listed")
    except FileNotFoundError:
        problem = f"{MANIFEST} missing (an incomplete checkpoint, or one written before manifests)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    if problem is None:
        rank, world = _rank(), _world()
        for rel in sorted(files):
            if _owner(rel) % world != rank:
                continue
            want, full = files[rel], os.path.join(path, rel)
            if not isinstance(want, dict) or not {"size", "sha256"} <= want.keys():
                problem = f"{MANIFEST} unreadable (entry {rel!r} malformed)"
                break
            if not os.path.isfile(full):
                problem = f"{rel} missing"
                break
            size = os.path.getsize(full)
            if size != want["size"]:
                problem = f"{rel} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
                break
            if file_digest(full)["sha256"] != want["sha256"]:
                problem = f"{rel}: sha256 does not match the manifest (corrupt)"
                break
    problems = [p for p in _gather(problem) if p is not None]
    return problems[0] if problems else None


def set_aside(path: str) -> str:
    """Rename a checkpoint that failed verification to rejected-<name> (never deleted)."""
    parent, name = os.path.split(path)
    target, n = os.path.join(parent, f"rejected-{name}"), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(parent, f"rejected-{name}.{n}")
    os.replace(path, target)
    return target


def read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or "step" not in meta:
            raise ValueError("not a checkpoint's meta.json")
        return meta
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: meta.json unreadable ({type(e).__name__}: {e})") from None


def newest_valid(found: list[tuple[int, str]]) -> tuple[str | None, list[str]]:
    """The newest of ``found`` (complete_checkpoints' list) that verifies, and one
    "name: problem" line per newer checkpoint that did not. Collective in a process group."""
    rejected = []
    for _, path in reversed(found):
        problem = verify(path)
        if problem is None:
            return path, rejected
        rejected.append(f"{os.path.basename(path)}: {problem}")
    return None, rejected


def resolve_verified(path: str, note=None) -> str:
    """A checkpoint to read, verified: ``path`` itself when it is a checkpoint directory, else
    the newest checkpoint of run directory ``path`` (or of its checkpoints/) that verifies;
    ``note`` (a print-like callable) hears about newer ones that did not. Raises
    CheckpointError (a corrupt checkpoint) or FileNotFoundError (none at all)."""
    if any(os.path.isfile(os.path.join(path, n)) for n in ("meta.json", MANIFEST)):
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}")
        return path
    for candidate in (os.path.join(path, "checkpoints"), path):
        found = complete_checkpoints(candidate)
        if found:
            best, rejected = newest_valid(found)
            if best is None:
                raise CheckpointError(f"{candidate}: no checkpoint verifies ({'; '.join(rejected)})")
            if rejected and note is not None:
                note(f"{'; '.join(rejected)}; using {os.path.basename(best)}, the newest checkpoint that verifies")
            return best
    raise FileNotFoundError(f"{path}: no complete checkpoint (a step_XXXXXXXX directory with meta.json) found")


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


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint directory under its final name, oldest first. Only a
    finished save is renamed to that name; verify() tells whether it is still intact."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _NAME.fullmatch(name)
        d = os.path.join(ckpt_dir, name)
        if m and (os.path.isfile(os.path.join(d, "meta.json")) or os.path.isfile(os.path.join(d, MANIFEST))):
            found.append((int(m.group(1)), d))
    return sorted(found)


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
            if _owner(rel) == rank or (rank == 0 and _owner(rel) >= world)}
    digests = _gather(mine)
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
