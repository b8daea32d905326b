"""MinED loss (minimum edit distance alignment; Wan et al. 2024 / DSKD's MinED baseline).

The token alignment (dynamic programming over edit distance between token strings) and the
teacher-to-student vocabulary map are built outside the loss (in the data pipeline) and arrive as
tensors. Per student response position:
- aligned one-to-one with a teacher position: the target is the teacher's distribution there
  (optionally its top-k), moved onto student ids by summing the mass of all teacher ids that map
  to the same student id, and renormalised over the mapped mass;
- otherwise (or when no teacher mass maps onto the student vocabulary): the gold one-hot target.
The loss is KL(target || softmax(student / temperature)); the target is a constant (no gradient
reaches the teacher).

Shape legend: B batch, S student positions, T teacher positions, V student vocab, W teacher vocab,
N gathered response rows, K kept teacher entries per row (top_k, or W).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cot2align_ds.losses.chunking import (
    LossSum,
    chunked_row_sum,
    gather_rows,
    response_mask,
    slice_vocab,
)


def _fit_vocab_map(teacher_to_student_vocab_W: torch.Tensor, width: int) -> torch.Tensor:
    """Map over exactly ``width`` teacher ids; ids the map does not cover are unmapped (-1)."""
    map_W = teacher_to_student_vocab_W.long()
    if map_W.shape[0] >= width:
        return map_W[:width]
    return F.pad(map_W, (0, width - map_W.shape[0]), value=-1)


@torch.no_grad()
def mapped_teacher_target(
    teacher_logits_NW: torch.Tensor,
    student_labels_N: torch.Tensor,
    teacher_to_student_vocab_W: torch.Tensor,
    *,
    student_vocab: int,
    temperature: float,
    top_k: int | None,
) -> torch.Tensor:
    """Target distribution over the student vocabulary: target_NV (fp32, rows sum to 1).

    Rows with no mapped teacher mass fall back to the one-hot of the student label.
    """
    scaled_NW = teacher_logits_NW.float() / temperature
    if top_k is None or top_k >= scaled_NW.shape[-1]:
        kept_logits_NK = scaled_NW
        student_ids_NK = teacher_to_student_vocab_W.expand_as(scaled_NW)
    else:
        # Softmax over the top-k logits = renormalised top-k probabilities.
        kept_logits_NK, teacher_ids_NK = scaled_NW.topk(top_k, dim=-1)
        student_ids_NK = teacher_to_student_vocab_W[teacher_ids_NK]
    mapped_NK = student_ids_NK >= 0
    probs_NK = torch.softmax(kept_logits_NK, dim=-1) * mapped_NK
    target_NV = scaled_NW.new_zeros(scaled_NW.shape[0], student_vocab)
    target_NV.scatter_add_(1, student_ids_NK.clamp_min(0), probs_NK)
    mass_N1 = target_NV.sum(-1, keepdim=True)
    # Rows with no mapped mass get the gold one-hot, written in place (no second V-wide buffer).
    unmapped_N1 = (mass_N1 == 0).float()
    target_NV.scatter_add_(1, student_labels_N[:, None], unmapped_N1)
    return target_NV.div_(mass_N1 + unmapped_N1)


def _aligned_rows(
    student_logits_NV: torch.Tensor,
    teacher_logits_NW: torch.Tensor,
    student_labels_N: torch.Tensor,
    *,
    vocab_map_W: torch.Tensor,
    temperature: float,
    top_k: int | None,
) -> torch.Tensor:
    student_log_NV = torch.log_softmax(student_logits_NV.float() / temperature, dim=-1)
    target_NV = mapped_teacher_target(
        teacher_logits_NW,
        student_labels_N,
        vocab_map_W,
        student_vocab=student_logits_NV.shape[-1],
        temperature=temperature,
        top_k=top_k,
    )
    # KL(target || q) = sum target (log target - log q); zero-target entries contribute 0.
    cross_NV = torch.where(target_NV > 0, target_NV * student_log_NV, 0.0)
    return torch.xlogy(target_NV, target_NV).sum() - cross_NV.sum()


def _gold_rows(
    student_logits_NV: torch.Tensor, student_labels_N: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    # KL(one-hot || q) = -log q(label).
    scaled_NV = student_logits_NV.float() / temperature
    return F.cross_entropy(scaled_NV, student_labels_N, reduction="sum")


def mined_loss(
    student_logits_BSV: torch.Tensor,
    teacher_logits_BTW: torch.Tensor,
    student_labels_BS: torch.Tensor,
    aligned_teacher_pos_BS: torch.Tensor,
    teacher_to_student_vocab_W: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> LossSum:
    """MinED KL summed over student response positions.

    Args:
        student_logits_BSV, teacher_logits_BTW: logits (any float dtype; computed in fp32).
        student_labels_BS: shifted next-token targets, -100 off the response.
        aligned_teacher_pos_BS: for each student position, the index (into T) of its one-to-one
            aligned teacher position, or -1 (also ignored where the label is -100).
        teacher_to_student_vocab_W: long, student id for each teacher id, -1 = unmapped. Teacher
            ids beyond its length count as unmapped; extra entries are ignored.
        temperature: applied to the teacher and the student (the gold fallback too).
        top_k: keep only the teacher's top-k ids before mapping (None = all).
        student_vocab_size, teacher_vocab_size: true tokenizer sizes; logits of padded embedding
            rows beyond them are dropped.
        chunk_size: rows per checkpointed chunk (bounds fp32 memory); None = one dense pass.
    Returns:
        LossSum(sum of KL(target || student) over response positions, number of them).
    """
    student_logits_BSV = slice_vocab(student_logits_BSV, student_vocab_size)
    teacher_logits_BTW = slice_vocab(teacher_logits_BTW, teacher_vocab_size)
    mask_BS = response_mask(student_labels_BS)
    aligned_BS = mask_BS & (aligned_teacher_pos_BS >= 0)
    gold_BS = mask_BS & ~aligned_BS
    batch_idx_N, _ = aligned_BS.nonzero(as_tuple=True)
    teacher_NW = teacher_logits_BTW[batch_idx_N, aligned_teacher_pos_BS[aligned_BS]]
    vocab_map_W = _fit_vocab_map(teacher_to_student_vocab_W, teacher_logits_BTW.shape[-1])
    aligned_fn = functools.partial(
        _aligned_rows, vocab_map_W=vocab_map_W, temperature=temperature, top_k=top_k
    )
    aligned_rows = [gather_rows(student_logits_BSV, aligned_BS), teacher_NW]
    aligned_sum = chunked_row_sum(
        aligned_fn, [*aligned_rows, student_labels_BS[aligned_BS]], chunk_size=chunk_size
    )
    gold_fn = functools.partial(_gold_rows, temperature=temperature)
    gold_rows = [gather_rows(student_logits_BSV, gold_BS), student_labels_BS[gold_BS]]
    gold_sum = chunked_row_sum(gold_fn, gold_rows, chunk_size=chunk_size)
    return LossSum(aligned_sum + gold_sum, mask_BS.sum())


__all__ = ["mapped_teacher_target", "mined_loss"]
