"""One attention call as the kernels see it (:class:`Problem`), and the launch arguments that every
kernel takes from it."""
from __future__ import annotations

import dataclasses

import torch
import triton

from ... import _validate as V
from .tiles import _d_pad, _qk_pad

LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything the kernels share about one call, built once per op call by :meth:`of` from the op's
    arguments: the drivers, the launch builders and the configuration choices read this and nothing
    else of the call. An attention option is one field here, its value in :meth:`of`, and its kernel
    arguments in :meth:`kernel_args`."""
    # layout
    packed: bool  # documents in one token axis, delimited by cu (queries) and cu_k (keys)
    n_batch: int  # batch size, or number of documents
    seqlen_q: int  # query length, or the longest query document
    seqlen_k: int  # key length (k's rows when batched), or the longest key document
    n_heads: int
    n_kv: int
    head_dim: int
    # which keys a query sees, and how its scores are scaled
    causal: bool  # bottom-right aligned: the queries are the last keys of their sequence
    scale: float  # softmax_scale
    cu: torch.Tensor | None = None  # packed: (n_docs + 1,) int32 query offsets
    cu_k: torch.Tensor | None = None  # packed: key offsets; None: the queries'
    lens_k: torch.Tensor | None = None  # batched: (batch,) int32 keys per sequence (a KV cache)
    # rotary: q and k rotated as the kernels load them
    cos: torch.Tensor | None = None  # (max_pos, head_dim // 2) fp32, unit column stride; sin alike
    sin: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # position ids of the keys, (batch or 1, sk) or (total_k,)
    # local attention: the query aligned with key j sees keys j - window_left .. j + window_right
    # (-1: unbounded on that side); causal caps the right side at 0
    window_left: int = -1
    window_right: int = -1

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, causal: bool, softmax_scale: float, cu_seqlens, max_seqlen: int,
           cos, sin, position_ids, cu_seqlens_k=None, max_seqlen_k: int = 0, seqlens_k=None,
           window_left: int = -1, window_right: int = -1) -> "Problem":
        """The problem of one op call (the custom ops' arguments). max_seqlen(_k) 0: unknown, measured
        from the offsets (one host sync per offsets tensor, shared with the argument checks)."""
        packed = cu_seqlens is not None
        if packed:
            n_batch = cu_seqlens.shape[0] - 1
            seqlen_q = _document_bound(cu_seqlens, max_seqlen, "max_seqlen")
            seqlen_k = seqlen_q if cu_seqlens_k is None else _document_bound(cu_seqlens_k, max_seqlen_k,
                                                                              "max_seqlen_k")
        else:
            n_batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        if cos is not None:
            cos, sin = cos.float(), sin.float()
            if cos.stride(-1) != 1 or sin.stride() != cos.stride():
                cos, sin = cos.contiguous(), sin.contiguous()
            _check_positions(position_ids, cos.shape[0], seqlen_k)
        return cls(packed=packed, n_batch=n_batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, n_heads=q.shape[-2],
                   n_kv=k.shape[-2], head_dim=q.shape[-1], causal=causal, scale=softmax_scale, cu=cu_seqlens,
                   cu_k=cu_seqlens_k, lens_k=seqlens_k, cos=cos, sin=sin, pos=position_ids,
                   window_left=max(window_left, -1), window_right=-1 if causal else max(window_right, -1))

    @property
    def rotary(self) -> bool:
        return self.cos is not None

    @property
    def windowed(self) -> bool:
        """Local attention: a bound beyond causality on the keys a query sees."""
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.n_heads // self.n_kv

    @property
    def qk_scale(self) -> float:
        """softmax_scale * log2(e): the kernels' softmax runs on exp2."""
        return self.scale * LOG2E

    def kernel_args(self, dummy: torch.Tensor) -> dict:
        """The arguments every attention kernel takes alike; ``dummy`` stands in for absent tensors."""
        rot = self.rotary
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
            n_batch=self.n_batch, group=self.group, HEAD_DIM=self.head_dim,
            D_PAD=_d_pad(self.head_dim), QK_PAD=_qk_pad(self.head_dim, rot), CAUSAL=self.causal,
            PACKED=self.packed, ROTARY=rot, HAS_POS=pos is not None, VAR_K=self.lens_k is not None,
            WIN_LEFT=self.window_left, WIN_RIGHT=self.window_right)

    def strides(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(sequence, token, head) strides of q, k, v, o or a gradient, in elements; a pack is one
        sequence axis, so its first is 0."""
        return (0, x.stride(0), x.stride(1)) if self.packed else (x.stride(0), x.stride(1), x.stride(2))

    def lse_strides(self, lse: torch.Tensor) -> dict:
        if self.packed:  # (n_heads, total_q)
            return dict(stride_lb=0, stride_lh=lse.stride(0))
        return dict(stride_lb=lse.stride(0), stride_lh=lse.stride(1))  # (batch, n_heads, sq)

    def grid(self, seqlen: int, block: int, heads: int) -> tuple[int]:
        """One program per block of ``seqlen`` rows, per head, per sequence."""
        return (triton.cdiv(seqlen, block) * self.n_batch * heads,)


def _document_bound(cu: torch.Tensor, given: int, name: str) -> int:
    if given > 0 and (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return given  # no host sync inside a CUDA graph capture: trusted as given
    # The grid covers this many rows per document: a smaller value would leave rows unwritten,
    # and the public API's check does not run under torch.compile.
    longest = V.longest_document(cu)
    if 0 < given < longest:
        raise ValueError(f"{name}={given} is smaller than the longest document ({longest} tokens)")
    return longest


def _check_positions(position_ids: torch.Tensor | None, n_table: int, longest: int) -> None:
    # A position outside the tables would read out of bounds in the kernel: refuse it before launch.
    # This runs inside the op, so also under torch.compile, where the public API's check is skipped.
    if position_ids is None:
        if longest > n_table:
            raise ValueError(f"cos and sin cover {n_table} positions but a sequence has {longest} tokens; "
                             "pass position_ids or longer tables")
        return
    V.position_range(position_ids, n_table)


def launch_flags(q: torch.Tensor, cc: int | None, tma: bool) -> dict:
    """The constexprs of how a launch computes: TMA descriptors, fp32 dot operands (bf16 under the
    interpreter) and the dot's precision (no silent tf32 for fp32 inputs)."""
    return dict(USE_TMA=tma, DOT_F32=(cc is None and q.dtype == torch.bfloat16),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def lse_empty(q: torch.Tensor, packed: bool) -> torch.Tensor:
    """The log-sum-exp output: (batch, n_heads, sq), or (n_heads, total_q) packed, fp32."""
    if packed:
        return torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    return torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
