"""The micro-batch the collator builds and the training step reads.

Legend: B rows, L positions (per side), K response positions (per side), C CoT rows.

Labels are already shifted: ``labels[t]`` is the target of the logits at position ``t`` and
``IGNORE_INDEX`` where that target is not an answer token, so "response positions" are
``labels != IGNORE_INDEX`` on every side. Padding is on the right.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenSide:
    """One tokenizer's tokens for a set of rows.

    ``response_index`` / ``response_mask`` (B, K) list each row's response positions first, in
    order: sequence-level losses (OT) gather just those, so their cost follows the answer length.
    """

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 on real tokens
    labels: torch.Tensor  # (B, L) long, shifted targets or IGNORE_INDEX
    response_index: torch.Tensor  # (B, K) long
    response_mask: torch.Tensor  # (B, K) bool
    # A cached teacher's hidden states (``teacher_cache``): {layer: (B, L, H)}, its span filled.
    cached_hidden: dict[int, torch.Tensor] | None = None

    def with_cached_hidden(self, hidden: dict[int, torch.Tensor]) -> TokenSide:
        return replace(self, cached_hidden=hidden)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def response_tokens(self) -> torch.Tensor:
        """Number of target (answer) tokens, a 0-d tensor."""
        return (self.labels != IGNORE_INDEX).sum()

    def to(self, device: torch.device) -> TokenSide:
        return TokenSide(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


@dataclass(frozen=True)
class StandardViews:
    """Cross-CoT: the standard (no-rationale) views of the batch's CoT rows.

    A batch without CoT rows still carries one row with ``valid_C`` false, so that every rank
    runs the same forward passes under ZeRO-3; the losses mask it to zero.
    """

    student: TokenSide  # C rows
    teacher: TokenSide | None  # C rows (None for a run without a teacher)
    rows_C: torch.Tensor  # (C,) long: each view's row in the main batch
    valid_C: torch.Tensor  # (C,) bool

    def to(self, device: torch.device) -> StandardViews:
        teacher = self.teacher.to(device) if self.teacher is not None else None
        return StandardViews(
            self.student.to(device),
            teacher,
            _move(self.rows_C, device),
            _move(self.valid_C, device),
        )


@dataclass(frozen=True)
class DistillBatch:
    """A micro-batch on both tokenizers: the main view of every record (its CoT view for CoT
    records, the standard one otherwise), plus what the configured losses need beyond it."""

    ids: list[str]  # record ids, for the audit log
    is_cot_B: torch.Tensor  # (B,) bool
    student: TokenSide
    teacher: TokenSide | None = None
    # MinED: for each student logits position, the teacher logits position predicting the
    # one-to-one aligned answer token, -1 elsewhere.
    aligned_teacher_pos_BS: torch.Tensor | None = None
    standard: StandardViews | None = None
    # CoT2Align's diagnostic: (B, K_s, K_t) bool, the main view's response positions whose answer
    # tokens cover overlapping characters (``losses/ot/alignment_mass.py``).
    char_aligned_BKJ: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.student.num_rows

    def to(self, device: torch.device) -> DistillBatch:
        return replace(
            self,
            is_cot_B=_move(self.is_cot_B, device),
            student=self.student.to(device),
            teacher=self.teacher.to(device) if self.teacher is not None else None,
            aligned_teacher_pos_BS=_move(self.aligned_teacher_pos_BS, device),
            standard=self.standard.to(device) if self.standard is not None else None,
            char_aligned_BKJ=_move(self.char_aligned_BKJ, device),
        )


def _move(tensor, device: torch.device):
    if isinstance(tensor, dict):
        return {key: _move(value, device) for key, value in tensor.items()}
    return None if tensor is None else tensor.to(device, non_blocking=True)
