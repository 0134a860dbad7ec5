"""meditron_kernels.packing: cu_seqlens offsets and per-document positions, each from the other."""
import torch

from meditron_kernels.packing import (cu_seqlens_from_positions, document_index, document_positions,
                                      longest_document)


def test_positions_and_index_against_a_loop():
    cu = torch.tensor([0, 3, 4, 9, 9, 12], dtype=torch.int32)  # an empty document included
    doc, pos = [], []
    for d, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        doc += [d] * (b - a)
        pos += list(range(b - a))
    assert document_index(cu, 12).tolist() == doc
    assert document_positions(cu, 12).tolist() == pos
    assert document_positions(cu, 12).dtype == torch.int64
    assert longest_document(cu) == 5


def test_offsets_from_positions_invert_positions_row_by_row():
    # two rows of 8, every row starting a document (as packed training batches are cut)
    cu = torch.tensor([0, 5, 8, 11, 16], dtype=torch.int32)
    pos = document_positions(cu, 16).view(2, 8)
    back = cu_seqlens_from_positions(pos)
    assert back.dtype == torch.int32 and back.tolist() == cu.tolist()
    assert longest_document(back) == 5


def test_offsets_from_positions_follow_transformers_rule():
    # a new document at each row start and wherever a position is not the previous one plus one
    pos = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 0]])
    assert cu_seqlens_from_positions(pos).tolist() == [0, 3, 5, 7, 9, 10]
    assert cu_seqlens_from_positions(torch.arange(6)).tolist() == [0, 6]  # one row given flat
