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


def cu_seqlens(cu, total: int, max_seqlen, ref: torch.Tensor) -> None:
    """Structure always; values (0 first, non-decreasing, last == total, max_seqlen bound)
    whenever not tracing under torch.compile, where a data-dependent check would break the graph."""
    tensor(cu, "cu_seqlens")
    if cu.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu.dtype}")
    ndim(cu, "cu_seqlens", 1, "1-D (n_docs + 1,)")
    if cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries (n_docs + 1), got {cu.shape[0]}")
    same_device(cu, "cu_seqlens", ref, "q")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1):
        raise ValueError(f"max_seqlen must be a positive int or None, got {max_seqlen!r}")
    if torch.compiler.is_compiling() or cu.device.type == "meta":
        return
    key = (cu._version, total, max_seqlen)
    if _checked_cu.get(cu) == key:
        return
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"cu_seqlens must end at the number of tokens in q ({total}), got {values[-1]}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest document ({max(lengths)} tokens)")
    _checked_cu[cu] = key


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


def process_group(v, name: str) -> None:
    """None, or an initialised torch.distributed ProcessGroup this process belongs to."""
    if v is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(v, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(v).__name__}")
