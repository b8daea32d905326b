"""Student next-token cross-entropy over response positions.

Shape legend: B batch, S student positions, V student vocab, N gathered response rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cot2align_ds.losses.chunking import (
    LossSum,
    chunked_row_sum,
    gather_rows,
    response_mask,
    zero_loss,
)


def _ce_rows(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_NV.float(), labels_N, reduction="sum")


def cross_entropy_loss(
    student_logits_BSV: torch.Tensor,
    student_labels_BS: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> LossSum:
    """Summed next-token cross-entropy of the student on its response positions.

    Args:
        student_logits_BSV: student logits (any float dtype; computed in fp32).
        student_labels_BS: already-shifted targets: the label at s is the target for the logits
            at s; -100 marks non-response positions.
        chunk_size: rows per checkpointed chunk (bounds fp32 memory); None = one dense pass.
    Returns:
        LossSum(sum of -log p(label), number of response positions).
    """
    mask_BS = response_mask(student_labels_BS)
    logits_NV = gather_rows(student_logits_BSV, mask_BS)
    if logits_NV.shape[0] == 0:
        return zero_loss(student_logits_BSV)
    labels_N = student_labels_BS[mask_BS]
    loss = chunked_row_sum(_ce_rows, [logits_NV, labels_N], chunk_size=chunk_size)
    return LossSum(loss, mask_BS.sum())


__all__ = ["cross_entropy_loss"]
