"""Packed documents: ``cu_seqlens`` offsets and per-token positions, each from the other.

A pack is ``total`` tokens laid end to end; ``cu_seqlens`` (n_docs + 1,) int32 holds the offsets
of its documents (``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == total``), as ``flash_attention``
takes them. Positions restart at 0 in each document. Offsets cannot be split along a batch, but
positions can: a pipeline cuts a (batch, seq) grid of positions into micro batches, and
transformers' ``DataCollatorWithFlattening`` passes packed documents as restarting
``position_ids``. Every conversion between the two goes through here.
"""
from __future__ import annotations

import torch

__all__ = ["document_index", "document_positions", "cu_seqlens_from_positions", "longest_document"]


def document_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens (n_docs + 1,) -> (total,) int64: the document each packed token belongs to."""
    idx = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)


def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens (n_docs + 1,) -> (total,) int64: each packed token's position inside its document."""
    idx = torch.arange(total, device=cu_seqlens.device)
    return idx - cu_seqlens.long()[document_index(cu_seqlens, total)]


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids (batch, seq) -> cu_seqlens (n_docs + 1,) int32 over the flattened batch.

    A document starts at every row start and wherever a position is not the previous one plus
    one (the rule of transformers' ``find_packed_sequence_indices``). On positions made by
    ``document_positions`` from offsets whose documents start at row starts, this is its inverse."""
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    b, s = position_ids.shape
    start = torch.ones(b, s, dtype=torch.bool, device=position_ids.device)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    starts = start.reshape(-1).nonzero().reshape(-1).to(torch.int32)
    return torch.cat((starts, starts.new_full((1,), b * s)))


def longest_document(cu_seqlens: torch.Tensor) -> int:
    """cu_seqlens (n_docs + 1,) -> the longest document's length (flash_attention's max_seqlen)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
