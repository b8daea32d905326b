"""Universal Logit Distillation (ULD; Boizard et al. 2024) for different vocabularies.

ULD compares the two next-token distributions without any vocabulary map: each side's
probabilities are sorted in descending order, the shorter vocabulary is zero-padded, and the loss
is the L1 distance between the sorted vectors. Positions are paired by order: the k-th response
position of the student pairs with the k-th response position of the teacher (both answers
start-aligned, the longer one truncated).

Shape legend: B batch, S student positions, T teacher positions, V student vocab, W teacher vocab,
N paired response rows.
"""

from __future__ import annotations

import functools

import torch

from cot2align_ds.losses.chunking import (
    LossSum,
    chunked_row_sum,
    gather_rows,
    response_mask,
    slice_vocab,
    zero_loss,
)


def start_aligned_masks(
    student_mask_BS: torch.Tensor, teacher_mask_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first min(n_student, n_teacher) response positions of each sequence on each side.

    Returns (student_keep_BS, teacher_keep_BT). Gathering rows with them (row-major order) yields
    the same number of rows on both sides, the k-th student row paired with the k-th teacher row.
    """
    student_rank_BS = student_mask_BS.long().cumsum(-1) - 1
    teacher_rank_BT = teacher_mask_BT.long().cumsum(-1) - 1
    num_pairs_B = torch.minimum(student_mask_BS.sum(-1), teacher_mask_BT.sum(-1))
    student_keep_BS = student_mask_BS & (student_rank_BS < num_pairs_B[:, None])
    teacher_keep_BT = teacher_mask_BT & (teacher_rank_BT < num_pairs_B[:, None])
    return student_keep_BS, teacher_keep_BT


def uld_rows(
    student_logits_NV: torch.Tensor, teacher_logits_NW: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Summed ULD distance over N paired rows (0-dim fp32)."""
    student_sorted_NV = _sorted_probs(student_logits_NV, temperature)
    teacher_sorted_NW = _sorted_probs(teacher_logits_NW, temperature)
    common = min(student_sorted_NV.shape[-1], teacher_sorted_NW.shape[-1])
    head = (student_sorted_NV[:, :common] - teacher_sorted_NW[:, :common]).abs().sum()
    # Zero-padding the shorter side makes |p - 0| = p on the longer side's tail: no need to
    # materialise the padding.
    tail = student_sorted_NV[:, common:].sum() + teacher_sorted_NW[:, common:].sum()
    return head + tail


def _sorted_probs(logits_NX: torch.Tensor, temperature: float) -> torch.Tensor:
    # Softmax is monotone, so sorting the logits first and then normalising gives the same
    # sorted probabilities while the softmax backward runs on the sorted tensor.
    sorted_logits_NX = logits_NX.float().sort(dim=-1, descending=True).values
    return torch.softmax(sorted_logits_NX / temperature, dim=-1)


def uld_loss(
    student_logits_BSV: torch.Tensor,
    teacher_logits_BTW: torch.Tensor,
    student_labels_BS: torch.Tensor,
    teacher_labels_BT: torch.Tensor,
    *,
    temperature: float = 1.0,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> LossSum:
    """ULD loss summed over start-aligned response-position pairs.

    Args:
        student_logits_BSV, teacher_logits_BTW: logits (any float dtype; computed in fp32).
        student_labels_BS, teacher_labels_BT: shifted next-token targets, -100 off the response.
        temperature: softmax temperature applied to both sides.
        student_vocab_size, teacher_vocab_size: true tokenizer sizes; logits for padded
            embedding rows beyond them are dropped before the softmax (None keeps all).
        chunk_size: rows per checkpointed chunk (bounds fp32 memory); None = one dense pass.
    Returns:
        LossSum(sum over pairs of the L1 distance between sorted distributions, number of pairs).
    """
    student_keep_BS, teacher_keep_BT = start_aligned_masks(
        response_mask(student_labels_BS), response_mask(teacher_labels_BT)
    )
    student_NV = gather_rows(slice_vocab(student_logits_BSV, student_vocab_size), student_keep_BS)
    teacher_NW = gather_rows(slice_vocab(teacher_logits_BTW, teacher_vocab_size), teacher_keep_BT)
    if student_NV.shape[0] == 0:
        return zero_loss(student_logits_BSV)
    rows_fn = functools.partial(uld_rows, temperature=temperature)
    loss = chunked_row_sum(rows_fn, [student_NV, teacher_NW], chunk_size=chunk_size)
    return LossSum(loss, student_keep_BS.sum())


__all__ = ["start_aligned_masks", "uld_loss", "uld_rows"]
