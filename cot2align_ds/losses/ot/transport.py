"""The transport loss ``sum_ij P_ij C_ij`` of each problem's entropic plan, as one autograd op
with a written-out backward where the solve allows it (``sinkhorn.py`` for the solver)."""

from __future__ import annotations

import torch

from cot2align_ds.losses.ot.backend import compiled_cpu, current_backend, run_compiled
from cot2align_ds.losses.ot.scaling import scaling_backward, scaling_forward
from cot2align_ds.losses.ot.sinkhorn import (
    Problem,
    check_args,
    column_error,
    extend_warm,
    plan_solve,
    problem_masks,
    sinkhorn_log,
    warm_start,
)


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
    max_iters: int | None = None,
    marginal_tol: float | None = None,
) -> torch.Tensor:
    """Transport cost ``sum_ij P_ij C_ij`` of each problem's entropic plan, (B,) fp32 (fp64 stays).

    Arguments as in ``sinkhorn_log`` (no ``tol``: a training loss runs its fixed iteration
    count). Same value and gradient as ``(sinkhorn_log(...) * C).sum((1, 2))`` up to float
    rounding, but when the differentiated iterations form one absorption block (the
    ``"truncated"`` and ``"unrolled"`` defaults) or the mode is ``"envelope"``, and the batch is
    solved in one chunk, it runs as one autograd op whose backward is written out (``_TransportCost``)
    instead of an autograd chain through kernel, plan and product: four fresh B*S*T buffers
    instead of about a dozen, two with the compiled CPU loops (kernel and gradient; the plan is
    never formed). ``bench/bench_ot.py`` times the loss either way.

    Unlike ``sinkhorn_log``, C must be finite at masked entries (they get no mass, but
    ``0 * NaN`` would reach the loss): the costs of ``losses.ot.loss`` are, because padded states
    are zeroed before the cost is formed.
    """
    num_problems = cost_BST.shape[0]
    if num_problems > 0 and current_backend().fused_loss:
        check_args(cost_BST, student_mask_BS, teacher_mask_BT, epsilon, grad_mode)
        options, chunk = plan_solve(
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
            max_iters=max_iters,
            marginal_tol=marginal_tol,
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
        max_iters=max_iters,
        marginal_tol=marginal_tol,
    )
    return (plan_BST * cost_BST).sum((1, 2))


class _TransportCost(torch.autograd.Function):
    """``transport_cost`` with one differentiated absorption block (or none: envelope).

    Forward, per problem: warm iterations without autograd end at potentials f, g; the block
    starts from ``K1 = exp(log K + f + g)``, runs its scaling iterations to (u, v), and the plan
    is ``P = K1 u v^T``; the loss is ``L = <P, C>``.

    Backward, with G the kernel gradient of the scaling block fed with ``dL/du = (K1 * C) v``
    and ``dL/dv = (K1 * C)^T u`` (``scaling_backward``)::

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
        student_mask_BS, teacher_mask_BT = problem_masks(student_mask_BS, teacher_mask_BT)
        problem = Problem(cost_BST, student_mask_BS, teacher_mask_BT, options.epsilon, clean=False)
        a_B1S, b_B1T, tiny = problem.a_B1S, problem.b_B1T, problem.tiny
        num_warm = options.num_iters - options.num_grad
        f_BS, g_BT, laddered = warm_start(
            cost_BST, student_mask_BS, teacher_mask_BT, options, clean=False
        )
        if f_BS is None:
            f_BS, g_BT = problem.initial_potentials()
        num_warm -= laddered
        if not laddered and num_warm <= options.absorb_every:
            # One absorption, f = 0: the kernel in the log-kernel's own buffer, then the warm
            # plan K exp(f) exp(g) in place, which is the block's kernel K1.
            kernel_BST = problem.log_kernel_BST.add_(g_BT[:, None, :]).exp_()
            u_B1S = v_B1T = None
            if num_warm > 0:
                u_B1S, v_B1T, _, _ = scaling_forward(kernel_BST, a_B1S, b_B1T, num_warm, tiny)
                kernel_BST.mul_(u_B1S.mT).mul_(v_B1T)
            if options.max_iters > options.num_iters:
                kernel_BST = _extended(kernel_BST, cost_BST, problem, options, u_B1S, g_BT, v_B1T)
        else:
            kernel_BST, f_BS, g_BT, _ = problem.iterate(
                f_BS, g_BT, num_warm, absorb_every=options.absorb_every, tol=None
            )
            f_BS, g_BT, extra = extend_warm(problem, f_BS, g_BT, options, kernel_BST)
            if extra:
                kernel_BST = problem.plan_at(f_BS, g_BT)
        ctx.cost_dtype = cost_BST.dtype
        if options.num_grad == 0:
            ctx.save_for_backward(kernel_BST)
            return (kernel_BST * cost_BST).sum((1, 2))
        u_B1S, v_B1T, rows_BNS, columns_BNT = scaling_forward(
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
        left_B2NS, right_B2NT = scaling_backward(
            kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, grad_u_B1S, grad_v_B1T
        )
        grad_BST = torch.bmm(left_B2NS.mT, right_B2NT).mul_(kernel_BST).add_(weighted_BST)
        grad_BST.mul_(grad_B11 / -ctx.epsilon).addcmul_(plan_BST, grad_B11)
        return grad_BST.to(ctx.cost_dtype), None, None, None


def _extended(plan_BST, cost_BST, problem, options, u_B1S, g_BT, v_B1T):
    """The warm plan after the adaptive budget (``extend_warm``), for the single-absorption
    path, whose log-kernel buffer became the plan: when the plan is off its marginals the
    log-kernel is rebuilt (one more B*S*T pass) and iterated on from the plan's potentials."""
    if column_error(plan_BST, problem.b_B1T).max() <= options.marginal_tol:
        return plan_BST
    rebuilt = Problem(
        cost_BST, problem.student_mask_BS, problem.teacher_mask_BT, options.epsilon, clean=False
    )
    f_BS = torch.zeros(problem.student_mask_BS.shape, dtype=g_BT.dtype, device=g_BT.device)
    if u_B1S is not None:  # None: no warm iteration ran, the potentials are (0, g)
        f_BS = torch.log(torch.where(problem.student_mask_BS, u_B1S[:, 0], 1.0))
        g_BT = g_BT + torch.log(torch.where(problem.teacher_mask_BT, v_B1T[:, 0], 1.0))
    f_BS, g_BT, _ = extend_warm(rebuilt, f_BS, g_BT, options, plan_BST)
    return rebuilt.plan_at(f_BS, g_BT)


def _compiled_transport_grad(saved, grad_B, epsilon):
    """``_TransportCost``'s backward from the compiled forward's saved tensors: the same
    ``dL/dC``, with ``P = K1 u v^T`` rebuilt inside the pass that forms it."""
    kernel_BST, cost_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, u_B1S, v_B1T = saved[:8]
    row_terms_B1S, column_terms_B1T = saved[8:]
    left_B2NS, right_B2NT = scaling_backward(
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
