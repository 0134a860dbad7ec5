"""Reading the trainer's checkpoints: find one, verify it, load its model.

A checkpoint is ``RUN/checkpoints/step_00000050/``: the model and optimizer as a
torch.distributed.checkpoint (DCP) directory ``state/``, ``extra_rank<r>.pt`` per rank,
``meta.json`` (step, run config, model config) and ``manifest.json`` (size and sha256 of every
other file). ``train.checkpoint`` writes them; this module is the part that reading needs, so
that ``model.load`` and ``python -m train.export`` read a run without the trainer.

Hashing is split by writer: rank r hashes the DCP files it wrote (``__<r>_*.distcp``) and its
``extra_rank<r>.pt``; rank 0 hashes the rest (``.metadata``, ``meta.json``) and writes the
manifest. Verification splits the files the same way over the ranks of the loading job.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

import torch
import torch.distributed as dist

from .llama import Llama, LlamaConfig

MANIFEST = "manifest.json"
STEP_NAME = re.compile(r"step_(\d{8})")
_OWNED = (re.compile(r"(?:.*/)?__(\d+)_\d+\.distcp"), re.compile(r"extra_rank(\d+)\.pt"))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, incomplete or unreadable); the
    message is one line naming the checkpoint and the file."""


def file_owner(rel: str) -> int:
    """The rank that wrote (and hashes) file ``rel`` of a checkpoint directory."""
    for pattern in _OWNED:
        m = pattern.fullmatch(rel)
        if m:
            return int(m.group(1))
    return 0


def file_digest(path: str) -> dict:
    """{"size", "sha256"} of a file, read in 4 MiB chunks (memory stays flat for any size)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def gather_objects(obj) -> list:
    """obj of every rank, on every rank (a list of one outside a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        for rel in sorted(files):
            if file_owner(rel) % world != rank:
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
    problems = [p for p in gather_objects(problem) if p is not None]
    return problems[0] if problems else None


def read_meta(path: str) -> dict:
    """Checkpoint ``path``'s meta.json; CheckpointError when it is unreadable."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or "step" not in meta:
            raise ValueError("not a checkpoint's meta.json")
        return meta
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: meta.json unreadable ({type(e).__name__}: {e})") from None


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint directory under its final name, oldest first. Only a
    finished save is renamed to that name; verify() tells whether it is still intact."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = STEP_NAME.fullmatch(name)
        d = os.path.join(ckpt_dir, name)
        if m and (os.path.isfile(os.path.join(d, "meta.json")) or os.path.isfile(os.path.join(d, MANIFEST))):
            found.append((int(m.group(1)), d))
    return sorted(found)


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


def is_checkpoint_dir(path: str) -> bool:
    """A checkpoint directory itself (rather than a run directory holding checkpoints)."""
    return any(os.path.isfile(os.path.join(path, n)) for n in ("meta.json", MANIFEST))


def resolve_verified(path: str, note=None) -> str:
    """A checkpoint to read, verified: ``path`` itself when it is a checkpoint directory, else
    the newest checkpoint of run directory ``path`` (or of its checkpoints/) that verifies;
    ``note`` (a print-like callable) hears about newer ones that did not. Raises
    CheckpointError (a corrupt checkpoint) or FileNotFoundError (none at all)."""
    if is_checkpoint_dir(path):
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


def run_config(ckpt_path: str) -> dict:
    """The configuration of the run that wrote checkpoint ``ckpt_path``: the one its meta.json
    records, else the run directory's config.json (two levels up); {} when neither exists."""
    try:
        with open(os.path.join(ckpt_path, "meta.json")) as f:
            config = json.load(f).get("config")
        if isinstance(config, dict):
            return config
    except (OSError, ValueError, AttributeError):
        pass
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def tokenizer_spec(ckpt_path: str) -> str | None:
    """data.tokenizer of the run that wrote the checkpoint, or None when nothing records it."""
    return run_config(ckpt_path).get("data", {}).get("tokenizer")


def parameter_dtype(ckpt_path: str) -> torch.dtype:
    """The dtype the run's parameters computed in: bfloat16 for training.dtype = "bfloat16-params",
    else float32 (float32 weights, autocast or not). The checkpoint itself always holds the float32
    master weights."""
    dtype = run_config(ckpt_path).get("training", {}).get("dtype", "float32")
    return torch.bfloat16 if dtype == "bfloat16-params" else torch.float32


def load_model(ckpt_path: str) -> Llama:
    """The full model of checkpoint ``ckpt_path``, in float32 on the CPU, whatever parallel layout
    wrote it (DCP reshards it into one model)."""
    import torch.distributed.checkpoint as dcp

    meta = read_meta(ckpt_path)
    with torch.device("meta"):
        model = Llama(LlamaConfig(**meta["model_config"]))
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=os.path.join(ckpt_path, "state"))
    model.load_state_dict(state["model"])
    model.init_rope()
    return model
