"""The distillation objective: which losses run, how they are normalised and combined.

``total = (1 - a) * CE + a * (KD + OT)`` with ``a = distill.kd_rate``. Every term is a sum
returned by a pure loss function, divided once by a global count taken over the whole
accumulation window and all ranks (``Trainer._window_counts``), so a run at world size 2 equals
world size 1 with twice the accumulation. Terms and their normalisers (``methods.py``):

* ``ce``: student next-token CE on the main view, per student response token;
* base KD on the main view: the ``kd_terms`` of ``distill.method`` in the method registry;
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
from cot2align_ds.data.batch import DistillBatch, TokenSide
from cot2align_ds.losses.cross_entropy import cross_entropy_loss
from cot2align_ds.losses.divergences import kd_divergence
from cot2align_ds.losses.dskd import dskd_cma_loss, dskd_loss
from cot2align_ds.losses.mined import mined_loss
from cot2align_ds.losses.ot.alignment_mass import aligned_mass
from cot2align_ds.losses.ot.loss import cost_matrix, multi_pair_ot_loss
from cot2align_ds.losses.ot.sinkhorn import sinkhorn_log
from cot2align_ds.losses.uld import uld_loss
from cot2align_ds.methods import (
    NORMALISERS,
    OT_TERMS,
    get_method,
    needs_hidden_states,
    projector_shapes,
)


def batch_normalisers(batch: DistillBatch) -> torch.Tensor:
    """Counts of one micro-batch, in ``NORMALISERS`` order (summed over a window later)."""
    counts = {
        "student_tokens": batch.student.response_tokens(),
        "records": torch.tensor(batch.is_cot_B.numel()),
        "cot_records": batch.is_cot_B.sum(),
    }
    return torch.stack([counts[name].to(torch.float64) for name in NORMALISERS])


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
class StepOutputs:
    """The forward passes of one micro-batch: the main views, and for Cross-CoT the standard
    views of its CoT rows (``DistillBatch.standard``)."""

    student: ModelOutputs
    teacher: ModelOutputs | None = None
    student_standard: ModelOutputs | None = None
    teacher_standard: ModelOutputs | None = None


@dataclass
class StepLoss:
    """The objective on one micro-batch: the total to backpropagate, each term's (detached)
    normalised value, and, when asked for, OT plan diagnostics."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    diagnostics: dict[str, torch.Tensor]


@dataclass
class ModelAccess:
    """What DSKD needs beyond outputs; callables so ZeRO-3 gathers weights only when used."""

    student_embed: Callable[[torch.Tensor], torch.Tensor]
    teacher_embed: Callable[[torch.Tensor], torch.Tensor]
    student_head_weight: Callable[[], torch.Tensor]
    teacher_head_weight: Callable[[], torch.Tensor]
    # The teacher's hidden_states[0] is its token embedding up to a constant factor (rotary
    # models), so DSKD-CMA reads embeddings there instead of gathering the teacher's table:
    # keys and values are divided by their std, which cancels the factor.
    teacher_embeddings_in_hidden: bool = False
    # The student's hidden_states[0] equals its token embedding exactly (rotary model, plain
    # embedding table): reading it there keeps the table out of a second, untraced module call,
    # which would invalidate ZeRO-3's prefetch trace every micro-batch.
    student_embeddings_in_hidden: bool = False


