"""Sequence-level optimal-transport loss between student and teacher hidden states (CoT2Align).

Shape legend: B batch (one OT problem per sequence pair), S student positions, T teacher
positions, D student hidden size. Teacher states arrive already projected to D by the caller (the
trainable Linear(H -> D) lives in the model, not here). Masks are boolean, True at the positions
that take part (the response positions).

Per problem the loss is the transport cost ``sum_ij P_ij C_ij`` of the entropic plan P between
uniform distributions over the real positions of each side (``transport.transport_cost``). Losses
return sums and counts; the caller divides once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cot2align_ds.losses.masking import fill_masked
from cot2align_ds.losses.ot.backend import compiled_cpu, run_compiled
from cot2align_ds.losses.ot.transport import transport_cost

COST_KINDS = ("attention", "cosine", "euclidean")


class MultiPairOT(NamedTuple):
    """Result of ``multi_pair_ot_loss``; G is the number of groups.

    loss_sum: ``sum_g weight_g * group_sums_G[g]`` (scalar).
    group_sums_G: transport cost summed over each group's problems, unweighted.
    group_counts_G: number of problems per group with a real position on both sides.
    """

    loss_sum: torch.Tensor
    group_sums_G: torch.Tensor
    group_counts_G: torch.Tensor


def cost_matrix(
    student_hidden_BSD: torch.Tensor,
    teacher_hidden_BTD: torch.Tensor,
    kind: str = "attention",
    *,
    teacher_mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise cost ``C_BST`` between student and teacher positions, in fp32 (fp64 stays fp64).

    - ``"attention"``: ``1 - softmax_j(<x_i, y_j> / sqrt(D))``, the softmax running over the
      teacher positions where ``teacher_mask_BT`` is True (all of them when it is None). In [0, 1].
    - ``"cosine"``: ``1 - cos(x_i, y_j)``. In [0, 2].
    - ``"euclidean"``: ``||x_i - y_j||_2``, unnormalised as in the reference code: its scale grows
      like ``sqrt(D)`` times the spread of the states, so pick epsilon accordingly (epsilon=10 is
      calibrated for the [0, 1] attention cost).
    """
    if kind not in COST_KINDS:
        raise ValueError(f"cost must be one of {COST_KINDS}, got {kind!r}")
    dtype = torch.promote_types(student_hidden_BSD.dtype, torch.float32)
    student_BSD, teacher_BTD = student_hidden_BSD.to(dtype), teacher_hidden_BTD.to(dtype)
    if kind == "cosine":
        similarity_BST = F.normalize(student_BSD, dim=-1) @ F.normalize(teacher_BTD, dim=-1).mT
        return 1.0 - similarity_BST
    if kind == "euclidean":
        return _euclidean(student_BSD, teacher_BTD)
    return 1.0 - _attention_weights(student_BSD, teacher_BTD, teacher_mask_BT)


def _attention_weights(student_BSD, teacher_BTD, teacher_mask_BT):
    """``softmax_j(<x_i, y_j> / sqrt(D))`` over the real teacher positions, (B, S, T).

    The mask enters as an additive bias and the scale as the GEMM's alpha: one fused op, with no
    masked_fill or division passes over B*S*T (nor their backward passes). The bias is the lowest
    finite value: anything finite added to it rounds back to it, so masked logits are exactly
    what masked_fill would write, and a row with no teacher position stays finite (uniform
    weights) instead of becoming NaN as -inf would make it.
    """
    bias_B1T = student_BSD.new_zeros(student_BSD.shape[0], 1, teacher_BTD.shape[1])
    if teacher_mask_BT is not None:
        bias_B1T.masked_fill_(~teacher_mask_BT.bool()[:, None, :], torch.finfo(bias_B1T.dtype).min)
    scale = 1.0 / math.sqrt(student_BSD.shape[-1])
    logits_BST = torch.baddbmm(bias_B1T, student_BSD, teacher_BTD.mT, alpha=scale)
    return torch.softmax(logits_BST, dim=-1)


