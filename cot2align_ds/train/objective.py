"""The distillation objective: which losses run, how they are normalised and combined.

``total = (1 - a) * CE + a * KD`` with ``a = distill.kd_rate``; every term is a sum returned by
a pure loss function, divided once by a global count taken over the whole accumulation window
and all ranks (see ``window_normalisers``), so a run at world size 2 equals world size 1 with
twice the accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cot2align_ds.config import ConfigError, DistillConfig
from cot2align_ds.losses.cross_entropy import cross_entropy_loss
from cot2align_ds.losses.uld import uld_loss

NORMALISER_KEYS = ("student_tokens", "teacher_tokens", "records", "cot_records")


def batch_normalisers(batch: dict) -> torch.Tensor:
    """Counts of one micro-batch, in ``NORMALISER_KEYS`` order (summed over a window later)."""
    student_tokens = (batch["student"]["labels"] != -100).sum()
    teacher = batch.get("teacher")
    teacher_tokens = (teacher["labels"] != -100).sum() if teacher else torch.tensor(0)
    records = torch.tensor(batch["is_cot_B"].numel())
    cot_records = batch["is_cot_B"].sum()
    counts = [student_tokens, teacher_tokens, records, cot_records]
    return torch.stack([count.to(torch.float64) for count in counts])


@dataclass(frozen=True)
class Term:
    """One named loss term: its weight in the total and the count it is averaged over."""

    name: str
    weight: float
    normaliser: str


@dataclass
class ModelOutputs:
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


TermFn = Callable[..., dict[str, torch.Tensor]]


class Objective:
    """Builds the loss terms for a method; ``__call__`` returns (total, per-term values)."""

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.method = config.method
        kd_rate = 0.0 if self.method == "sft" else config.kd_rate
        if self.method not in ("sft", "uld"):
            raise ConfigError(f"distill.method={self.method} is not wired into training yet")
        self.terms = [Term("ce", 1.0 - kd_rate, "student_tokens")]
        if self.method == "uld":
            self.terms.append(Term("kd_uld", kd_rate, "student_tokens"))

    @property
    def needs_teacher(self) -> bool:
        return self.method != "sft"

    @property
    def needs_hidden_states(self) -> bool:
        return False

    def build_projectors(self, student_hidden: int, teacher_hidden: int) -> nn.ModuleDict:
        return nn.ModuleDict()

    def term_sums(
        self, batch: dict, student: ModelOutputs, teacher: ModelOutputs | None
    ) -> dict[str, torch.Tensor]:
        chunk = self.config.chunk_size
        sums = {
            "ce": cross_entropy_loss(student.logits, batch["student"]["labels"], chunk_size=chunk)[
                0
            ]
        }
        if self.method == "uld":
            assert teacher is not None
            sums["kd_uld"] = uld_loss(
                student.logits,
                teacher.logits,
                batch["student"]["labels"],
                batch["teacher"]["labels"],
                temperature=self.config.temperature,
                chunk_size=chunk,
            )[0]
        return sums

    def __call__(
        self,
        batch: dict,
        student: ModelOutputs,
        teacher: ModelOutputs | None,
        window_counts: dict[str, float],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sums = self.term_sums(batch, student, teacher)
        total = student.logits.new_zeros((), dtype=torch.float32)
        values = {}
        for term in self.terms:
            value = sums[term.name] / max(window_counts[term.normaliser], 1.0)
            values[term.name] = value.detach()
            total = total + term.weight * value
        return total, values
