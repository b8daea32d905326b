"""The distillation objective: which losses run, how they are normalised and combined.

``total = (1 - a) * CE + a * (KD + OT)`` with ``a = distill.kd_rate``. Every term is a sum
returned by a pure loss function, divided once by a global count taken over the whole
accumulation window and all ranks (``window_normalisers`` in the loop), so a run at world size 2
equals world size 1 with twice the accumulation. Terms and their normalisers:

* ``ce``: student next-token CE on the main view, per student response token;
* base KD on the main view (``distill.method``): ``kd`` (vanilla, shared vocabulary),
  ``kd_uld``, ``kd_mined``, or DSKD's ``kd_t2s_ce`` + ``kd_t2s_kd`` (per student token) and
  ``kd_s2t_kd`` (per teacher token);
* CoT2Align OT (``cot2align.enabled``): ``ot_main`` (student main <-> teacher main, per record)
  and the Cross-CoT terms ``ot_cross_std_cot`` (student standard <-> teacher CoT) and
  ``ot_cross_cot_std`` (student CoT <-> teacher standard), per CoT record; each summed over the
  configured layer pairs with their weights and scaled by ``cot2align.ot_weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cot2align_ds.config import ConfigError, CoT2AlignConfig, DistillConfig
from cot2align_ds.losses.cross_entropy import cross_entropy_loss
from cot2align_ds.losses.divergences import kd_divergence
from cot2align_ds.losses.dskd import dskd_cma_loss, dskd_loss
from cot2align_ds.losses.mined import mined_loss
from cot2align_ds.losses.ot import cost_matrix, multi_pair_ot_loss
from cot2align_ds.losses.sinkhorn import sinkhorn_log
from cot2align_ds.losses.uld import uld_loss

NORMALISER_KEYS = ("student_tokens", "teacher_tokens", "records", "cot_records")
OT_GROUPS = ("ot_main", "ot_cross_std_cot", "ot_cross_cot_std")


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
    """One forward pass of one model on one view."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ModelAccess:
    """What DSKD needs beyond outputs; callables so ZeRO-3 gathers weights only when used."""

    student_embed: Callable[[torch.Tensor], torch.Tensor]
    teacher_embed: Callable[[torch.Tensor], torch.Tensor]
    student_head_weight: Callable[[], torch.Tensor]
    teacher_head_weight: Callable[[], torch.Tensor]


_KD_TERMS: dict[str, list[tuple[str, str]]] = {
    "sft": [],
    "vanilla_kd": [("kd", "student_tokens")],
    "uld": [("kd_uld", "student_tokens")],
    "mined": [("kd_mined", "student_tokens")],
    "dskd": [
        ("kd_t2s_ce", "student_tokens"),
        ("kd_t2s_kd", "student_tokens"),
        ("kd_s2t_kd", "teacher_tokens"),
    ],
}
_KD_TERMS["dskd_cma"] = _KD_TERMS["dskd"]