def _euclidean(student_BSD, teacher_BTD):
    """``||x_i - y_j||`` through ``|x|^2 + |y|^2 - 2<x, y>`` (one GEMM), after moving both sets
    by their common mean: distances do not change, and the expansion no longer cancels large
    equal parts. Hidden states of real LLMs carry massive activations (~1e4) in a few shared
    dimensions; uncentred, fp32 loses the small differences in them."""
    centre_B1D = torch.cat([student_BSD, teacher_BTD], dim=1).mean(1, keepdim=True).detach()
    student_BSD, teacher_BTD = student_BSD - centre_B1D, teacher_BTD - centre_B1D
    squared_BST = (
        student_BSD.square().sum(-1)[:, :, None]
        + teacher_BTD.square().sum(-1)[:, None, :]
        - 2.0 * student_BSD @ teacher_BTD.mT
    )
    # The clamp keeps sqrt away from 0, where its derivative is infinite (identical states).
    return squared_BST.clamp_min(torch.finfo(squared_BST.dtype).tiny ** 0.5).sqrt()


def ot_loss(
    student_hidden_BSD: torch.Tensor,
    teacher_hidden_BTD: torch.Tensor,
    student_mask_BS: torch.Tensor,
    teacher_mask_BT: torch.Tensor,
    *,
    cost: str = "attention",
    epsilon: float = 10.0,
    num_iters: int = 100,
    grad_mode: str = "truncated",
    num_grad_iters: int = 10,
    absorb_every: int | None = None,
    memory_budget_bytes: int | None = None,
    max_iters: int | None = None,
    marginal_tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed OT transport cost over the batch, and the number of problems it covers.

    Args:
        student_hidden_BSD, teacher_hidden_BTD: hidden states (any float dtype; computed in fp32).
        student_mask_BS, teacher_mask_BT: True at the positions to align.
        cost: ``"attention"``, ``"cosine"`` or ``"euclidean"`` (see ``cost_matrix``).
        epsilon, num_iters, grad_mode, num_grad_iters, absorb_every, memory_budget_bytes,
            max_iters, marginal_tol: passed to ``sinkhorn_log`` (the last two: the adaptive
            iteration budget for small epsilon). The default ``"truncated"`` reproduces the gradient of the unrolled
            reference at bounded memory; ``"envelope"`` is cheaper but gives about half that
            gradient at epsilon=10 (see the ``sinkhorn`` module docstring). The memory budget
            bounds the solver's working memory, not the cost matrix and plan (B*S*T each), which
            the loss keeps for backward in any case.

    Returns:
        ``(loss_sum, num_problems)``: scalar fp32 sum of ``sum_ij P_ij C_ij`` over problems with at
        least one position on both sides, and that count as an fp32 scalar (no host sync).
    """
    cost_BST = _masked_cost(
        student_hidden_BSD, teacher_hidden_BTD, student_mask_BS, teacher_mask_BT, cost
    )
    solver = _solver_options(
        epsilon, num_iters, grad_mode, num_grad_iters, absorb_every, memory_budget_bytes, cost
    )
    solver.update(max_iters=max_iters, marginal_tol=marginal_tol)
    per_problem_B, solvable_B = _solve_transport(
        cost_BST, student_mask_BS.bool(), teacher_mask_BT.bool(), solver
    )
    return per_problem_B.sum(), solvable_B.sum().to(per_problem_B.dtype)


def multi_pair_ot_loss(
    pairs: Sequence[
        tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float | torch.Tensor]
    ],
    *,
    cost: str = "attention",
    epsilon: float = 10.0,
    num_iters: int = 100,
    grad_mode: str = "truncated",
    num_grad_iters: int = 10,
    absorb_every: int | None = None,
    memory_budget_bytes: int | None = None,
    max_iters: int | None = None,
    marginal_tol: float | None = None,
) -> MultiPairOT:
    """OT losses of several problem groups (layer pairs x views) in ONE batched Sinkhorn call.

    Args:
        pairs: G tuples ``(student_hidden_BSD, teacher_hidden_BTD, student_mask_BS,
            teacher_mask_BT, weight)``; B, S, T and D may differ between groups. Each group's
            costs are padded to the largest S and T (padding is masked, so it changes nothing)
            and all problems are concatenated along the batch. ``weight``: float or scalar
            tensor.
        cost, epsilon, ...: as in ``ot_loss``, shared by all groups.

    Returns:
        ``MultiPairOT(loss_sum, group_sums_G, group_counts_G)``; ``group_sums_G[g]`` and
        ``group_counts_G[g]`` equal ``ot_loss`` on group g alone.
    """
    if not pairs:
        raise ValueError("multi_pair_ot_loss needs at least one group")
    costs = [_masked_cost(*pair[:4], cost) for pair in pairs]
    student_masks = [pair[2].bool() for pair in pairs]
    teacher_masks = [pair[3].bool() for pair in pairs]
    max_student = max(c.shape[1] for c in costs)
    max_teacher = max(c.shape[2] for c in costs)
    solver = _solver_options(
        epsilon, num_iters, grad_mode, num_grad_iters, absorb_every, memory_budget_bytes, cost
    )
    solver.update(max_iters=max_iters, marginal_tol=marginal_tol)
    per_problem_B, solvable_B = _solve_transport(
        torch.cat([_pad_to(c, max_student, max_teacher) for c in costs]),
        torch.cat([_pad_to(m, max_student) for m in student_masks]),
        torch.cat([_pad_to(m, max_teacher) for m in teacher_masks]),
        solver,
    )
    sizes = [c.shape[0] for c in costs]
    group_sums_G = torch.stack([part.sum() for part in per_problem_B.split(sizes)])
    group_counts_G = torch.stack([part.sum() for part in solvable_B.split(sizes)])
    weights = [pair[4] for pair in pairs]
    loss_sum = sum(w * s for w, s in zip(weights, group_sums_G.unbind(), strict=True))
    return MultiPairOT(loss_sum, group_sums_G, group_counts_G.to(group_sums_G.dtype))


# Bounds on max C - min C of the bounded costs: lets the solver choose its absorption interval
# without measuring the range (a device synchronisation).
_COST_RANGE = {"attention": 1.0, "cosine": 2.0}


def _solver_options(epsilon, num_iters, grad_mode, num_grad_iters, absorb_every, budget, cost):
    return {
        "cost_range": _COST_RANGE.get(cost),
        "epsilon": epsilon,
        "num_iters": num_iters,
        "grad_mode": grad_mode,
        "num_grad_iters": num_grad_iters,
        "absorb_every": absorb_every,
        "memory_budget_bytes": budget,
    }


def _masked_cost(student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT, kind):
    # Padded positions may hold anything (models can emit NaN there); zeroing them keeps the cost
    # finite, so that 0 * cost stays 0 in the loss and in its gradient.
    student_mask_BS, teacher_mask_BT = student_mask_BS.bool(), teacher_mask_BT.bool()
    if kind == "attention":
        return masked_attention_cost(student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT)
    student_BSD = fill_masked(student_BSD, student_mask_BS[:, :, None], 0.0)
    teacher_BTD = fill_masked(teacher_BTD, teacher_mask_BT[:, :, None], 0.0)
    return cost_matrix(student_BSD, teacher_BTD, kind, teacher_mask_BT=teacher_mask_BT)


def masked_attention_cost(
    student_hidden_BSD: torch.Tensor,
    teacher_hidden_BTD: torch.Tensor,
    student_mask_BS: torch.Tensor,
    teacher_mask_BT: torch.Tensor,
) -> torch.Tensor:
    """``cost_matrix(x, y, "attention", teacher_mask_BT=...)`` of the states with their padded
    positions zeroed, as one differentiable op; C_BST in fp32 (fp64 stays fp64).

    Same values and gradients as zeroing the padded states with ``fill_masked`` and then calling
    ``cost_matrix``: the gradient is exactly zero at padded positions, whatever they held. Written
    as one op because the composition allocates about eight B*S*T or B*S*D buffers in its
    backward (a negation, the softmax backward, two scale passes, two masking passes), and on
    CPU each fresh buffer also costs its page faults; this backward writes into two buffers of
    its own besides the two gradients it returns. ``bench/bench_ot.py`` times both.
    """
    return _MaskedAttentionCost.apply(
        student_hidden_BSD, teacher_hidden_BTD, student_mask_BS.bool(), teacher_mask_BT.bool()
    )


class _MaskedAttentionCost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT):
        dtype = torch.promote_types(student_BSD.dtype, torch.float32)
        student_keep_BS1 = student_mask_BS[:, :, None]
        teacher_keep_BT1 = teacher_mask_BT[:, :, None]
        x_BSD = fill_masked(student_BSD.to(dtype), student_keep_BS1, 0.0)  # no autograd here
        y_BTD = fill_masked(teacher_BTD.to(dtype), teacher_keep_BT1, 0.0)
        cost_BST = _attention_weights(x_BSD, y_BTD, teacher_mask_BT).neg_().add_(1.0)
        ctx.save_for_backward(x_BSD, y_BTD, cost_BST, student_keep_BS1, teacher_keep_BT1)
        ctx.scale = 1.0 / math.sqrt(x_BSD.shape[-1])
        ctx.input_dtypes = student_BSD.dtype, teacher_BTD.dtype
        return cost_BST

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_cost_BST):
        x_BSD, y_BTD, cost_BST, student_keep_BS1, teacher_keep_BT1 = ctx.saved_tensors
        grad_logits_BST = _softmax_backward(cost_BST, grad_cost_BST)
        # The logits' scale as the GEMMs' alpha (beta=0: the zero input is never read).
        zero = grad_logits_BST.new_zeros(())
        grad_x_BSD = torch.baddbmm(zero, grad_logits_BST, y_BTD, beta=0.0, alpha=ctx.scale)
        grad_y_BTD = torch.baddbmm(zero, grad_logits_BST.mT, x_BSD, beta=0.0, alpha=ctx.scale)
        grad_x_BSD.mul_(student_keep_BS1)
        grad_y_BTD.mul_(teacher_keep_BT1)
        student_dtype, teacher_dtype = ctx.input_dtypes
        return grad_x_BSD.to(student_dtype), grad_y_BTD.to(teacher_dtype), None, None


def _softmax_backward(cost_BST, grad_cost_BST):
    """Softmax backward of the gradient -g with respect to p = 1 - C:
    ``d logits = p * (sum_j g_j p_j - g)``. p is formed first: expanding p * x as x - C x would
    cancel (C is close to 1) and cost digits. On CPU one compiled pass per row
    (``cpu_kernels.attention_cost_grad``), elsewhere four ops in two buffers."""
    if compiled_cpu(cost_BST):
        grad_cost_BST = grad_cost_BST.to(cost_BST.dtype)
        grad_logits_BST = torch.empty_like(cost_BST)
        run_compiled("attention_cost_grad", (cost_BST, grad_cost_BST, grad_logits_BST), ())
        return grad_logits_BST
    weights_BST = torch.rsub(cost_BST, 1.0)
    work_BST = torch.mul(grad_cost_BST, weights_BST)
    row_sum_BS1 = work_BST.sum(-1, keepdim=True)
    torch.sub(row_sum_BS1, grad_cost_BST, out=work_BST)
    return weights_BST.mul_(work_BST)


def _solve_transport(cost_BST, student_mask_BS, teacher_mask_BT, solver):
    """Per-problem transport cost ``sum_ij P_ij C_ij`` and whether the problem has any mass."""
    per_problem_B = transport_cost(cost_BST, student_mask_BS, teacher_mask_BT, **solver)
    return per_problem_B, student_mask_BS.any(1) & teacher_mask_BT.any(1)


def _pad_to(tensor, *sizes):
    """Pad the trailing dimensions after the batch up to ``sizes`` (zeros / False)."""
    padding = []
    for dim, size in reversed(list(enumerate(sizes, start=1))):
        padding += [0, size - tensor.shape[dim]]
    return F.pad(tensor, padding) if any(padding) else tensor
