"""The scaling iterations of one absorption block and their written-out backward.

Shape legend as in ``sinkhorn.py``; N iterations. ``scaling_forward`` runs ``v = b / (K^T u)``,
``u = a / (K v)``; ``scaling_backward`` differentiates a block with respect to its kernel K, with
the recursion on vectors and one batched GEMM for the kernel gradient.
"""

from __future__ import annotations

import torch

from cot2align_ds.losses.ot.backend import compiled_cpu, current_backend, run_compiled, run_loop


def scaling_forward(kernel_BST, a_B1S, b_B1T, num_iters, tiny, keep=False):
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
            (num_iters, tiny, keep, current_backend().stationary_exit),
        )
        return (u_B1S, v_B1T, rows_BNS, columns_BNT) if keep else (u_B1S, v_B1T, None, None)
    # (1, S) @ (S, T) and (1, T) @ (T, S): on CPU several times faster than (S, T) @ (T, 1).
    run_loop(
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


class ScalingBlock(torch.autograd.Function):
    """Scaling iterations of one absorption block, differentiated with respect to the kernel
    (backward: ``scaling_backward``, then one batched GEMM)."""

    @staticmethod
    def forward(ctx, kernel_BST, a_B1S, b_B1T, num_iters, tiny):
        u_B1S, v_B1T, rows_BNS, columns_BNT = scaling_forward(
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
        left_B2NS, right_B2NT = scaling_backward(
            kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, grad_u_B1S, grad_v_out_B1T
        )
        return torch.bmm(left_B2NS.mT, right_B2NT), None, None, None, None


def scaling_backward(kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, grad_u_B1S, grad_v_out_B1T):
    """Backward of ``scaling_forward(keep=True)``: the kernel gradient as ``left^T @ right``.

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
    run_loop(
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
