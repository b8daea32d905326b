"""Dual-Space Knowledge Distillation (DSKD; Zhang et al. 2024), same-vocabulary and with
cross-model attention (CMA) for different vocabularies.

Both forms distil in two spaces:
- student space (t2s): teacher hidden states are projected into the student's hidden space and
  read out through the student head (weight detached). Their CE against the student labels
  trains the projector(s); the KD term distils those logits (detached) into the student.
- teacher space (s2t): student hidden states are projected into the teacher's hidden space and
  read out through the teacher head; KD(teacher || that) trains the student and the projector.
CMA replaces the position-wise pairing by an attention between the two sequences (see
``cross_model_attention``), so the two sides may have different tokenizers and lengths.

Each component is a LossSum; ``total`` adds the three sums, counted per student position, as the
reference normalises the KD loss by the student token count.

Shape legend: B batch, S student positions, T teacher positions, V student vocab, W teacher vocab,
D student hidden, H teacher hidden, N gathered rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cot2align_ds.losses.chunking import LossSum, chunked_row_sum, response_mask
from cot2align_ds.losses.divergences import check_kind, divergence_rows

Projector = Callable[[torch.Tensor], torch.Tensor]


class DSKDLosses(NamedTuple):
    """DSKD components, each LossSum(sum, count), plus the number of student positions where
    the t2s logits' argmax equals the label (t2s accuracy = t2s_num_correct / t2s_ce.count)."""

    t2s_ce: LossSum
    t2s_kd: LossSum
    s2t_kd: LossSum
    total: LossSum
    t2s_num_correct: torch.Tensor


def _project(projector: Projector, x: torch.Tensor) -> torch.Tensor:
    """Apply a projector in its own parameter dtype (inputs may be bf16, projectors fp32)."""
    if isinstance(projector, nn.Module):
        param = next(projector.parameters(), None)
        if param is not None:
            x = x.to(param.dtype)
    return projector(x)


def _head_logits(hidden_NX: torch.Tensor, head_weight_VX: torch.Tensor) -> torch.Tensor:
    """Logits through a frozen head (detached: only projectors and inputs get gradients)."""
    weight_VX = head_weight_VX.detach()
    return (hidden_NX.to(weight_VX.dtype) @ weight_VX.T).float()


def _t2s_rows(
    t2s_hidden_ND: torch.Tensor,
    student_logits_NV: torch.Tensor,
    student_labels_N: torch.Tensor,
    *,
    student_head_weight_VD: torch.Tensor,
    only_correct: bool,
    divergence: dict,
) -> torch.Tensor:
    """Stacked sums over the rows: [t2s CE, t2s KD, number of correct t2s argmaxes]."""
    t2s_logits_NV = _head_logits(t2s_hidden_ND, student_head_weight_VD)
    ce = F.cross_entropy(t2s_logits_NV, student_labels_N, reduction="sum")
    correct_N = t2s_logits_NV.argmax(-1) == student_labels_N
    kd_N = divergence_rows(student_logits_NV, t2s_logits_NV.detach(), **divergence)
    if only_correct:
        # Distil only where the projected teacher is right: wrong t2s logits would teach errors.
        kd_N = torch.where(correct_N, kd_N, 0.0)
    return torch.stack([ce, kd_N.sum(), correct_N.sum().float()])


def _s2t_rows(
    s2t_hidden_NH: torch.Tensor,
    teacher_logits_NW: torch.Tensor,
    *,
    teacher_head_weight_WH: torch.Tensor,
    divergence: dict,
) -> torch.Tensor:
    s2t_logits_NW = _head_logits(s2t_hidden_NH, teacher_head_weight_WH)
    return divergence_rows(s2t_logits_NW, teacher_logits_NW.detach(), **divergence).sum()


def _dual_space_sums(
    t2s_rows: list[torch.Tensor],
    s2t_rows: list[torch.Tensor],
    *,
    student_head_weight_VD: torch.Tensor,
    teacher_head_weight_WH: torch.Tensor,
    kind: str,
    s2t_kind: str,
    temperature: float,
    skew: float,
    t2s_kd_only_correct: bool,
    chunk_size: int | None,
) -> DSKDLosses:
    """Both spaces from gathered rows: t2s_rows = [t2s hidden, student logits, labels] over the
    student positions, s2t_rows = [s2t hidden, teacher logits] over the teacher positions."""
    t2s_fn = functools.partial(
        _t2s_rows,
        student_head_weight_VD=student_head_weight_VD,
        only_correct=t2s_kd_only_correct,
        divergence={"kind": kind, "temperature": temperature, "skew": skew},
    )
    s2t_fn = functools.partial(
        _s2t_rows,
        teacher_head_weight_WH=teacher_head_weight_WH,
        divergence={"kind": s2t_kind, "temperature": temperature, "skew": skew},
    )
    ce, kd, num_correct = chunked_row_sum(t2s_fn, t2s_rows, chunk_size=chunk_size).unbind()
    s2t_kd = chunked_row_sum(s2t_fn, s2t_rows, chunk_size=chunk_size)
    device = ce.device
    num_student = torch.tensor(t2s_rows[0].shape[0], device=device)
    num_teacher = torch.tensor(s2t_rows[0].shape[0], device=device)
    return DSKDLosses(
        t2s_ce=LossSum(ce, num_student),
        t2s_kd=LossSum(kd, num_student),
        s2t_kd=LossSum(s2t_kd, num_teacher),
        total=LossSum(ce + kd + s2t_kd, num_student),
        t2s_num_correct=num_correct.round().long(),
    )


