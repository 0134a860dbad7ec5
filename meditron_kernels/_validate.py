"""Input validation shared by every backend: runs once, in Python, before any kernel.

Errors name the argument and what was expected (TypeError for kinds and dtypes,
ValueError for shapes and values).
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

# float64 is for the torch backend (references, gradcheck); the kernels take the other three.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


def tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def floating(x, name: str) -> None:
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32, float16, bfloat16 or float64 tensor, got {x.dtype}")


def kernel_dtype(x: torch.Tensor, name: str, backend: str) -> None:
    """For kernel backends: float64 exists only on the torch backend."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: backend={backend!r} supports float32, float16 and bfloat16, got {x.dtype}")


def integer(x, name: str) -> None:
    tensor(x, name)
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {x.dtype}")


def ndim(x: torch.Tensor, name: str, n: int | tuple[int, ...], shape_doc: str) -> None:
    allowed = (n,) if isinstance(n, int) else n
    if x.dim() not in allowed:
        raise ValueError(f"{name} must be {shape_doc}, got {x.dim()}-D shape {tuple(x.shape)}")


def same_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must be on the same device")


def same_dtype(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")


def positive_int(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def positive_float(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name} must be a positive number, got {v!r}")


# cu_seqlens values are checked once per tensor version: a trainer passes the same tensor
# to every layer, so the host sync this costs happens once per step, not once per layer.
_checked_cu = WeakIdKeyDictionary()


def cu_seqlens(cu, total: int, max_seqlen, ref: torch.Tensor, name: str = "cu_seqlens", tokens_of: str = "q",
               max_name: str = "max_seqlen") -> None:
    """Structure always; values (0 first, non-decreasing, last == total, max_seqlen bound)
    whenever not tracing under torch.compile, where a data-dependent check would break the graph."""
    tensor(cu, name)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    ndim(cu, name, 1, "1-D (n_docs + 1,)")
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 entries (n_docs + 1), got {cu.shape[0]}")
    same_device(cu, name, ref, "q")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1):
        raise ValueError(f"{max_name} must be a positive int or None, got {max_seqlen!r}")
    if _tracing(cu):
        return
    key = (cu._version, total, max_seqlen)
    if _checked_cu.get(cu) == key:
        return
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the number of tokens in {tokens_of} ({total}), got {values[-1]}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest document ({max(lengths)} tokens)")
    _checked_cu[cu] = key


def _tracing(t: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or t.device.type == "meta"


def _check_key_counts(lq: list[int], lk: list[int], causal: bool, what: str) -> None:
    for i, (nq, nk) in enumerate(zip(lq, lk)):
        if causal and nq > nk:
            raise ValueError(f"causal attention needs at most as many queries as keys ({what} {i}: {nq} queries, "
                             f"{nk} keys): the queries are the last keys")
        if nq and not nk:
            raise ValueError(f"{what} {i} has {nq} queries and no keys")


def key_lengths(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool) -> None:
    """Per document: keys for every query, and with causal no more queries than keys."""
    if _tracing(cu_q):
        return
    q, k = cu_q.tolist(), cu_k.tolist()
    _check_key_counts([b - a for a, b in zip(q, q[1:])], [b - a for a, b in zip(k, k[1:])], causal, "document")


def seqlens_k(lens, batch: int, sq: int, sk: int, causal: bool, ref: torch.Tensor) -> None:
    """(batch,) int32 valid key counts, each in [0, sk]; checked once per tensor version (every layer
    of a model shares it)."""
    tensor(lens, "seqlens_k")
    if lens.dtype != torch.int32:
        raise TypeError(f"seqlens_k must be int32, got {lens.dtype}")
    if tuple(lens.shape) != (batch,):
        raise ValueError(f"seqlens_k must have shape ({batch},) (one count per sequence), got {tuple(lens.shape)}")
    same_device(lens, "seqlens_k", ref, "q")
    if _tracing(lens):
        return
    key = (lens._version, sq, sk, causal)
    if _checked_cu.get(lens) == key:
        return
    values = lens.tolist()
    if any(n < 0 or n > sk for n in values):
        raise ValueError(f"seqlens_k must lie in [0, sk={sk}], got {values}")
    _check_key_counts([sq] * batch, values, causal, "sequence")
    _checked_cu[lens] = key


_checked_positions = WeakIdKeyDictionary()


def position_range(position_ids: torch.Tensor, n_positions: int) -> None:
    """position_ids must index rows of the rotary tables. Checked once per tensor version (a
    model passes the same position_ids to every layer) and skipped while tracing."""
    if torch.compiler.is_compiling() or position_ids.device.type == "meta" or position_ids.numel() == 0:
        return
    key = (position_ids._version, n_positions)
    if _checked_positions.get(position_ids) == key:
        return
    lo, hi = (int(v) for v in torch.aminmax(position_ids))
    if lo < 0 or hi >= n_positions:
        raise ValueError(f"position_ids must lie in [0, {n_positions}) (the rows of cos and sin), "
                         f"got values in [{lo}, {hi}]")
    _checked_positions[position_ids] = key


def rotary_per_token(cos, sin, q: torch.Tensor) -> None:
    """Per-token rotary angles, as transformers computes them: cos and sin (batch or 1, seq, head_dim),
    matching q (batch, seq, n_heads, head_dim); batch 1 is broadcast over q's batch."""
    batch, seq, _, head_dim = q.shape
    for t, name in ((cos, "cos"), (sin, "sin")):
        floating(t, name)
        ndim(t, name, 3, f"3-D (batch, seq, head_dim) = ({batch} or 1, {seq}, {head_dim}) for per-token angles")
        if t.shape[0] not in (1, batch) or t.shape[1:] != (seq, head_dim):
            raise ValueError(f"{name} must have shape ({batch} or 1, {seq}, {head_dim}) (batch or 1, seq, head_dim) "
                             f"for per-token angles, got {tuple(t.shape)}")
        same_device(t, name, q, "q")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")


def rotary_position_ids(position_ids, q: torch.Tensor, n_positions: int) -> None:
    """position_ids (batch, seq), or (1, seq) broadcast over the batch, indexing rows of the tables."""
    integer(position_ids, "position_ids")
    batch, seq = q.shape[:2]
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq:
        raise ValueError(f"position_ids must have shape (batch, seq) = ({batch}, {seq}) or (1, {seq}), "
                         f"got {tuple(position_ids.shape)}")
    same_device(position_ids, "position_ids", q, "q")
    position_range(position_ids, n_positions)


def process_group(v, name: str) -> None:
    """None, or an initialised torch.distributed ProcessGroup this process belongs to."""
    if v is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(v, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(v).__name__}")


_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_scaling(scaling, theta: float, supported: tuple[str, ...]) -> None:
    """transformers' rope_parameters / rope_scaling dict: a supported type, with its keys present,
    positive and consistent. Keys other types use (beta_fast, ...) are ignored, as transformers does."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be a dict of rope parameters (transformers' rope_parameters) or None, "
                        f"got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in supported:
        raise ValueError(f"scaling: rope_type {kind!r} is not implemented; supported: {', '.join(supported)}")
    for key in _ROPE_KEYS.get(kind, ()):
        if key not in scaling:
            raise ValueError(f"scaling: rope_type {kind!r} needs {key!r}, missing from {scaling}")
        positive_float(scaling[key], f"scaling[{key!r}]")
    if kind == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ValueError(f"scaling: low_freq_factor ({scaling['low_freq_factor']}) must be below high_freq_factor "
                         f"({scaling['high_freq_factor']})")
    if scaling.get("rope_theta") is not None and float(scaling["rope_theta"]) != float(theta):
        raise ValueError(f"scaling['rope_theta'] = {scaling['rope_theta']} disagrees with theta = {theta}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"scaling: partial_rotary_factor {scaling['partial_rotary_factor']} is not implemented "
                         "(rotary covers the whole head_dim)")