class Objective:
    """The loss terms of a method (``methods.py``) and CoT2Align; ``__call__`` gives a
    ``StepLoss``. Its attributes say what the forward passes must provide."""

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
        # As built (nearest string per teacher id): the reference DP alignment checks it.
        self.teacher_to_student_W = teacher_to_student_vocab_W
        if teacher_to_student_vocab_W is not None and distill.mined_projection == "first":
            teacher_to_student_vocab_W = first_teacher_id_only(teacher_to_student_vocab_W)
        self.vocab_map_W = teacher_to_student_vocab_W
        spec = get_method(self.method)
        kd_rate = distill.kd_rate if spec.kd_terms else 0.0
        self.terms = [Term("ce", 1.0 - kd_rate, "student_tokens")]
        self.terms += [Term(name, kd_rate, norm) for name, norm in spec.kd_terms]
        if cot2align.enabled:
            weights = {
                "ot_main": cot2align.main_weight,
                "ot_cross_std_cot": cot2align.cross_std_cot_weight,
                "ot_cross_cot_std": cot2align.cross_cot_std_weight,
            }
            ot_terms = OT_TERMS if cot2align.cross_cot else OT_TERMS[:1]
            self.terms += [
                Term(name, kd_rate * cot2align.ot_weight * weights[name], norm)
                for name, norm in ot_terms
            ]
        # What the forward passes must provide, fixed for the run.
        self.needs_teacher = spec.needs_teacher
        self.needs_hidden_states = needs_hidden_states(self.method, cot2align.enabled)
        self.needs_cross_views = cot2align.enabled and cot2align.cross_cot
        self.alignment = distill.mined_alignment if spec.token_alignment else None

    def build_projectors(self, student_hidden: int, teacher_hidden: int) -> nn.ModuleDict:
        shapes = projector_shapes(self.method, self.ot.enabled, student_hidden, teacher_hidden)
        return nn.ModuleDict({name: nn.Linear(*shape) for name, shape in shapes.items()})

    # -- the terms ------------------------------------------------------------------------------
    def _kd_sums(self, batch, outputs, projectors, access) -> dict[str, torch.Tensor]:
        cfg, chunk = self.config, self.config.chunk_size
        student, teacher = outputs.student, outputs.teacher
        s_labels = batch.student.labels
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
                batch.teacher.labels,
                temperature=cfg.uld_temperature,
                chunk_size=chunk,
            )
            return {"kd_uld": loss.sum}
        if self.method == "mined":
            loss = mined_loss(
                student.logits,
                teacher.logits,
                s_labels,
                batch.aligned_teacher_pos_BS,
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
        s_side, t_side = batch.student, batch.teacher
        if self.method == "dskd":
            losses = dskd_loss(
                student.logits,
                student.hidden_states[-1],
                teacher.logits,
                teacher.hidden_states[-1],
                s_side.labels,
                **common,
            )
        else:
            with torch.no_grad():
                if access.student_embeddings_in_hidden:
                    # Positions without a target (prompt, padding, the last) are masked out.
                    inputs_BSD = student.hidden_states[0].detach()
                    embeds = {
                        "student_input_embeds_BSD": inputs_BSD,
                        "student_target_embeds_BSD": _next_position(inputs_BSD),
                    }
                else:
                    embeds = {
                        "student_input_embeds_BSD": access.student_embed(s_side.input_ids),
                        "student_target_embeds_BSD": access.student_embed(_targets(s_side)),
                    }
                # (The whole-tensor std of the reference mode would see the shifted zeros.)
                if access.teacher_embeddings_in_hidden and cfg.dskd_std == "response":
                    # The target at position t is the input at t + 1 (labels are the inputs
                    # shifted); the last position has no target and is never a response one.
                    inputs_BTH = teacher.hidden_states[0]
                    targets_BTH = _next_position(inputs_BTH)
                else:
                    inputs_BTH = access.teacher_embed(t_side.input_ids)
                    targets_BTH = access.teacher_embed(_targets(t_side))
                embeds["teacher_input_embeds_BTH"] = inputs_BTH
                embeds["teacher_target_embeds_BTH"] = targets_BTH
            losses = dskd_cma_loss(
                student.logits,
                student.hidden_states[-1],
                student_labels_BS=s_side.labels,
                teacher_logits_BTW=teacher.logits,
                teacher_hidden_BTH=teacher.hidden_states[-1],
                teacher_labels_BT=t_side.labels,
                query_projector=projectors["query"],
                std_scope=cfg.dskd_std,
                **embeds,
                **common,
            )
        return {
            "kd_t2s_ce": losses.t2s_ce.sum,
            "kd_t2s_kd": losses.t2s_kd.sum,
            "kd_s2t_kd": losses.s2t_kd.sum,
        }

    def _ot_sums(
        self, batch, outputs, projectors, diagnostics: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        """One batched Sinkhorn call per view, over all its layer pairs; with ``diagnostics``
        (a dict to fill), the main view's plan diagnostics too (one extra solve).

        The layer pairs of a view share lengths and masks, so they batch with no padding;
        batching across views would pad short standard answers to CoT lengths (``make bench``,
        ``ot_calls``, times both against one call per group).
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
            if diagnostics is not None and name == "ot_main":
                diagnostics.update(_plan_diagnostics(groups[-1], self.ot))
                if batch.char_aligned_BKJ is not None:
                    diagnostics.update(
                        _aligned_mass_diagnostics(groups, self.ot, batch.char_aligned_BKJ)
                    )
            result = multi_pair_ot_loss(
                groups,
                cost=self.ot.cost,
                epsilon=self.ot.epsilon,
                num_iters=self.ot.num_iters,
                grad_mode=self.ot.grad_mode,
                num_grad_iters=self.ot.num_grad_iters,
                memory_budget_bytes=_budget(self.ot.memory_budget_mb),
                **adaptive_budget(self.ot),
            )
            sums[name] = result.loss_sum
            if diagnostics is not None:
                # Each layer pair's transport cost per record (unweighted): which layers align.
                per_record = result.group_sums_G / result.group_counts_G.clamp_min(1)
                for pair, value in zip(self.ot.layer_pairs, per_record.unbind(), strict=True):
                    diagnostics[f"ot/{name}/layers_{pair.student}_{pair.teacher}"] = value.detach()
        return sums

    def _ot_views(self, batch, outputs) -> dict[str, tuple[_Side, _Side]]:
        """(student side, teacher side) per OT group, restricted to response positions."""
        s_main = _Side.of(outputs.student, batch.student)
        t_main = _Side.of(outputs.teacher, batch.teacher)
        views = {"ot_main": (s_main, t_main)}
        if not self.needs_cross_views:
            return views
        standard = batch.standard
        rows, valid = standard.rows_C, standard.valid_C[:, None]
        s_std = _Side.of(outputs.student_standard, standard.student, valid)
        t_std = _Side.of(outputs.teacher_standard, standard.teacher, valid)
        if self.ot.reference_compat:
            # The reference masks the teacher's standard-view labels everywhere: term is zero.
            t_std = _Side(t_std.outputs, t_std.index, torch.zeros_like(t_std.mask))
        views["ot_cross_std_cot"] = (s_std, t_main.rows(rows, valid))
        views["ot_cross_cot_std"] = (s_main.rows(rows, valid), t_std)
        return views

    # -- composition ----------------------------------------------------------------------------
    def __call__(
        self,
        batch: DistillBatch,
        outputs: StepOutputs,
        projectors: nn.ModuleDict,
        access: ModelAccess | None,
        window_counts: dict[str, torch.Tensor],
        *,
        diagnostics: bool = False,
    ) -> StepLoss:
        student = outputs.student
        chunk = self.config.chunk_size
        sums = {
            "ce": cross_entropy_loss(student.logits, batch.student.labels, chunk_size=chunk).sum
        }
        sums.update(self._kd_sums(batch, outputs, projectors, access))
        plan_diagnostics: dict[str, torch.Tensor] = {}
        if self.ot.enabled:
            wanted = plan_diagnostics if diagnostics else None
            sums.update(self._ot_sums(batch, outputs, projectors, wanted))
        total = student.logits.new_zeros((), dtype=torch.float32)
        values = {}
        for term in self.terms:
            if term.normaliser == "cot_records" and self.ot.cross_cot_pooling == "micro_batch":
                # The reference's pooling: a mean over this micro-batch's CoT records (DeepSpeed
                # then averages the micro-batches of the window and the ranks).
                value = sums[term.name] / batch.is_cot_B.sum().clamp_min(1)
            else:
                value = sums[term.name] / window_counts[term.normaliser]
            values[term.name] = value.detach()
            total = total + term.weight * value
        if outputs.student_standard is not None:
            # Keeps the cross-view pass in the graph even when all its rows are masked (ZeRO-3
            # expects the same parameters to take part in every backward).
            total = total + 0.0 * outputs.student_standard.logits.float().sum()
        return StepLoss(total, values, plan_diagnostics)


def _next_position(embeds_BLD: torch.Tensor) -> torch.Tensor:
    """The embedding of each position's target, the next input (labels are the inputs shifted
    by one); the last position has none and gets zeros."""
    return torch.cat([embeds_BLD[:, 1:], torch.zeros_like(embeds_BLD[:, :1])], dim=1)


def _targets(side: TokenSide) -> torch.Tensor:
    """Next-token targets with ignored positions pointed at a real id (they are masked)."""
    return side.labels.clamp_min(0)


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
    def of(cls, outputs: ModelOutputs, side: TokenSide, valid: torch.Tensor | None = None) -> _Side:
        mask = side.response_mask if valid is None else side.response_mask & valid
        return cls(outputs, side.response_index, mask)

    def rows(self, rows: torch.Tensor, valid: torch.Tensor) -> _Side:
        hidden = tuple(None if h is None else h[rows] for h in self.outputs.hidden_states)
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
        **adaptive_budget(ot),
    )
    solved = student_mask.any(1) & teacher_mask.any(1)
    count = solved.sum().clamp_min(1)
    # 1 is the uniform plan (maximum entropy, log(S T)), 0 a plan on S or T entries: the
    # question "does the plan align anything or spread everywhere" at any sequence length.
    pairs_B = student_mask.sum(1) * teacher_mask.sum(1)
    max_entropy_B = torch.log(pairs_B.clamp_min(2).to(diagnostics.entropy_B.dtype))
    normalised_B = torch.where(pairs_B > 1, diagnostics.entropy_B / max_entropy_B, 0.0)
    return {
        "ot/marginal_error": (diagnostics.marginal_error_B * solved).sum() / count,
        "ot/plan_entropy": (diagnostics.entropy_B * solved).sum() / count,
        "ot/plan_entropy_normalised": (normalised_B * solved).sum() / count,
    }


@torch.no_grad()
def _aligned_mass_diagnostics(
    groups: list[tuple], ot: CoT2AlignConfig, char_aligned_BKJ: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per layer pair, the main-view plan's mass on character-aligned position pairs, and the
    uniform plan's (``losses/ot/alignment_mass.py``); one extra solve per pair, at log steps."""
    out = {}
    for pair, (student, teacher, student_mask, teacher_mask, _) in zip(
        ot.layer_pairs, groups, strict=True
    ):
        cost = cost_matrix(student, teacher, ot.cost, teacher_mask_BT=teacher_mask)
        plan = sinkhorn_log(
            cost, student_mask, teacher_mask, epsilon=ot.epsilon, num_iters=ot.num_iters,
            grad_mode="envelope", **adaptive_budget(ot),
        )  # fmt: skip
        mass_B, uniform_B = aligned_mass(plan, char_aligned_BKJ, student_mask, teacher_mask)
        solved = student_mask.any(1) & teacher_mask.any(1)
        count = solved.sum().clamp_min(1)
        out[f"ot/aligned_mass/layers_{pair.student}_{pair.teacher}"] = (
            mass_B * solved
        ).sum() / count
        out["ot/aligned_mass_uniform"] = (uniform_B * solved).sum() / count
    return out


def first_teacher_id_only(teacher_to_student_vocab_W: torch.Tensor) -> torch.Tensor:
    """The vocabulary map with, for each student id, only its lowest teacher id mapped (the
    others -1): the reference's projection, where one teacher id stands for each student id."""
    map_W = teacher_to_student_vocab_W.long().clone()
    mapped_W = map_W >= 0
    if not bool(mapped_W.any()):
        return map_W
    teacher_ids = torch.arange(map_W.numel(), device=map_W.device)
    lowest_V = torch.full((int(map_W.max()) + 1,), map_W.numel(), device=map_W.device)
    lowest_V = lowest_V.scatter_reduce(0, map_W[mapped_W], teacher_ids[mapped_W], "amin")
    keep_W = mapped_W & (lowest_V[map_W.clamp_min(0)] == teacher_ids)
    return torch.where(keep_W, map_W, -1)


def adaptive_budget(ot: CoT2AlignConfig) -> dict:
    """The solver's adaptive-iteration arguments from the config (none when it is off)."""
    if ot.max_iters is None:
        return {}
    return {"max_iters": max(ot.max_iters, ot.num_iters), "marginal_tol": ot.max_marginal_error}


def _gather(hidden_BLD: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
    """The response positions of each row: (B, L, D) -> (B, K, D)."""
    return torch.gather(hidden_BLD, 1, index_BK[..., None].expand(-1, -1, hidden_BLD.shape[-1]))


def _budget(megabytes: float | None) -> int | None:
    return None if megabytes is None else int(megabytes * 2**20)