def dskd_loss(
    student_logits_BSV: torch.Tensor,
    student_hidden_BSD: torch.Tensor,
    teacher_logits_BSW: torch.Tensor,
    teacher_hidden_BSH: torch.Tensor,
    student_labels_BS: torch.Tensor,
    *,
    student_head_weight_VD: torch.Tensor,
    teacher_head_weight_WH: torch.Tensor,
    t2s_projector: Projector,
    s2t_projector: Projector,
    kind: str = "forward_kl",
    s2t_kind: str = "forward_kl",
    temperature: float = 2.0,
    skew: float = 0.1,
    t2s_kd_only_correct: bool = False,
    chunk_size: int | None = None,
) -> DSKDLosses:
    """DSKD for a shared tokenizer: student and teacher positions are the same (S = T).

    Args:
        student_logits_BSV, student_hidden_BSD: student outputs (last hidden layer).
        teacher_logits_BSW, teacher_hidden_BSH: teacher outputs on the same tokens (W may differ
            from V only by padded embedding rows).
        student_labels_BS: shifted next-token targets, -100 off the response.
        student_head_weight_VD, teacher_head_weight_WH: LM head weights (used detached).
        t2s_projector: H -> D; s2t_projector: D -> H (modules owned by the model).
        kind: divergence of the t2s KD (see divergences.DIVERGENCE_KINDS); s2t_kind: of the s2t KD
            (forward KL in the paper's code).
        temperature, skew: divergence parameters (the t2s CE uses no temperature).
        t2s_kd_only_correct: distil t2s logits only where their argmax equals the label (the CMA
            form always does; off here, as in the paper's same-vocabulary form).
        chunk_size: rows per checkpointed chunk (bounds fp32 memory); None = one dense pass.
    """
    check_kind(kind)
    check_kind(s2t_kind)
    mask_BS = response_mask(student_labels_BS)
    t2s_hidden_ND = _project(t2s_projector, teacher_hidden_BSH[mask_BS])
    s2t_hidden_NH = _project(s2t_projector, student_hidden_BSD[mask_BS])
    return _dual_space_sums(
        [t2s_hidden_ND, student_logits_BSV[mask_BS], student_labels_BS[mask_BS]],
        [s2t_hidden_NH, teacher_logits_BSW[mask_BS]],
        student_head_weight_VD=student_head_weight_VD,
        teacher_head_weight_WH=teacher_head_weight_WH,
        kind=kind,
        s2t_kind=s2t_kind,
        temperature=temperature,
        skew=skew,
        t2s_kd_only_correct=t2s_kd_only_correct,
        chunk_size=chunk_size,
    )


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` restricted to ``mask``; rows with no valid entry are all zero."""
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=dim) * mask


def _masked_std(x_BTX: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
    """Scalar std of the entries at valid positions (padding and prompts do not change it);
    ``mask_BT=None``: of the whole padded tensor (the reference's scope)."""
    std = (x_BTX if mask_BT is None else x_BTX[mask_BT]).float().std()
    # No or constant valid entries: leave the scale alone instead of dividing by NaN / 0.
    return torch.nan_to_num(std, nan=1.0).clamp_min(1e-6)


def _std_mask(mask_BT: torch.Tensor, std_scope: str) -> torch.Tensor | None:
    if std_scope not in ("response", "padded"):
        raise ValueError(f"std_scope must be 'response' or 'padded', got {std_scope!r}")
    return mask_BT if std_scope == "response" else None


def cross_model_attention(
    student_input_embeds_BSD: torch.Tensor,
    student_target_embeds_BSD: torch.Tensor,
    teacher_input_embeds_BTH: torch.Tensor,
    teacher_target_embeds_BTH: torch.Tensor,
    student_mask_BS: torch.Tensor,
    teacher_mask_BT: torch.Tensor,
    *,
    query_projector: Projector,
    std_scope: str = "response",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DSKD-CMA attention between student and teacher response positions.

    Query = query_projector([student input; target embedding]) (2D -> 2H, embeddings detached);
    key = [teacher input; target embedding] / its std. Scores = Q K^T / sqrt(2H).
    Returns (t2s_weights_BST, s2t_weights_BTS): softmax of the scores over valid teacher positions
    (for each student position) and over valid student positions (for each teacher position);
    masked entries, and rows without any valid counterpart, are exactly zero.
    """
    query_in_BSX = torch.cat([student_input_embeds_BSD, student_target_embeds_BSD], -1).detach()
    query_BSX = _project(query_projector, query_in_BSX).float()
    key_BTX = torch.cat([teacher_input_embeds_BTH, teacher_target_embeds_BTH], -1).detach().float()
    key_BTX = key_BTX / _masked_std(key_BTX, _std_mask(teacher_mask_BT, std_scope))
    scores_BST = query_BSX @ key_BTX.transpose(1, 2) / math.sqrt(key_BTX.shape[-1])
    pair_mask_BST = student_mask_BS[:, :, None] & teacher_mask_BT[:, None, :]
    t2s_weights_BST = masked_softmax(scores_BST, pair_mask_BST, dim=-1)
    s2t_weights_BTS = masked_softmax(scores_BST.transpose(1, 2), pair_mask_BST.transpose(1, 2), -1)
    return t2s_weights_BST, s2t_weights_BTS


def dskd_cma_loss(
    student_logits_BSV: torch.Tensor,
    student_hidden_BSD: torch.Tensor,
    student_input_embeds_BSD: torch.Tensor,
    student_target_embeds_BSD: torch.Tensor,
    student_labels_BS: torch.Tensor,
    teacher_logits_BTW: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    teacher_input_embeds_BTH: torch.Tensor,
    teacher_target_embeds_BTH: torch.Tensor,
    teacher_labels_BT: torch.Tensor,
    *,
    student_head_weight_VD: torch.Tensor,
    teacher_head_weight_WH: torch.Tensor,
    query_projector: Projector,
    t2s_projector: Projector,
    s2t_projector: Projector,
    kind: str = "forward_kl",
    s2t_kind: str = "forward_kl",
    temperature: float = 2.0,
    skew: float = 0.1,
    t2s_kd_only_correct: bool = True,
    chunk_size: int | None = None,
    std_scope: str = "response",
) -> DSKDLosses:
    """DSKD with cross-model attention, for different tokenizers.

    Args:
        student_logits_BSV, student_hidden_BSD: student outputs (last hidden layer).
        student_input_embeds_BSD, student_target_embeds_BSD: student input-embedding rows of the
            input token and of the target token at each position (any id where the label is -100).
        student_labels_BS, teacher_labels_BT: shifted targets, -100 off the response.
        teacher_*: the same for the teacher (H hidden, W vocab).
        student_head_weight_VD, teacher_head_weight_WH: LM head weights (used detached).
        query_projector: 2D -> 2H; t2s_projector: H -> D; s2t_projector: D -> H.
        kind, s2t_kind, temperature, skew, t2s_kd_only_correct, chunk_size: as in ``dskd_loss``.
        std_scope: ``"response"``: keys and values are scaled by their std over the teacher's
            response positions; ``"padded"``: over the whole padded tensor (the reference).
    Returns:
        DSKDLosses. Student positions whose sequence has no teacher response position (and vice
        versa) contribute nothing and are not counted.
    """
    check_kind(kind)
    check_kind(s2t_kind)
    student_mask_BS = response_mask(student_labels_BS)
    teacher_mask_BT = response_mask(teacher_labels_BT)
    t2s_weights_BST, s2t_weights_BTS = cross_model_attention(
        student_input_embeds_BSD,
        student_target_embeds_BSD,
        teacher_input_embeds_BTH,
        teacher_target_embeds_BTH,
        student_mask_BS,
        teacher_mask_BT,
        query_projector=query_projector,
        std_scope=std_scope,
    )
    # Values: std-normalised teacher hidden + target embedding, projected to the student space.
    std_mask_BT = _std_mask(teacher_mask_BT, std_scope)
    teacher_hidden_BTH = teacher_hidden_BTH.float()
    teacher_value_in_BTH = teacher_hidden_BTH / _masked_std(teacher_hidden_BTH, std_mask_BT)
    teacher_target_BTH = teacher_target_embeds_BTH.detach().float()
    teacher_value_in_BTH += teacher_target_BTH / _masked_std(teacher_target_BTH, std_mask_BT)
    t2s_values_BTD = _project(t2s_projector, teacher_value_in_BTH.detach()).float()
    s2t_values_BSH = _project(s2t_projector, student_hidden_BSD).float()
    t2s_hidden_BSD = t2s_weights_BST @ t2s_values_BTD
    s2t_hidden_BTH = s2t_weights_BTS @ s2t_values_BSH
    # Keep only positions that attended to something: both sides must have response positions.
    student_rows_BS = student_mask_BS & teacher_mask_BT.any(-1, keepdim=True)
    teacher_rows_BT = teacher_mask_BT & student_mask_BS.any(-1, keepdim=True)
    return _dual_space_sums(
        [
            t2s_hidden_BSD[student_rows_BS],
            student_logits_BSV[student_rows_BS],
            student_labels_BS[student_rows_BS],
        ],
        [s2t_hidden_BTH[teacher_rows_BT], teacher_logits_BTW[teacher_rows_BT]],
        student_head_weight_VD=student_head_weight_VD,
        teacher_head_weight_WH=teacher_head_weight_WH,
        kind=kind,
        s2t_kind=s2t_kind,
        temperature=temperature,
        skew=skew,
        t2s_kd_only_correct=t2s_kd_only_correct,
        chunk_size=chunk_size,
    )


__all__ = [
    "DSKDLosses",
    "cross_model_attention",
    "dskd_cma_loss",
    "dskd_loss",
    "masked_softmax",
]
