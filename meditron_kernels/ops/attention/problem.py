"""The description of one attention call as the kernels see it (_Problem) and the launch arguments
every kernel shares."""
from __future__ import annotations

import dataclasses

import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary

from ... import _validate as V
from .tiles import _d_pad, _qk_pad

LOG2E = 1.4426950408889634


def _bsh(x: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(sequence, token, head) strides in elements; a pack is one sequence axis, so its first is 0."""
    return (0, x.stride(0), x.stride(1)) if packed else (x.stride(0), x.stride(1), x.stride(2))


# The longest document per cu_seqlens version: a trainer passes the same offsets to every layer,
# so the host sync this costs happens once per step.
_longest = WeakIdKeyDictionary()


def _longest_document(cu: torch.Tensor) -> int:
    hit = _longest.get(cu)
    if hit is None or hit[0] != cu._version:
        hit = (cu._version, int((cu[1:] - cu[:-1]).max().item()))
        _longest[cu] = hit
    return hit[1]


def _check_positions(position_ids: torch.Tensor | None, n_table: int, longest: int) -> None:
    # A position outside the tables would read out of bounds in the kernel: refuse it before launch.
    # This runs inside the op, so also under torch.compile, where the public API's check is skipped.
    if position_ids is None:
        if longest > n_table:
            raise ValueError(f"cos and sin cover {n_table} positions but a sequence has {longest} tokens; "
                             "pass position_ids or longer tables")
        return
    V.position_range(position_ids, n_table)


@dataclasses.dataclass
class _Problem:
    """Everything the three kernels share about one call."""
    packed: bool
    n_batch: int  # batch size, or number of documents
    seqlen_q: int  # query length, or the longest query document
    seqlen_k: int  # key length (k's rows when batched), or the longest key document
    n_heads: int
    n_kv: int
    head_dim: int
    causal: bool
    scale: float
    cu: torch.Tensor | None
    cu_k: torch.Tensor | None  # None: the queries' offsets
    lens_k: torch.Tensor | None  # batched: keys per sequence
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    pos: torch.Tensor | None

    def common(self, dummy: torch.Tensor) -> dict:
        rot = self.cos is not None
        pos = self.pos
        if pos is None:
            pstrides = (0, 0)
        elif self.packed:
            pstrides = (0, pos.stride(0))
        else:
            # (1, sk) position ids are shared by every sequence
            pstrides = (pos.stride(0) if pos.shape[0] > 1 else 0, pos.stride(1))
        cu = self.cu if self.packed else dummy
        return dict(
            CU=cu, CU_K=self.cu_k if self.cu_k is not None else cu,
            LENS_K=self.lens_k if self.lens_k is not None else dummy,
            COS=self.cos if rot else dummy, SIN=self.sin if rot else dummy,
            POS=pos if pos is not None else dummy, stride_rot=self.cos.stride(0) if rot else 0,
            stride_pb=pstrides[0], stride_ps=pstrides[1], seqlen_q=0 if self.packed else self.seqlen_q,
            seqlen_k=0 if self.packed else self.seqlen_k,
            n_batch=self.n_batch, group=self.n_heads // self.n_kv, HEAD_DIM=self.head_dim,
            D_PAD=_d_pad(self.head_dim), QK_PAD=_qk_pad(self.head_dim, rot), CAUSAL=self.causal,
            PACKED=self.packed, ROTARY=rot, HAS_POS=pos is not None, VAR_K=self.lens_k is not None)

    def lse_strides(self, lse: torch.Tensor) -> dict:
        if self.packed:  # (n_heads, total_q)
            return dict(stride_lb=0, stride_lh=lse.stride(0))
        return dict(stride_lb=lse.stride(0), stride_lh=lse.stride(1))  # (batch, n_heads, sq)


def _problem(q, k, causal, softmax_scale, cu_seqlens, max_seqlen, cos, sin, position_ids,
             cu_seqlens_k=None, max_seqlen_k=0, seqlens_k=None) -> _Problem:
    packed = cu_seqlens is not None
    head_dim = q.shape[-1]
    if packed:
        n_batch = cu_seqlens.shape[0] - 1
        seqlen_q = _document_bound(cu_seqlens, max_seqlen, "max_seqlen")
        seqlen_k = seqlen_q if cu_seqlens_k is None else _document_bound(cu_seqlens_k, max_seqlen_k, "max_seqlen_k")
    else:
        n_batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    if cos is not None:
        cos, sin = cos.float(), sin.float()
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        _check_positions(position_ids, cos.shape[0], seqlen_k)
    return _Problem(packed, n_batch, seqlen_q, seqlen_k, q.shape[-2], k.shape[-2], head_dim, causal, softmax_scale,
                    cu_seqlens, cu_seqlens_k, seqlens_k, cos, sin, position_ids)


def _document_bound(cu: torch.Tensor, given: int, name: str) -> int:
    if given > 0 and (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return given  # no host sync inside a CUDA graph capture: trusted as given
    # The grid covers this many rows per document: a smaller value would leave rows unwritten,
    # and the public API's check does not run under torch.compile. One sync per offsets tensor.
    longest = _longest_document(cu)
    if 0 < given < longest:
        raise ValueError(f"{name}={given} is smaller than the longest document ({longest} tokens)")
    return longest


def _flags(q: torch.Tensor, cc: int | None, tma: bool) -> dict:
    return dict(USE_TMA=tma, DOT_F32=(cc is None and q.dtype == torch.bfloat16),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _grid(seqlen: int, n_batch: int, block: int, heads: int) -> tuple[int]:
    return (triton.cdiv(seqlen, block) * n_batch * heads,)


def _lse_empty(q: torch.Tensor, packed: bool) -> torch.Tensor:
    if packed:
        return torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    return torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