class Objective:
    """Builds the loss terms for a method; ``__call__`` returns (total, per-term values)."""

    def __init__(
        self,
        distill: DistillConfig,
        cot2align: CoT2AlignConfig,
        *,
        teacher_to_student_vocab_W: torch.Tensor | None = None,
    ) -> None:
        self.config = distill
        self.ot = cot2align
        self.method = distill.method
        if cot2align.enabled and self.method == "sft":
            raise ConfigError("cot2align.enabled needs a teacher: choose a distill.method")
        if self.method == "mined" and teacher_to_student_vocab_W is None:
            raise ValueError("MinED needs the teacher->student vocabulary map")
        self.vocab_map_W = teacher_to_student_vocab_W
        # Set by the loop before a logged step: OT plan diagnostics cost one extra solve.
        self.collect_diagnostics = False
        self.diagnostics: dict[str, torch.Tensor] = {}
        kd_rate = 0.0 if self.method == "sft" else distill.kd_rate
        self.terms = [Term("ce", 1.0 - kd_rate, "student_tokens")]
        self.terms += [Term(n, kd_rate, norm) for n, norm in _KD_TERMS[self.method]]
        if cot2align.enabled:
            weight = kd_rate * cot2align.ot_weight
            self.terms.append(Term("ot_main", weight * cot2align.main_weight, "records"))
            if cot2align.cross_cot:
                cross = (
                    ("ot_cross_std_cot", cot2align.cross_std_cot_weight),
                    ("ot_cross_cot_std", cot2align.cross_cot_std_weight),
                )
                self.terms += [Term(n, weight * w, "cot_records") for n, w in cross]

    # -- what the loop must provide -------------------------------------------------------------
    @property
    def needs_teacher(self) -> bool:
        return self.method != "sft"

    @property
    def needs_hidden_states(self) -> bool:
        return self.method in ("dskd", "dskd_cma") or self.ot.enabled

    @property
    def needs_cross_views(self) -> bool:
        return self.ot.enabled and self.ot.cross_cot

    @property
    def alignment(self) -> str | None:
        return self.config.mined_alignment if self.method == "mined" else None

    def build_projectors(self, student_hidden: int, teacher_hidden: int) -> nn.ModuleDict:
        projectors = nn.ModuleDict()
        if self.method in ("dskd", "dskd_cma"):
            projectors["t2s"] = nn.Linear(teacher_hidden, student_hidden)
            projectors["s2t"] = nn.Linear(student_hidden, teacher_hidden)
        if self.method == "dskd_cma":
            projectors["query"] = nn.Linear(2 * student_hidden, 2 * teacher_hidden)
        if self.ot.enabled:
            projectors["ot"] = nn.Linear(teacher_hidden, student_hidden)
        return projectors

    # -- the terms ------------------------------------------------------------------------------
    def _kd_sums(self, batch, outputs, projectors, access) -> dict[str, torch.Tensor]:
        cfg, chunk = self.config, self.config.chunk_size
        student, teacher = outputs["student"], outputs.get("teacher")
        s_labels = batch["student"]["labels"]
        if self.method == "vanilla_kd":
            mask = s_labels != -100
            return {
                "kd": kd_divergence(
                    student.logits,
                    teacher.logits,
                    mask,
                    kind=cfg.divergence,
                    temperature=cfg.temperature,
                    skew=cfg.skew,
                    chunk_size=chunk,
                ).sum
            }
        if self.method == "uld":
            loss = uld_loss(
                student.logits,
                teacher.logits,
                s_labels,
                batch["teacher"]["labels"],
                temperature=cfg.temperature,
                chunk_size=chunk,
            )
            return {"kd_uld": loss.sum}
        if self.method == "mined":
            loss = mined_loss(
                student.logits,
                teacher.logits,
                s_labels,
                batch["aligned_teacher_pos_BS"],
                self.vocab_map_W.to(student.logits.device),
                temperature=cfg.temperature,
                top_k=cfg.mined_top_k,
                chunk_size=chunk,
            )
            return {"kd_mined": loss.sum}
        if self.method in ("dskd", "dskd_cma"):
            return self._dskd_sums(batch, student, teacher, projectors, access)
        return {}

    def _dskd_sums(self, batch, student, teacher, projectors, access) -> dict[str, torch.Tensor]:
        cfg = self.config
        common = dict(
            student_head_weight_VD=access.student_head_weight(),
            teacher_head_weight_WH=access.teacher_head_weight(),
            t2s_projector=projectors["t2s"],
            s2t_projector=projectors["s2t"],
            kind=cfg.divergence,
            temperature=cfg.temperature,
            skew=cfg.skew,
            chunk_size=cfg.chunk_size,
        )
        s_side, t_side = batch["student"], batch["teacher"]
        if self.method == "dskd":
            losses = dskd_loss(
                student.logits,
                student.hidden_states[-1],
                teacher.logits,
                teacher.hidden_states[-1],
                s_side["labels"],
                **common,
            )
        else:
            with torch.no_grad():
                embeds = {
                    "student_input_embeds_BSD": access.student_embed(s_side["input_ids"]),
                    "student_target_embeds_BSD": access.student_embed(_targets(s_side)),
                    "teacher_input_embeds_BTH": access.teacher_embed(t_side["input_ids"]),
                    "teacher_target_embeds_BTH": access.teacher_embed(_targets(t_side)),
                }
            losses = dskd_cma_loss(
                student.logits,
                student.hidden_states[-1],
                student_labels_BS=s_side["labels"],
                teacher_logits_BTW=teacher.logits,
                teacher_hidden_BTH=teacher.hidden_states[-1],
                teacher_labels_BT=t_side["labels"],
                query_projector=projectors["query"],
                **embeds,
                **common,
            )
        return {
            "kd_t2s_ce": losses.t2s_ce.sum,
            "kd_t2s_kd": losses.t2s_kd.sum,
            "kd_s2t_kd": losses.s2t_kd.sum,
        }

    def _ot_sums(self, batch, outputs, projectors) -> dict[str, torch.Tensor]:
        """One batched Sinkhorn call per view, over all its layer pairs.

        The layer pairs of a view share lengths and masks, so they batch with no padding;
        batching across views would pad short standard answers to CoT lengths. bench_ot_calls
        times both against one call per group: per view 0.93-1.00x, across views 1.18-1.22x
        (2026-11-24, with the compiled CPU kernels; 0.83-0.93x and 1.14-1.22x before them).
        """
        project = projectors["ot"]
        sums = {}
        for name, (student, teacher) in self._ot_views(batch, outputs).items():
            groups = []
            for pair in self.ot.layer_pairs:
                s_hidden = _gather(student.hidden_states[pair.student], student.index)
                t_hidden = _gather(teacher.hidden_states[pair.teacher], teacher.index)
                t_hidden = project(t_hidden.to(s_hidden.dtype))
                groups.append((s_hidden, t_hidden, student.mask, teacher.mask, pair.weight))
            if self.collect_diagnostics and name == "ot_main":
                self.diagnostics = _plan_diagnostics(groups[-1], self.ot)
            sums[name] = multi_pair_ot_loss(
                groups,
                cost=self.ot.cost,
                epsilon=self.ot.epsilon,
                num_iters=self.ot.num_iters,
                grad_mode=self.ot.grad_mode,
                memory_budget_bytes=_budget(self.ot.memory_budget_mb),
            ).loss_sum
        return sums

    def _ot_views(self, batch, outputs) -> dict[str, tuple[_Side, _Side]]:
        """(student side, teacher side) per OT group, restricted to response positions."""
        s_main = _Side.of(outputs["student"], batch["student"])
        t_main = _Side.of(outputs["teacher"], batch["teacher"])
        views = {"ot_main": (s_main, t_main)}
        if not self.needs_cross_views:
            return views
        rows, valid = batch["cot_rows_C"], batch["cot_valid_C"][:, None]
        s_std = _Side.of(outputs["student_standard"], batch["student_standard"], valid)
        t_std = _Side.of(outputs["teacher_standard"], batch["teacher_standard"], valid)
        if self.ot.reference_compat:
            # The reference masks the teacher's standard-view labels everywhere: term is zero.
            t_std = _Side(t_std.outputs, t_std.index, torch.zeros_like(t_std.mask))
        views["ot_cross_std_cot"] = (s_std, t_main.rows(rows, valid))
        views["ot_cross_cot_std"] = (s_main.rows(rows, valid), t_std)
        return views

    # -- composition ----------------------------------------------------------------------------
    def __call__(
        self,
        batch: dict,
        outputs: dict[str, ModelOutputs],
        projectors: nn.ModuleDict,
        access: ModelAccess | None,
        window_counts: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = outputs["student"]
        chunk = self.config.chunk_size
        sums = {
            "ce": cross_entropy_loss(
                student.logits, batch["student"]["labels"], chunk_size=chunk
            ).sum
        }
        sums.update(self._kd_sums(batch, outputs, projectors, access))
        if self.ot.enabled:
            sums.update(self._ot_sums(batch, outputs, projectors))
        total = student.logits.new_zeros((), dtype=torch.float32)
        values = {}
        for term in self.terms:
            value = sums[term.name] / window_counts[term.normaliser]
            values[term.name] = value.detach()
            total = total + term.weight * value
        if "student_standard" in outputs:
            # Keeps the cross-view pass in the graph even when all its rows are masked (ZeRO-3
            # expects the same parameters to take part in every backward).
            total = total + 0.0 * outputs["student_standard"].logits.float().sum()
        return total, values


def _targets(side: dict) -> torch.Tensor:
    """Next-token targets with ignored positions pointed at a real id (they are masked)."""
    return side["labels"].clamp_min(0)


@dataclass
class _Side:
    """One side of an OT group: outputs and its response positions (index_BK, mask_BK)."""

    outputs: ModelOutputs
    index: torch.Tensor
    mask: torch.Tensor

    @property
    def hidden_states(self) -> tuple[torch.Tensor, ...]:
        return self.outputs.hidden_states

    @classmethod
    def of(cls, outputs: ModelOutputs, side: dict, valid: torch.Tensor | None = None) -> _Side:
        mask = side["response_mask"] if valid is None else side["response_mask"] & valid
        return cls(outputs, side["response_index"], mask)

    def rows(self, rows: torch.Tensor, valid: torch.Tensor) -> _Side:
        hidden = tuple(h[rows] for h in self.outputs.hidden_states)
        return _Side(
            ModelOutputs(self.outputs.logits[rows], hidden),
            self.index[rows],
            self.mask[rows] & valid,
        )


@torch.no_grad()
def _plan_diagnostics(group: tuple, ot: CoT2AlignConfig) -> dict[str, torch.Tensor]:
    """Marginal error and entropy of the main-view plan at the last configured layer pair."""
    student, teacher, student_mask, teacher_mask, _ = group
    cost = cost_matrix(student, teacher, ot.cost, teacher_mask_BT=teacher_mask)
    _, diagnostics = sinkhorn_log(
        cost,
        student_mask,
        teacher_mask,
        epsilon=ot.epsilon,
        num_iters=ot.num_iters,
        grad_mode="envelope",
        return_diagnostics=True,
    )
    solved = student_mask.any(1) & teacher_mask.any(1)
    count = solved.sum().clamp_min(1)
    return {
        "ot/marginal_error": (diagnostics.marginal_error_B * solved).sum() / count,
        "ot/plan_entropy": (diagnostics.entropy_B * solved).sum() / count,
    }


def _gather(hidden_BLD: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
    """The response positions of each row: (B, L, D) -> (B, K, D)."""
    return torch.gather(hidden_BLD, 1, index_BK[..., None].expand(-1, -1, hidden_BLD.shape[-1]))


def _budget(megabytes: float | None) -> int | None:
    return None if megabytes is None else int(megabytes * 2**20)
