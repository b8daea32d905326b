"""Token-level divergences between two distributions over the same vocabulary (vanilla KD).

``divergence_rows`` is the per-position building block (DSKD reuses it); ``kd_divergence`` applies
it to the response positions of a batch, optionally chunked.

Kinds (p = teacher, q = student, both ``softmax(logits / temperature)``):
- ``forward_kl``: KL(p || q).
- ``reverse_kl``: KL(q || p).
- ``js``: 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2.
- ``skew_forward_kl``: KL(p || skew p + (1 - skew) q)  (DistiLLM's skewed KL).
- ``skew_reverse_kl``: KL(q || skew q + (1 - skew) p).
- ``adaptive_kl``: Wu et al. 2024 (AKL): w_head FKL + w_tail RKL, where the teacher's vocabulary
  is split into a tail (its lowest-probability tokens whose cumulative mass stays below
  ``adaptive_head_mass``, mu = 0.5) and a head (the rest), g = sum |p - q| over each part, and
  w_head = g_head / (g_head + g_tail), w_tail = g_tail / (g_head + g_tail) (weights detached).
Values are true divergences (zero for identical inputs) and are not multiplied by temperature^2.

Shape legend: B batch, S positions, V vocab (shared by student and teacher), N gathered rows.
"""

from __future__ import annotations

import functools
import math

import torch

from cot2align_ds.losses.chunking import (
    LossSum,
    chunked_row_sum,
    gather_rows,
    slice_vocab,
    zero_loss,
)

DIVERGENCE_KINDS = (
    "forward_kl",
    "reverse_kl",
    "js",
    "skew_forward_kl",
    "skew_reverse_kl",
    "adaptive_kl",
)


def check_kind(kind: str) -> None:
    """Raise a clear ValueError for an unknown divergence kind."""
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {DIVERGENCE_KINDS}")


def kl_from_log_probs(p_log_NV: torch.Tensor, q_log_NV: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities: loss_N.

    Entries with p = 0 contribute 0 (0 log 0 = 0), also when q = 0 there; the difference is masked
    before the product so that no inf - inf = NaN reaches the backward pass either.
    """
    p_NV = p_log_NV.exp()
    diff_NV = torch.where(p_NV > 0, p_log_NV - q_log_NV, 0.0)
    return (p_NV * diff_NV).sum(-1)


def _log_mixture(a_log_NV: torch.Tensor, b_log_NV: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed stably in log space."""
    if weight_a <= 0.0:
        return b_log_NV
    if weight_a >= 1.0:
        return a_log_NV
    return torch.logaddexp(a_log_NV + math.log(weight_a), b_log_NV + math.log1p(-weight_a))


def _adaptive_weights(
    student_log_NV: torch.Tensor, teacher_log_NV: torch.Tensor, head_mass: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached (w_head_N, w_tail_N) of adaptive KL."""
    with torch.no_grad():
        teacher_sorted_NV, order_NV = teacher_log_NV.exp().sort(dim=-1)  # ascending
        student_sorted_NV = student_log_NV.exp().gather(-1, order_NV)
        gap_NV = (teacher_sorted_NV - student_sorted_NV).abs()
        tail_NV = teacher_sorted_NV.cumsum(-1) < head_mass
        gap_tail_N = (gap_NV * tail_NV).sum(-1)
        gap_head_N = gap_NV.sum(-1) - gap_tail_N
        # Identical rows have zero gaps: any weights give loss 0, avoid 0 / 0.
        total_N = (gap_head_N + gap_tail_N).clamp_min(torch.finfo(gap_NV.dtype).tiny)
        return gap_head_N / total_N, gap_tail_N / total_N


def divergence_rows(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 2.0,
    skew: float = 0.1,
    adaptive_head_mass: float = 0.5,
) -> torch.Tensor:
    """Per-row divergence between teacher and student next-token distributions: loss_N (fp32).

    Gradients flow into whichever inputs require them (detach the teacher side to distil).
    """
    check_kind(kind)
    q_log = torch.log_softmax(student_logits_NV.float() / temperature, dim=-1)
    p_log = torch.log_softmax(teacher_logits_NV.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return kl_from_log_probs(p_log, q_log)
    if kind == "reverse_kl":
        return kl_from_log_probs(q_log, p_log)
    if kind == "js":
        m_log = _log_mixture(p_log, q_log, 0.5)
        return 0.5 * (kl_from_log_probs(p_log, m_log) + kl_from_log_probs(q_log, m_log))
    if kind == "skew_forward_kl":
        return kl_from_log_probs(p_log, _log_mixture(p_log, q_log, skew))
    if kind == "skew_reverse_kl":
        return kl_from_log_probs(q_log, _log_mixture(q_log, p_log, skew))
    w_head, w_tail = _adaptive_weights(q_log, p_log, adaptive_head_mass)
    return w_head * kl_from_log_probs(p_log, q_log) + w_tail * kl_from_log_probs(q_log, p_log)


def _divergence_sum(student_NV: torch.Tensor, teacher_NV: torch.Tensor, **kwargs) -> torch.Tensor:
    return divergence_rows(student_NV, teacher_NV, **kwargs).sum()


def kd_divergence(
    student_logits_BSV: torch.Tensor,
    teacher_logits_BSV: torch.Tensor,
    mask_BS: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 2.0,
    skew: float = 0.1,
    adaptive_head_mass: float = 0.5,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> LossSum:
    """Vanilla KD for a shared vocabulary, summed over the positions where ``mask_BS`` is true.

    Args:
        student_logits_BSV, teacher_logits_BSV: logits on the same positions and vocabulary
            (any float dtype; computed in fp32). The teacher side is used as given: pass it
            detached (or computed under no_grad).
        mask_BS: bool, true at response positions (``labels != -100``).
        kind: one of DIVERGENCE_KINDS (see the module docstring).
        temperature: softmax temperature for both sides.
        skew: mixing weight of the skewed KLs.
        adaptive_head_mass: mu of adaptive KL.
        vocab_size: true tokenizer size; logits of padded embedding rows beyond it are dropped.
        chunk_size: rows per checkpointed chunk (bounds fp32 memory); None = one dense pass.
    Returns:
        LossSum(sum of the per-position divergence, number of masked positions).
    """
    check_kind(kind)
    mask_BS = mask_BS.bool()
    student_NV = gather_rows(slice_vocab(student_logits_BSV, vocab_size), mask_BS)
    teacher_NV = gather_rows(slice_vocab(teacher_logits_BSV, vocab_size), mask_BS)
    if student_NV.shape[0] == 0:
        return zero_loss(student_logits_BSV)
    rows_fn = functools.partial(
        _divergence_sum,
        kind=kind,
        temperature=temperature,
        skew=skew,
        adaptive_head_mass=adaptive_head_mass,
    )
    loss = chunked_row_sum(rows_fn, [student_NV, teacher_NV], chunk_size=chunk_size)
    return LossSum(loss, mask_BS.sum())


__all__ = [
    "DIVERGENCE_KINDS",
    "check_kind",
    "divergence_rows",
    "kd_divergence",
    "kl_from_log_probs",
]
