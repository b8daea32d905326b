"""Batched entropic optimal transport (Sinkhorn) over padded problems, stabilised in the log domain.

Shape legend: B problems (batch), S student positions (rows of the plan), T teacher positions
(columns of the plan). ``*_mask_BS`` / ``*_mask_BT`` are boolean, True where a position is real.

Problem solved for each b (positions restricted to the unmasked ones)::

    P_b = argmin_P <P, C_b> - epsilon * H(P)   s.t.  P 1 = a_b,  P^T 1 = b_b,  P >= 0

with uniform marginals ``a_b`` over the real student positions and ``b_b`` over the real teacher
positions. The Gibbs kernel is ``exp(-C / epsilon)``: the reference code's ``exp(-0.1 * C)`` is
``epsilon=10``. One iteration is a column update followed by a row update, as in POT's
``sinkhorn_log``; after ``num_iters`` iterations the row marginals are exact and the column
marginals carry the remaining error.

How it runs. Potentials ``f_BS, g_BT`` (in units of epsilon) live in the log domain. Every
``absorb_every`` iterations they are absorbed into the kernel ``K = exp(logK + f + g)``; in between,
the iterations are plain scaling updates ``v = b / (K^T u)``, ``u = a / (K v)``, i.e. two
matrix-vector products instead of two log-sum-exp passes (about 10x cheaper per iteration on CPU).
After an absorption every column of K sums to at most b_j, so no entry overflows; an entry that
underflows fp32 stays zero until the next absorption, and a row or column whose current mass is
below ~1e-19 takes a damped step. Both can only happen far from the fixed point (tiny epsilon,
early iterations) and slow it down there; they never change the fixed point.
``absorb_every=1`` absorbs after every iteration. On CPU the scaling updates run compiled
(``cpu_kernels``: one pass over K per iteration, and a problem whose iterate is bitwise
unchanged stops, with exactly the results of the full count); GPU tensors run them as torch ops.

``absorb_every=None`` (the default) picks the interval from the kernel's dynamic range
``R = (max C - min C) / epsilon`` over the real entries. When ``R <= 20`` every kernel entry is
within ``e^-20`` of its column maximum, so the scalings stay within ``e^(+-2R)`` of the marginals'
scale and neither over- nor underflows fp32 for any realistic length: one absorption per phase
is enough (the reference setting, attention cost at epsilon=10, has R <= 0.1). Otherwise it
absorbs every 10 iterations. ``cost_range`` is a known bound on ``max C - min C`` (1 for the
attention cost, 2 for cosine); without it the range is measured, which costs one device
synchronisation per call.

Everything accumulates in fp32 (fp64 inputs stay fp64); masked rows and columns carry exactly
zero mass; a problem with no real position on either side gets an all-zero plan.

Gradient modes (``grad_mode``):

- ``"unrolled"``: autograd through every iteration, the reference behaviour. Each absorption
  block saves one B*S*T kernel (its backward runs on vectors), so saved memory grows with the
  iteration count only when the kernel's range forces intermediate absorptions.
- ``"envelope"``: all iterations under ``torch.no_grad()``; the plan is returned detached, so a loss
  ``sum(P * C)`` gets the gradient ``P*`` with respect to C. That is the exact gradient of the
  *regularised* objective ``<P, C> - epsilon H(P)``, not of the transport cost ``<P*(C), C>``.
  Memory does not depend on the iteration count.
- ``"truncated"``: ``num_iters - num_grad_iters`` iterations under ``no_grad``, then the last
  ``num_grad_iters`` with autograd, starting from the detached potentials. Near the fixed point the
  Sinkhorn map contracts fast (at epsilon=10 on a cost in [0, 1] by orders of magnitude per
  iteration), so a few differentiated iterations reproduce the unrolled gradient of the transport
  cost while memory stays bounded by ``num_grad_iters``.

Measured at the reference settings (attention cost, epsilon=10, 100 iterations;
tests/unit/test_ot_loss.py::test_gradient_modes_at_the_reference_settings): with respect to the
hidden states the envelope gradient points in the same direction as the unrolled one (cosine
0.99999) but has HALF its norm (relative difference 0.50, norm ratio 0.50). At large epsilon
``P ~ a b^T (1 - C~/epsilon)`` (C~ the doubly centred cost): the transport cost has a quadratic term
``-<a b^T, C~ C>/epsilon`` whose gradient is twice that of the regularised objective, and the
constant part ``a b^T`` carries no gradient to the hidden states because every softmax row sums to
one. With respect to the cost matrix itself the two differ by only ~1%
(test_sinkhorn.py::test_gradient_modes_on_a_cost_matrix) since ``a b^T`` dominates both.
``"truncated"`` matches unrolled to 4e-7 (relative) with 1 differentiated iteration and to 1e-13
with 3 or more at epsilon=10; at epsilon=0.1 it needs 10 (3e-8). Hence the default is
``"truncated"`` with ``num_grad_iters=10`` (one absorption block, so the same memory as 1): the
reference gradient at memory independent of ``num_iters``. ``"envelope"`` stays available: the
cheapest, and at large epsilon equivalent to the reference with half the OT weight.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from .masking import fill_masked

GRAD_MODES = ("unrolled", "envelope", "truncated")

# Stands in for log(0) on padded entries: finite, so masked arithmetic never produces NaN, and so
# negative that exp() of it is exactly zero even after adding any realistic potential.
_LOG_ZERO = -1e30


@dataclass(frozen=True)
class SinkhornDiagnostics:
    """Convergence report of one ``sinkhorn_log`` call (tensors are detached).

    marginal_error_B: L1 violation of both marginals, ``|P 1 - a|_1 + |P^T 1 - b|_1``, per problem.
    entropy_B: ``-sum_ij P_ij log P_ij`` per problem (0 for an empty problem).
    num_iters: iterations actually run (fewer than asked when ``tol`` stopped early).
    """

    marginal_error_B: torch.Tensor
    entropy_B: torch.Tensor
    num_iters: int


def sinkhorn_log(
    cost_BST: torch.Tensor,
    student_mask_BS: torch.Tensor,
    teacher_mask_BT: torch.Tensor,
    *,
    epsilon: float,
    num_iters: int,
    grad_mode: str = "truncated",
    num_grad_iters: int = 10,
    tol: float | None = None,
    absorb_every: int | None = None,
    cost_range: float | None = None,
    memory_budget_bytes: int | None = None,
    return_diagnostics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SinkhornDiagnostics]:
    """Entropic OT plans of B padded problems, solved together.

    Args:
        cost_BST: cost between student position i and teacher position j; any float dtype (the
            solver computes in fp32, or fp64 for fp64 input). Values at masked entries are ignored.
        student_mask_BS, teacher_mask_BT: True at real positions.
        epsilon: entropic regularisation; the kernel is ``exp(-C / epsilon)``.
        num_iters: Sinkhorn iterations (a column then a row update each); fixed unless ``tol``.
        grad_mode: ``"unrolled"``, ``"envelope"`` or ``"truncated"`` (see the module docstring).
        num_grad_iters: differentiated iterations in ``"truncated"`` mode.
        tol: if set, stop once every problem's column-marginal L1 error is <= tol, checked at each
            absorption; this synchronises with the host and is meant for evaluation.
        absorb_every: iterations between absorptions of the scalings into the log-domain kernel;
            None chooses from the kernel's dynamic range (module docstring).
        cost_range: optional known bound on ``max C - min C`` over real entries, used by the
            automatic ``absorb_every`` instead of measuring it (which synchronises the device).
        memory_budget_bytes: if set, solve the problems in chunks whose working memory fits the
            budget (see ``sinkhorn_chunk_size``); differentiated chunks are recomputed in backward.
        return_diagnostics: also return a ``SinkhornDiagnostics``.

    Returns:
        plan_BST (fp32 or fp64), zero at masked entries; plus diagnostics when asked.
    """
    _check_args(cost_BST, student_mask_BS, teacher_mask_BT, epsilon, grad_mode)
    _check_counts(num_iters=num_iters, num_grad_iters=num_grad_iters)
    if absorb_every is not None:
        _check_counts(absorb_every=absorb_every)
    num_problems = cost_BST.shape[0]
    if num_problems == 0:
        return _empty_result(cost_BST, return_diagnostics)
    options, chunk = _plan_solve(
        cost_BST,
        student_mask_BS,
        teacher_mask_BT,
        epsilon=epsilon,
        num_iters=num_iters,
        grad_mode=grad_mode,
        num_grad_iters=num_grad_iters,
        tol=tol,
        absorb_every=absorb_every,
        cost_range=cost_range,
        memory_budget_bytes=memory_budget_bytes,
    )
    plan_BST, f_BS, g_BT, iters = _solve_in_chunks(
        cost_BST, student_mask_BS, teacher_mask_BT, options, chunk
    )
    if not return_diagnostics:
        return plan_BST
    masks = _problem_masks(student_mask_BS, teacher_mask_BT)
    return plan_BST, _diagnose(cost_BST, *masks, epsilon, plan_BST, f_BS, g_BT, iters)


def transport_cost(
    cost_BST: torch.Tensor,
    student_mask_BS: torch.Tensor,
    teacher_mask_BT: torch.Tensor,
    *,
    epsilon: float,
    num_iters: int,
    grad_mode: str = "truncated",
    num_grad_iters: int = 10,
    absorb_every: int | None = None,
    cost_range: float | None = None,
    memory_budget_bytes: int | None = None,
) -> torch.Tensor:
    """Transport cost ``sum_ij P_ij C_ij`` of each problem's entropic plan, (B,) fp32 (fp64 stays).

    Arguments as in ``sinkhorn_log`` (no ``tol``: a training loss runs its fixed iteration
    count). Same value and gradient as ``(sinkhorn_log(...) * C).sum((1, 2))`` up to float
    rounding, but when the differentiated iterations form one absorption block (the
    ``"truncated"`` and ``"unrolled"`` defaults) or the mode is ``"envelope"``, and the batch is
    solved in one chunk, it runs as one autograd op whose backward is written out (below)
    instead of an autograd chain through kernel, plan and product: four fresh B*S*T buffers
    instead of about a dozen, two with the compiled CPU loops (kernel and gradient; the plan is
    never formed). ``bench/bench_ot.py`` times the loss either way.

    Unlike ``sinkhorn_log``, C must be finite at masked entries (they get no mass, but
    ``0 * NaN`` would reach the loss): the costs of ``losses.ot`` are, because padded states
    are zeroed before the cost is formed.
    """
    num_problems = cost_BST.shape[0]
    if num_problems > 0 and FUSED_LOSS:
        _check_args(cost_BST, student_mask_BS, teacher_mask_BT, epsilon, grad_mode)
        options, chunk = _plan_solve(
            cost_BST,
            student_mask_BS,
            teacher_mask_BT,
            epsilon=epsilon,
            num_iters=num_iters,
            grad_mode=grad_mode,
            num_grad_iters=num_grad_iters,
            tol=None,
            absorb_every=absorb_every,
            cost_range=cost_range,
            memory_budget_bytes=memory_budget_bytes,
        )
        if chunk == num_problems and options.num_grad <= options.absorb_every:
            return _TransportCost.apply(cost_BST, student_mask_BS, teacher_mask_BT, options)
    plan_BST = sinkhorn_log(
        cost_BST,
        student_mask_BS,
        teacher_mask_BT,
        epsilon=epsilon,
        num_iters=num_iters,
        grad_mode=grad_mode,
        num_grad_iters=num_grad_iters,
        absorb_every=absorb_every,
        cost_range=cost_range,
        memory_budget_bytes=memory_budget_bytes,
    )
    return (plan_BST * cost_BST).sum((1, 2))


def _plan_solve(
    cost_BST,
    student_mask_BS,
    teacher_mask_BT,
    *,
    epsilon,
    num_iters,
    grad_mode,
    num_grad_iters,
    tol,
    absorb_every,
    cost_range,
    memory_budget_bytes,
) -> tuple[_Options, int]:
    """Solver options (absorption interval, differentiated iterations) and problems per chunk."""
    _check_counts(num_iters=num_iters, num_grad_iters=num_grad_iters)
    if absorb_every is not None:
        _check_counts(absorb_every=absorb_every)
    num_problems, num_student, num_teacher = cost_BST.shape
    if absorb_every is None:
        absorb_every = automatic_absorb_every(
            cost_BST, student_mask_BS, teacher_mask_BT, epsilon, num_iters, tol, cost_range
        )
    num_grad = {"unrolled": num_iters, "envelope": 0}.get(grad_mode, min(num_grad_iters, num_iters))
    chunk = num_problems
    if memory_budget_bytes is not None:
        chunk = sinkhorn_chunk_size(
            num_problems,
            num_student,
            num_teacher,
            memory_budget_bytes=memory_budget_bytes,
            num_grad_iters=num_grad,
            absorb_every=absorb_every,
            bytes_per_element=torch.promote_types(cost_BST.dtype, torch.float32).itemsize,
        )
    options = _Options(epsilon, num_iters, num_grad, tol, absorb_every, chunk < num_problems)
    return options, chunk


# False routes ``transport_cost`` through ``sinkhorn_log`` and autograd (the bench's peer).
FUSED_LOSS = True


class _TransportCost(torch.autograd.Function):
    """``transport_cost`` with one differentiated absorption block (or none: envelope).

    Forward, per problem: warm iterations without autograd end at potentials f, g; the block
    starts from ``K1 = exp(log K + f + g)``, runs its scaling iterations to (u, v), and the plan
    is ``P = K1 u v^T``; the loss is ``L = <P, C>``.

    Backward, with G the kernel gradient of the scaling block fed with ``dL/du = (K1 * C) v``
    and ``dL/dv = (K1 * C)^T u`` (``_scaling_backward``)::

        dL/dC = P - (P * C + K1 * G) / epsilon

    (the direct term, then ``log K = -C / epsilon`` through the plan and through K1). Masked
    entries of K1 and P are exactly zero, so the gradient there is too, provided C is finite
    there (``transport_cost``'s contract). Envelope: ``dL/dC = P``.

    With the compiled CPU loops the same quantities come from passes over K1 and C
    (``cpu_kernels.transport_terms`` / ``transport_cost_grad``): ``dL/du``, ``dL/dv`` and the
    loss in one pass, and in the backward ``dL/dC = K1 * (u v^T (1 - C/epsilon) - G/epsilon)``
    with ``P = K1 u v^T``, in place in G's buffer, so neither P nor P * C is ever stored.
    """

    @staticmethod
    def forward(ctx, cost_BST, student_mask_BS, teacher_mask_BT, options):
        student_mask_BS, teacher_mask_BT = _problem_masks(student_mask_BS, teacher_mask_BT)
        problem = _Problem(cost_BST, student_mask_BS, teacher_mask_BT, options.epsilon, clean=False)
        a_B1S, b_B1T, tiny = problem.a_B1S, problem.b_B1T, problem.tiny
        num_warm = options.num_iters - options.num_grad
        f_BS, g_BT = problem.initial_potentials()
        if num_warm <= options.absorb_every:
            # One absorption, f = 0: the kernel in the log-kernel's own buffer, then the warm
            # plan K exp(f) exp(g) in place, which is the block's kernel K1.
            kernel_BST = problem.log_kernel_BST.add_(g_BT[:, None, :]).exp_()
            if num_warm > 0:
                u_B1S, v_B1T, _, _ = _scaling_forward(kernel_BST, a_B1S, b_B1T, num_warm, tiny)
                kernel_BST.mul_(u_B1S.mT).mul_(v_B1T)
        else:
            kernel_BST, *_ = problem.iterate(
                f_BS, g_BT, num_warm, absorb_every=options.absorb_every, tol=None
            )
        ctx.cost_dtype = cost_BST.dtype
        if options.num_grad == 0:
            ctx.save_for_backward(kernel_BST)
            return (kernel_BST * cost_BST).sum((1, 2))
        u_B1S, v_B1T, rows_BNS, columns_BNT = _scaling_forward(
            kernel_BST, a_B1S, b_B1T, options.num_grad, tiny, keep=True
        )
        ctx.epsilon = options.epsilon
        ctx.compiled = compiled_cpu(kernel_BST)
        if ctx.compiled:
            # One pass over K1 and C gives the loss's gradients with respect to u and v, and
            # through them the loss: no plan or P * C buffer (the backward rebuilds P from K1).
            cost_BST = cost_BST.to(kernel_BST.dtype)
            row_terms_B1S, column_terms_B1T = torch.empty_like(u_B1S), torch.empty_like(v_B1T)
            run_compiled(
                "transport_terms",
                (kernel_BST, cost_BST, u_B1S, v_B1T, row_terms_B1S, column_terms_B1T),
                (),
            )
            ctx.save_for_backward(
                kernel_BST, cost_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, u_B1S, v_B1T,
                row_terms_B1S, column_terms_B1T,
            )  # fmt: skip
            return (u_B1S * row_terms_B1S).sum((1, 2))
        plan_BST = torch.mul(kernel_BST, u_B1S.mT).mul_(v_B1T)
        # P * C serves the loss and, saved, the backward (so C itself is not kept).
        weighted_BST = torch.mul(plan_BST, cost_BST)
        ctx.save_for_backward(
            plan_BST, weighted_BST, kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, u_B1S, v_B1T
        )
        return weighted_BST.sum((1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_B):
        saved = ctx.saved_tensors
        plan_BST = saved[0]
        grad_B11 = grad_B.to(plan_BST.dtype)[:, None, None]
        if len(saved) == 1:  # envelope
            return (plan_BST * grad_B11).to(ctx.cost_dtype), None, None, None
        if ctx.compiled:
            return (
                _compiled_transport_grad(saved, grad_B, ctx.epsilon).to(ctx.cost_dtype),
                None,
                None,
                None,
            )
        weighted_BST, kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, u_B1S, v_B1T = saved[1:]
        # dL/du = (K1 * C) v = rowsum(P * C) / u. Where u = 0 (masked rows) the block's backward
        # multiplies this gradient by u / (K v) = 0, so any finite value is exact there.
        grad_u_B1S = _divide_where_positive(weighted_BST.sum(2)[:, None, :], u_B1S)
        grad_v_B1T = _divide_where_positive(weighted_BST.sum(1)[:, None, :], v_B1T)
        left_B2NS, right_B2NT = _scaling_backward(
            kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, grad_u_B1S, grad_v_B1T
        )
        grad_BST = torch.bmm(left_B2NS.mT, right_B2NT).mul_(kernel_BST).add_(weighted_BST)
        grad_BST.mul_(grad_B11 / -ctx.epsilon).addcmul_(plan_BST, grad_B11)
        return grad_BST.to(ctx.cost_dtype), None, None, None


def _compiled_transport_grad(saved, grad_B, epsilon):
    """``_TransportCost``'s backward from the compiled forward's saved tensors: the same
    ``dL/dC``, with ``P = K1 u v^T`` rebuilt inside the pass that forms it."""
    kernel_BST, cost_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, u_B1S, v_B1T = saved[:8]
    row_terms_B1S, column_terms_B1T = saved[8:]
    left_B2NS, right_B2NT = _scaling_backward(
        kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, row_terms_B1S, column_terms_B1T
    )
    # G as one batched GEMM (its inner dimension is 2 * num_grad); the rest in one pass, in place.
    grad_BST = torch.bmm(left_B2NS.mT, right_B2NT)
    grad_B = grad_B.to(kernel_BST.dtype).expand(kernel_BST.shape[0])
    run_compiled(
        "transport_cost_grad",
        (kernel_BST, cost_BST, u_B1S, v_B1T, grad_B, grad_BST),
        (1.0 / epsilon,),
    )
    return grad_BST


def _divide_where_positive(numerator, denominator):
    return torch.where(denominator > 0, numerator / denominator, 0.0)


# Kernel dynamic range (in units of epsilon) up to which plain scaling iterations are safe in fp32
# without intermediate absorptions: see the module docstring.
SAFE_LOG_RANGE = 20.0
_DEFAULT_ABSORB_EVERY = 10


def automatic_absorb_every(
    cost_BST, student_mask_BS, teacher_mask_BT, epsilon, num_iters, tol=None, cost_range=None
) -> int:
    """Absorption interval: ``num_iters`` when the kernel's range allows it, else 10.

    With ``tol`` set, convergence is checked at absorptions, so the interval stays 10.
    """
    if tol is not None:
        return _DEFAULT_ABSORB_EVERY
    if cost_range is None:
        pair_mask_BST = student_mask_BS.bool()[:, :, None] & teacher_mask_BT.bool()[:, None, :]
        if not bool(pair_mask_BST.any()):
            return num_iters
        real = cost_BST.detach()[pair_mask_BST]
        cost_range = float(real.max() - real.min())
    if not math.isfinite(cost_range) or cost_range / epsilon > SAFE_LOG_RANGE:
        return _DEFAULT_ABSORB_EVERY
    return max(num_iters, 1)


def sinkhorn_problem_bytes(
    num_student: int,
    num_teacher: int,
    *,
    num_grad_iters: int = 0,
    absorb_every: int = 10,
    bytes_per_element: int = 4,
) -> int:
    """Estimated solver working memory of one S x T problem, in bytes.

    Without autograd the solver holds the log-kernel and the absorbed kernel (one S*T tensor
    each). With ``num_grad_iters`` differentiated iterations it also keeps one kernel per
    differentiated absorption block, the differentiated log-kernel and the plan.
    """
    saved_blocks = math.ceil(num_grad_iters / absorb_every) + 2 if num_grad_iters > 0 else 0
    return (2 + saved_blocks) * num_student * num_teacher * bytes_per_element


def sinkhorn_chunk_size(
    num_problems: int,
    num_student: int,
    num_teacher: int,
    *,
    memory_budget_bytes: int,
    num_grad_iters: int = 0,
    absorb_every: int = 10,
    bytes_per_element: int = 4,
) -> int:
    """Largest number of problems per chunk whose working memory fits ``memory_budget_bytes``.

    ``num_grad_iters`` counts differentiated iterations: 0 for ``"envelope"``, ``num_iters`` for
    ``"unrolled"``. Returns at least 1 (a single problem over budget still has to be solved) and
    at most ``num_problems``.
    """
    per_problem = sinkhorn_problem_bytes(
        num_student,
        num_teacher,
        num_grad_iters=num_grad_iters,
        absorb_every=absorb_every,
        bytes_per_element=bytes_per_element,
    )
    return max(1, min(num_problems, memory_budget_bytes // max(per_problem, 1)))


def _empty_result(cost_BST, return_diagnostics):
    dtype = torch.promote_types(cost_BST.dtype, torch.float32)
    plan_BST = torch.zeros(cost_BST.shape, dtype=dtype, device=cost_BST.device)
    if not return_diagnostics:
        return plan_BST
    empty_B = plan_BST.new_zeros(0)
    return plan_BST, SinkhornDiagnostics(empty_B, empty_B, 0)


def _check_args(cost_BST, student_mask_BS, teacher_mask_BT, epsilon, grad_mode):
    if cost_BST.dim() != 3:
        raise ValueError(f"cost_BST must have shape (B, S, T), got {tuple(cost_BST.shape)}")
    num_problems, num_student, num_teacher = cost_BST.shape
    if tuple(student_mask_BS.shape) != (num_problems, num_student):
        raise ValueError(f"student_mask_BS must have shape {(num_problems, num_student)}")
    if tuple(teacher_mask_BT.shape) != (num_problems, num_teacher):
        raise ValueError(f"teacher_mask_BT must have shape {(num_problems, num_teacher)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")


def _check_counts(**counts):
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass(frozen=True)
class _Options:
    epsilon: float
    num_iters: int
    num_grad: int  # differentiated iterations at the end of the run
    tol: float | None
    absorb_every: int
    recompute: bool  # checkpoint the differentiated phase (memory-bounded chunks)


def _solve_in_chunks(cost_BST, student_mask_BS, teacher_mask_BT, options, chunk):
    """Solve ``chunk`` problems at a time; concatenated plan and potentials, max iterations."""
    results = [
        _solve_chunk(
            cost_BST[start : start + chunk],
            student_mask_BS[start : start + chunk],
            teacher_mask_BT[start : start + chunk],
            options,
        )
        for start in range(0, cost_BST.shape[0], chunk)
    ]
    if len(results) == 1:
        return results[0]
    plans, f_potentials, g_potentials, iters = zip(*results, strict=True)
    return torch.cat(plans), torch.cat(f_potentials), torch.cat(g_potentials), max(iters)


def _solve_chunk(cost_BST, student_mask_BS, teacher_mask_BT, options):
    """Warm phase without autograd, then the differentiated phase; plan, potentials, iterations."""
    student_mask_BS, teacher_mask_BT = _problem_masks(student_mask_BS, teacher_mask_BT)
    num_warm = options.num_iters - options.num_grad
    differentiated = options.num_grad > 0 and torch.is_grad_enabled() and cost_BST.requires_grad
    recompute = differentiated and options.recompute
    problem = None
    if options.num_grad > 0 and not recompute:
        # Built once with autograd; the warm phase runs on a detached view of the same log-kernel.
        problem = _Problem(cost_BST, student_mask_BS, teacher_mask_BT, options.epsilon)
    with torch.no_grad():
        if problem is None:
            warm = _Problem(cost_BST, student_mask_BS, teacher_mask_BT, options.epsilon)
        else:
            warm = problem.detached()
        f_BS, g_BT = warm.initial_potentials()
        plan_BST, iters = None, 0
        if num_warm > 0:
            plan_BST, f_BS, g_BT, iters = warm.iterate(
                f_BS,
                g_BT,
                num_warm,
                absorb_every=options.absorb_every,
                tol=options.tol,
                want_plan=options.num_grad == 0,
            )
    if options.num_grad == 0:
        return plan_BST, f_BS, g_BT, iters
    # The warm phase's plan buffer is not needed any more: release it first.
    del warm, plan_BST
    if recompute:
        # Chunks exist to bound memory: keep only one chunk's autograd graph alive at a time.
        args = (cost_BST, student_mask_BS, teacher_mask_BT, f_BS, g_BT, options)
        plan_BST, f_BS, g_BT, grad_iters = checkpoint(
            _differentiated_phase, *args, use_reentrant=False
        )
    else:
        plan_BST, f_BS, g_BT, grad_iters = _iterate_differentiated(problem, f_BS, g_BT, options)
    return plan_BST, f_BS, g_BT, iters + grad_iters


def _differentiated_phase(cost_BST, student_mask_BS, teacher_mask_BT, f_BS, g_BT, options):
    problem = _Problem(cost_BST, student_mask_BS, teacher_mask_BT, options.epsilon)
    return _iterate_differentiated(problem, f_BS, g_BT, options)


def _iterate_differentiated(problem, f_BS, g_BT, options):
    # In truncated mode the differentiated tail always runs in full; unrolled honours tol.
    tol = options.tol if options.num_grad == options.num_iters else None
    return problem.iterate(
        f_BS.detach(), g_BT.detach(), options.num_grad, absorb_every=options.absorb_every, tol=tol
    )


@torch.no_grad()
def _diagnose(cost_BST, student_mask_BS, teacher_mask_BT, epsilon, plan_BST, f_BS, g_BT, iters):
    problem = _Problem(cost_BST, student_mask_BS, teacher_mask_BT, epsilon)
    plan_BST = plan_BST.detach()
    error_B = (plan_BST.sum(2) - problem.a_B1S[:, 0]).abs().sum(1)
    error_B = error_B + (plan_BST.sum(1) - problem.b_B1T[:, 0]).abs().sum(1)
    log_plan_BST = problem.log_kernel_BST + f_BS[:, :, None] + g_BT[:, None, :]
    pair_mask_BST = problem.student_mask_BS[:, :, None] & problem.teacher_mask_BT[:, None, :]
    masked_log_plan_BST = torch.where(pair_mask_BST, log_plan_BST, 0.0)
    entropy_B = -(plan_BST * masked_log_plan_BST).sum((1, 2))
    return SinkhornDiagnostics(marginal_error_B=error_B, entropy_B=entropy_B, num_iters=iters)


def _problem_masks(student_mask_BS, teacher_mask_BT):
    """Empty out problems that lack real positions on either side, so their plan is all zero."""
    student_mask_BS, teacher_mask_BT = student_mask_BS.bool(), teacher_mask_BT.bool()
    solvable_B1 = (student_mask_BS.any(1) & teacher_mask_BT.any(1))[:, None]
    return student_mask_BS & solvable_B1, teacher_mask_BT & solvable_B1


class _Problem:
    """Log-kernel and marginals of one chunk; the iteration itself is ``iterate``."""

    def __init__(self, cost_BST, student_mask_BS, teacher_mask_BT, epsilon, *, clean=True):
        dtype = torch.promote_types(cost_BST.dtype, torch.float32)
        self.student_mask_BS, self.teacher_mask_BT = student_mask_BS, teacher_mask_BT
        # One B*S*T buffer: masked entries zeroed bitwise (whatever they held), the division in
        # place, then log(0) stand-ins added per masked row and column (-2e30 where both are).
        # ``clean=False``: the caller guarantees finite masked entries, so no zeroing is needed.
        keeps = (student_mask_BS[:, :, None], teacher_mask_BT[:, None, :])
        if clean:
            log_kernel_BST = fill_masked(cost_BST.to(dtype), keeps, 0.0).div_(-epsilon)
        else:
            log_kernel_BST = torch.div(cost_BST.to(dtype), -epsilon)
        log_kernel_BST.add_(_log_zero_where_masked(keeps[0], dtype))
        self.log_kernel_BST = log_kernel_BST.add_(_log_zero_where_masked(keeps[1], dtype))
        self.a_B1S = _uniform(student_mask_BS, dtype)[:, None, :]
        self.b_B1T = _uniform(teacher_mask_BT, dtype)[:, None, :]
        # Added to every denominator: keeps empty rows/columns at exactly zero scaling and keeps
        # the squared denominator of the division's gradient representable.
        self.tiny = torch.finfo(dtype).tiny ** 0.5
        self.inplace = not (torch.is_grad_enabled() and self.log_kernel_BST.requires_grad)
        self._buffer_BST = None

    def detached(self):
        """The same problem on the detached log-kernel, for iterations without autograd."""
        twin = object.__new__(_Problem)
        twin.__dict__.update(self.__dict__)
        twin.log_kernel_BST = self.log_kernel_BST.detach()
        twin.inplace, twin._buffer_BST = True, None
        return twin

    def initial_potentials(self):
        """f = 0 and a column stabiliser g (column maxima of the kernel become exp(0) = 1)."""
        f_BS = torch.zeros_like(self.a_B1S[:, 0])
        column_max_BT = self.log_kernel_BST.detach().amax(dim=1)
        return f_BS, torch.where(self.teacher_mask_BT, -column_max_BT, 0.0)

    def iterate(self, f_BS, g_BT, num_iters, *, absorb_every, tol, want_plan=True):
        """Run ``num_iters`` iterations from potentials (f, g); return plan, f, g, iterations.

        With ``want_plan=False`` the plan is None (a warm phase whose potentials seed the next).
        """
        done = 0
        while done < num_iters:
            block = min(absorb_every, num_iters - done)
            kernel_BST = self._absorbed_kernel(f_BS, g_BT)
            u_BS, v_BT = (scaling[:, 0] for scaling in self._scaling_iterations(kernel_BST, block))
            done += block
            f_BS = f_BS + torch.log(torch.where(self.student_mask_BS, u_BS, 1.0))
            g_BT = g_BT + torch.log(torch.where(self.teacher_mask_BT, v_BT, 1.0))
            if tol is not None and self._column_error(kernel_BST, u_BS, v_BT).max() <= tol:
                break
        if not want_plan:
            plan_BST = None
        elif self.inplace:
            plan_BST = kernel_BST.mul_(u_BS[:, :, None]).mul_(v_BT[:, None, :])
        else:
            # Same plan as kernel * u * v, but autograd keeps only the output (which the loss
            # keeps anyway) instead of an extra B*S*T product.
            plan_BST = self._exp_shifted(f_BS, g_BT)
        return plan_BST, f_BS, g_BT, done

    def _exp_shifted(self, f_BS, g_BT):
        """``exp(log K + f + g)``, differentiable; one B*S*T buffer, updated in place.

        In-place is safe under autograd here: neither addition saves its output for backward,
        and exp saves only its own result.
        """
        shifted_BST = torch.add(self.log_kernel_BST, f_BS[:, :, None])
        return shifted_BST.add_(g_BT[:, None, :]).exp_()

    def _absorbed_kernel(self, f_BS, g_BT):
        if not self.inplace:
            return self._exp_shifted(f_BS, g_BT)
        # Reuse one buffer across absorptions: no B*S*T allocation per block.
        if self._buffer_BST is None:
            self._buffer_BST = torch.empty_like(self.log_kernel_BST)
        torch.add(self.log_kernel_BST, f_BS[:, :, None], out=self._buffer_BST)
        return self._buffer_BST.add_(g_BT[:, None, :]).exp_()

    def _scaling_iterations(self, kernel_BST, num_iters):
        if not self.inplace:
            return _ScalingBlock.apply(kernel_BST, self.a_B1S, self.b_B1T, num_iters, self.tiny)
        return _scaling_forward(kernel_BST, self.a_B1S, self.b_B1T, num_iters, self.tiny)[:2]

    def _column_error(self, kernel_BST, u_BS, v_BT):
        column_sum_BT = torch.bmm(u_BS[:, None, :], kernel_BST)[:, 0] * v_BT
        return (column_sum_BT - self.b_B1T[:, 0]).abs().sum(1)


def _scaling_forward(kernel_BST, a_B1S, b_B1T, num_iters, tiny, keep=False):
    """Plain scaling updates ``v = b / (K^T u)``, ``u = a / (K v)`` from ``u = 1``.

    Vectors are kept as (B, 1, N) rows so each half-step is ``u @ K`` written into a preallocated
    buffer, ``+= tiny`` and a division: per-op overhead dominates small problems on CPU. Returns
    the last ``u_B1S, v_B1T`` and, with ``keep``, every iteration's denominators ``K v + tiny`` and
    ``K^T u + tiny`` as (B, N, S) and (B, N, T): all the backward pass needs besides K.
    """
    num_problems, num_student, num_teacher = kernel_BST.shape
    slots = num_iters if keep else 1
    rows_BNS = kernel_BST.new_empty((num_problems, slots, num_student))
    columns_BNT = kernel_BST.new_empty((num_problems, slots, num_teacher))
    u_B1S, v_B1T = torch.ones_like(a_B1S), torch.empty_like(b_B1T)

    def loop(xp, kernel, kernel_t, a, b, u, v, rows, columns):
        for k in range(num_iters):
            slot = slice(k, k + 1) if keep else slice(0, 1)
            column, row = columns[:, slot], rows[:, slot]
            xp.matmul(u, kernel, out=column)
            column += tiny
            xp.divide(b, column, out=v)
            xp.matmul(v, kernel_t, out=row)
            row += tiny
            xp.divide(a, row, out=u)

    if compiled_cpu(kernel_BST):
        iters_B = torch.empty(num_problems, dtype=torch.int64)  # not reported further
        run_compiled(
            "scaling_forward",
            (kernel_BST, a_B1S, b_B1T, u_B1S, v_B1T, rows_BNS, columns_BNT, iters_B),
            (num_iters, tiny, keep, STATIONARY_EXIT),
        )
        return (u_B1S, v_B1T, rows_BNS, columns_BNT) if keep else (u_B1S, v_B1T, None, None)
    # (1, S) @ (S, T) and (1, T) @ (T, S): on CPU several times faster than (S, T) @ (T, 1).
    _run_loop(
        loop,
        kernel_BST,
        kernel_BST.transpose(1, 2),
        a_B1S,
        b_B1T,
        u_B1S,
        v_B1T,
        rows_BNS,
        columns_BNT,
    )
    if not keep:
        return u_B1S, v_B1T, None, None
    return u_B1S, v_B1T, rows_BNS, columns_BNT


def _run_loop(loop, *tensors):
    """Run ``loop(xp, *arrays)``: on NumPy views of CPU tensors, on the tensors themselves elsewhere
    (CPU tensors come here only when ``CPU_ARRAY_BACKEND`` is not the compiled default).

    The loops are chains of small matrix-vector products and elementwise ops on (B, 1, N) rows,
    where per-call overhead and the matrix-vector kernel decide the time; ``bench/bench_ot.py``
    times the whole loss with each backend. The views share memory with the tensors. OpenBLAS
    keeps its own thread pool: within the loop it is held to torch's thread count, so a process
    pinned to N threads stays on N. Problems run in cache-sized groups (``CACHE_GROUPS``; the bench times
    the loss with and without them).
    """
    if tensors[0].device.type != "cpu" or CPU_ARRAY_BACKEND == "torch":
        loop(torch, *tensors)
        return
    arrays = [tensor.detach().numpy() for tensor in tensors]
    num_problems = arrays[0].shape[0]
    # Problems do not interact: run them in groups whose kernels stay in the cache through all
    # the iterations, instead of streaming every kernel from memory at each step.
    group = num_problems
    if CACHE_GROUPS:
        group = max(1, cache_bytes() // _CACHE_SHARE // max(arrays[0][:1].nbytes, 1))
    with _blas_controller().limit(limits=torch.get_num_threads(), user_api="blas"):
        for start in range(0, num_problems, group):
            loop(np, *[_problems(array, start, start + group) for array in arrays])


# A group's kernels take at most this fraction of the largest cache (the rest holds vectors and
# whatever else runs). Chosen from ad-hoc timings of the loss at B=8, S=T=1024 on our dev
# machine's 32 MiB L3 (2026-11-24, interleaved): groups of 16 MiB 530 ms, 8 MiB 470 ms, one
# 4 MiB problem 466 ms. The bench times grouped against streamed, not the fraction.
_CACHE_SHARE = 8
# False streams every problem's kernel at each step (the bench's peer for the grouping).
CACHE_GROUPS = True


def _problems(array, start, end):
    """Problems ``start:end`` of an array indexed by problem (a broadcast problem: itself)."""
    return array if array.shape[0] == 1 else array[start:end]


@functools.cache
def cache_bytes() -> int:
    """This CPU's largest cache in bytes (Linux sysfs), else 8 MiB."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        digits = text.rstrip("KM")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=8 << 20)


# "numba" (default), "numpy" or "torch": what runs the scaling loops (and the passes of
# ``cpu_kernels``) for CPU tensors. All give the same results up to float rounding
# (tests/unit/test_sinkhorn.py and test_cpu_kernels.py compare them).
CPU_ARRAY_BACKEND = "numba"


# The compiled loops stop a problem once its iterate is bitwise stationary, with the results of
# the full iteration count (``cpu_kernels.scaling_forward``). False runs every iteration (the
# bench's peer; tests compare the two bit for bit).
STATIONARY_EXIT = True


def compiled_cpu(tensor) -> bool:
    """Whether work on ``tensor`` runs in the compiled CPU kernels (``cpu_kernels``)."""
    return tensor.device.type == "cpu" and CPU_ARRAY_BACKEND == "numba"


def run_compiled(name, tensors, scalars):
    """Run ``cpu_kernels.<name>(*arrays, *scalars, start, stop)`` on NumPy views of CPU
    tensors indexed by problem along their first dimension, with the problems split over torch's
    thread count: the compiled kernels release the GIL, and problems do not interact."""
    from . import cpu_kernels  # numba compiles (or loads its cache) on first use

    arrays = [tensor.detach().numpy() for tensor in tensors]
    if any(array.shape[0] != arrays[0].shape[0] for array in arrays):
        # The compiled loops index without bounds checks: a mismatch would corrupt memory.
        raise ValueError(
            f"compiled kernels need one entry per problem, got {[a.shape for a in arrays]}"
        )
    typed = [
        arrays[0].dtype.type(value) if isinstance(value, float) else value for value in scalars
    ]
    function = getattr(cpu_kernels, name)
    num_problems = arrays[0].shape[0]
    threads = max(1, min(torch.get_num_threads(), num_problems))
    bounds = [num_problems * part // threads for part in range(threads + 1)]
    if threads == 1:
        function(*arrays, *typed, 0, num_problems)
        return
    runs = [
        _thread_pool(threads).submit(function, *arrays, *typed, start, stop)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for run in runs:
        run.result()


@functools.cache
def _thread_pool(threads):
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sinkhorn")


# A forked child (a DataLoader worker) inherits the pools but not their threads: it builds its own.
os.register_at_fork(after_in_child=_thread_pool.cache_clear)


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class _ScalingBlock(torch.autograd.Function):
    """Scaling iterations of one absorption block, differentiated with respect to the kernel
    (backward: ``_scaling_backward``, then one batched GEMM)."""

    @staticmethod
    def forward(ctx, kernel_BST, a_B1S, b_B1T, num_iters, tiny):
        u_B1S, v_B1T, rows_BNS, columns_BNT = _scaling_forward(
            kernel_BST, a_B1S, b_B1T, num_iters, tiny, keep=True
        )
        ctx.save_for_backward(kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT)
        return u_B1S, v_B1T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_u_B1S, grad_v_out_B1T):
        kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT = ctx.saved_tensors
        if grad_u_B1S is None:
            grad_u_B1S = torch.zeros_like(a_B1S)
        if grad_v_out_B1T is None:
            grad_v_out_B1T = torch.zeros_like(b_B1T)
        left_B2NS, right_B2NT = _scaling_backward(
            kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, grad_u_B1S, grad_v_out_B1T
        )
        return torch.bmm(left_B2NS.mT, right_B2NT), None, None, None, None


def _scaling_backward(kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, grad_u_B1S, grad_v_out_B1T):
    """Backward of ``_scaling_forward(keep=True)``: the kernel gradient as ``left^T @ right``.

    ``grad_u_B1S``, ``grad_v_out_B1T``: gradients with respect to the block's last u and v.
    Returns ``left_B2NS, right_B2NT`` with ``dK = sum_k grad_row_k (x) v_k + u_{k-1} (x)
    grad_column_k = left^T @ right``, left = [grad rows; u_{k-1}], right = [v_k; grad columns]:
    the recursion runs on vectors and the caller forms dK with one batched GEMM (plain autograd
    would add two rank-1 outer products into a B*S*T buffer per iteration).
    """
    num_problems, num_iters, num_student = rows_BNS.shape
    num_teacher = columns_BNT.shape[2]
    left_B2NS = rows_BNS.new_empty((num_problems, 2 * num_iters, num_student))
    right_B2NT = columns_BNT.new_empty((num_problems, 2 * num_iters, num_teacher))
    # Iteration k: c = K^T u_{k-1} + tiny, v_k = b / c, r = K v_k + tiny, u_k = a / r
    # (u_{-1} = 1). d u_k / d r = -u_k / r and d v_k / d c = -v_k / c, for all k at once.
    u_BNS = a_B1S / rows_BNS
    v_BNT = torch.div(b_B1T, columns_BNT, out=right_B2NT[:, :num_iters])
    left_B2NS[:, num_iters].fill_(1.0)
    left_B2NS[:, num_iters + 1 :] = u_BNS[:, :-1]
    row_slope_BNS = u_BNS.div_(rows_BNS).neg_()
    column_slope_BNT = -v_BNT / columns_BNT
    # Written in place by the loop: a private, dense copy of the incoming gradient.
    grad_u_B1S = grad_u_B1S.clone(memory_format=torch.contiguous_format)
    grad_v_B1T = torch.empty_like(b_B1T)

    def loop(xp, kernel, kernel_t, row_slope, column_slope, left, right, grad_u, grad_v, grad_out):
        for k in reversed(range(num_iters)):
            step, grad_row = slice(k, k + 1), left[:, k : k + 1]
            grad_column = right[:, num_iters + k : num_iters + k + 1]
            xp.multiply(grad_u, row_slope[:, step], out=grad_row)
            xp.matmul(grad_row, kernel, out=grad_v)
            if k == num_iters - 1:
                grad_v += grad_out
            xp.multiply(grad_v, column_slope[:, step], out=grad_column)
            xp.matmul(grad_column, kernel_t, out=grad_u)

    if compiled_cpu(kernel_BST):
        run_compiled(
            "scaling_backward",
            (
                kernel_BST,
                row_slope_BNS,
                column_slope_BNT,
                left_B2NS,
                right_B2NT,
                grad_u_B1S,
                grad_v_out_B1T.expand_as(grad_v_B1T),
            ),
            (),
        )
        return left_B2NS, right_B2NT
    _run_loop(
        loop,
        kernel_BST,
        kernel_BST.transpose(1, 2),
        row_slope_BNS,
        column_slope_BNT,
        left_B2NS,
        right_B2NT,
        grad_u_B1S,
        grad_v_B1T,
        grad_v_out_B1T.expand_as(grad_v_B1T),
    )
    return left_B2NS, right_B2NT


def _log_zero_where_masked(keep, dtype):
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, _LOG_ZERO)


def _uniform(mask_BN, dtype):
    """Uniform weights over the True entries of each row; an all-False row gets all zeros."""
    count_B1 = mask_BN.sum(1, keepdim=True).clamp_min(1)
    return mask_BN.to(dtype) / count_B1.to(dtype)
