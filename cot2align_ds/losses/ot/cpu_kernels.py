"""Compiled (numba) CPU kernels of the OT loss: Sinkhorn scaling loops and the loss's passes.

Shape legend as in ``sinkhorn``: P problems, S rows (student), T columns (teacher), N iterations.
Vectors are kept as (P, 1, S) / (P, 1, T) rows, as the NumPy/torch loops of ``sinkhorn`` keep them.
``backend.run_compiled`` calls these on NumPy views of CPU tensors (backend ``cpu_arrays``
"numba", the default); GPU tensors never come here.

Why compiled. An iteration ``v = b / (K^T u + tiny)``, ``u = a / (K v + tiny)`` as two BLAS
matrix-vector products reads K twice. Row by row, the row update needs ``K_i . v`` and the next
column update needs ``u_i K_i``: both read the same row, so one pass serves both halves
(``u_i`` is known as soon as its own dot product is). The backward recursion has the same shape.
The passes run problem by problem, so each kernel stays in cache through all its iterations, and
four rows at a time, so ``v`` and the column accumulator are loaded once per four rows. A
problem whose iterate stops changing stops iterating (``scaling_forward``: exact, see there).
The loss's own passes (``transport_terms``, ``transport_cost_grad``, ``attention_cost_grad``)
replace chains of whole-tensor ops, each with its fresh B*S*T buffer, by one pass per row.
``bench/bench_ot.py`` times the loss with these kernels against NumPy and torch loops.

Floating point: sums are reassociated (vectorised), as BLAS reassociates them, so results match
the NumPy/torch paths to float rounding, not bitwise. No NaN/Inf assumptions are made
(``fastmath`` is limited to reassociation, contraction and signed zeros), so a NaN in K still
propagates. Scalars come in the arrays' dtype (a Python float would promote float32 loops to
float64).

Functions take ``start, stop``: the problems to run, so callers can split a batch over threads
(``nogil``). Indexing is unchecked: callers check that every array has one entry per problem.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_FAST = {"reassoc", "contract", "nsz"}
_OPTIONS = {"nogil": True, "cache": True, "fastmath": _FAST, "boundscheck": False}


@njit(**_OPTIONS)
def _accumulate_rows(kernel_ST, coef_S, acc_T):
    """``acc = sum_i coef_i K_i`` (``K^T coef``)."""
    acc_T[:] = 0
    for i in range(kernel_ST.shape[0]):
        c = coef_S[i]
        row = kernel_ST[i]
        for j in range(kernel_ST.shape[1]):
            acc_T[j] += c * row[j]


def _row_pass(divide: bool, keep: bool):
    """A compiled pass over K, specialised on ``divide`` and ``keep`` (a runtime flag would cost
    the loops their vectorisation): for each row i, ``d_i = K_i . x`` and ``coef_i = weight_i /
    (d_i + tiny)`` (``divide``; the denominator stored in ``denominators_S`` when ``keep``) or
    ``coef_i = d_i * weight_i``; when ``accumulate``, also ``acc = K^T coef``. Four rows at a time,
    so x and acc are read once per four rows. Returns whether any ``coef_i`` changed (bitwise;
    NaN always counts as changed)."""

    @njit(inline="always", **_OPTIONS)
    def coefficient(dot, weight, tiny, denominators_S, i):
        if not divide:
            return dot * weight
        denominator = dot + tiny
        if keep:
            denominators_S[i] = denominator
        return weight / denominator

    @njit(**_OPTIONS)
    def row_pass(kernel_ST, x_T, weight_S, tiny, denominators_S, coef_S, acc_T, accumulate):
        num_rows, num_columns = kernel_ST.shape
        zero = tiny - tiny  # tiny's type (tiny * 0 would promote float32 to float64)
        if accumulate:
            acc_T[:] = 0
        changed = False
        i = 0
        while i + 4 <= num_rows:
            row0, row1, row2, row3 = (
                kernel_ST[i],
                kernel_ST[i + 1],
                kernel_ST[i + 2],
                kernel_ST[i + 3],
            )
            d0 = zero
            d1 = zero
            d2 = zero
            d3 = zero
            for j in range(num_columns):
                xj = x_T[j]
                d0 += row0[j] * xj
                d1 += row1[j] * xj
                d2 += row2[j] * xj
                d3 += row3[j] * xj
            c0 = coefficient(d0, weight_S[i], tiny, denominators_S, i)
            c1 = coefficient(d1, weight_S[i + 1], tiny, denominators_S, i + 1)
            c2 = coefficient(d2, weight_S[i + 2], tiny, denominators_S, i + 2)
            c3 = coefficient(d3, weight_S[i + 3], tiny, denominators_S, i + 3)
            changed |= coef_S[i] != c0 or coef_S[i + 1] != c1
            changed |= coef_S[i + 2] != c2 or coef_S[i + 3] != c3
            coef_S[i], coef_S[i + 1], coef_S[i + 2], coef_S[i + 3] = c0, c1, c2, c3
            if accumulate:
                for j in range(num_columns):
                    acc_T[j] += c0 * row0[j] + c1 * row1[j] + c2 * row2[j] + c3 * row3[j]
            i += 4
        for r in range(i, num_rows):
            row = kernel_ST[r]
            d = zero
            for j in range(num_columns):
                d += row[j] * x_T[j]
            c = coefficient(d, weight_S[r], tiny, denominators_S, r)
            changed |= coef_S[r] != c
            coef_S[r] = c
            if accumulate:
                for j in range(num_columns):
                    acc_T[j] += c * row[j]
        return changed

    return row_pass


_scale_rows = _row_pass(divide=True, keep=False)
_scale_rows_keep = _row_pass(divide=True, keep=True)
_weigh_rows = _row_pass(divide=False, keep=False)


@njit(**_OPTIONS)
def scaling_forward(
    kernel_PST,
    a_P1S,
    b_P1T,
    u_P1S,
    v_P1T,
    rows_PNS,
    columns_PNT,
    iters_P,
    num_iters,
    tiny,
    keep,
    stop_when_stationary,
    start,
    stop,
):
    """``num_iters`` iterations ``v = b / (K^T u + tiny)``, ``u = a / (K v + tiny)`` from the
    given u, for problems ``start:stop``; u and v are written in place. With ``keep``, iteration
    k's denominators go to ``rows_PNS[:, k]`` and ``columns_PNT[:, k]`` (else nothing is
    stored).

    ``stop_when_stationary``: once an iteration (after the first) leaves u bitwise unchanged,
    every later one is an exact repeat (the same inputs through the same operations, v included,
    since ``K^T u`` is then summed by the same pass as before), so the problem stops there
    with the u, v (and kept denominators, copied) that all ``num_iters`` iterations would give,
    bit for bit. Far from the fixed point nothing changes; near it (large epsilon, bounded
    costs) the iterates stop moving in fp32 after a few iterations. ``iters_P[p]``: the
    iterations problem p ran."""
    num_columns = kernel_PST.shape[2]
    for p in range(start, stop):
        kernel_ST = kernel_PST[p]
        a_S = a_P1S[p, 0]
        b_T = b_P1T[p, 0]
        u_S, v_T = u_P1S[p, 0], v_P1T[p, 0]
        acc_T = np.empty(num_columns, dtype=kernel_PST.dtype)
        _accumulate_rows(kernel_ST, u_S, acc_T)
        iters_P[p] = num_iters
        for k in range(num_iters):
            for j in range(num_columns):
                v_T[j] = b_T[j] / (acc_T[j] + tiny)
            if keep:
                column_T = columns_PNT[p, k]
                for j in range(num_columns):
                    column_T[j] = acc_T[j] + tiny
            last = k == num_iters - 1
            if keep:
                changed = _scale_rows_keep(
                    kernel_ST, v_T, a_S, tiny, rows_PNS[p, k], u_S, acc_T, not last
                )
            else:
                changed = _scale_rows(
                    kernel_ST, v_T, a_S, tiny, rows_PNS[p, 0], u_S, acc_T, not last
                )
            # Not at k = 0: that pass's K^T u came from _accumulate_rows, whose sums run in
            # another order than the fused passes', so a repeat is exact only from k = 1 on.
            if stop_when_stationary and not changed and not last and k > 0:
                iters_P[p] = k + 1
                if keep:
                    for later in range(k + 1, num_iters):
                        rows_PNS[p, later] = rows_PNS[p, k]
                        columns_PNT[p, later] = columns_PNT[p, k]
                break


@njit(**_OPTIONS)
def scaling_backward(
    kernel_PST,
    row_slope_PNS,
    column_slope_PNT,
    left_P2NS,
    right_P2NT,
    grad_u_P1S,
    grad_out_P1T,
    start,
    stop,
):
    """The recursion of ``scaling.scaling_backward`` for problems ``start:stop``: writes the
    gradients of the rows (``left[:, k]``) and columns (``right[:, N + k]``) of every iteration k.
    ``grad_u_P1S`` / ``grad_out_P1T``: the gradients arriving at the last u and v."""
    num_iters = row_slope_PNS.shape[1]
    num_columns = kernel_PST.shape[2]
    for p in range(start, stop):
        kernel_ST = kernel_PST[p]
        grad_row_S = left_P2NS[p, num_iters - 1]
        slope_S = row_slope_PNS[p, num_iters - 1]
        grad_u_S = grad_u_P1S[p, 0]
        for i in range(grad_row_S.shape[0]):
            grad_row_S[i] = grad_u_S[i] * slope_S[i]
        acc_T = np.empty(num_columns, dtype=kernel_PST.dtype)
        _accumulate_rows(kernel_ST, grad_row_S, acc_T)
        grad_out_T = grad_out_P1T[p, 0]
        for j in range(num_columns):
            acc_T[j] += grad_out_T[j]
        unused = np.zeros(1, dtype=kernel_PST.dtype)  # _weigh_rows stores no denominators
        for k in range(num_iters - 1, -1, -1):
            grad_column_T = right_P2NT[p, num_iters + k]
            column_slope_T = column_slope_PNT[p, k]
            for j in range(num_columns):
                grad_column_T[j] = acc_T[j] * column_slope_T[j]
            if k > 0:
                # grad u_{k-1} = K grad_column_k, and at once grad_row_{k-1} and its K^T product.
                _weigh_rows(
                    kernel_ST,
                    grad_column_T,
                    row_slope_PNS[p, k - 1],
                    unused[0],
                    unused,
                    left_P2NS[p, k - 1],
                    acc_T,
                    True,
                )


@njit(**_OPTIONS)
def transport_terms(
    kernel_PST, cost_PST, u_P1S, v_P1T, row_terms_P1S, column_terms_P1T, start, stop
):
    """``row_terms = (K * C) v`` and ``column_terms = (K * C)^T u`` in one pass over K and C, for
    problems ``start:stop``: the transport cost of the plan ``K u v^T`` is ``u . row_terms`` and
    the two terms are its gradients with respect to u and v."""
    num_rows, num_columns = kernel_PST.shape[1], kernel_PST.shape[2]
    zero = np.zeros(1, dtype=kernel_PST.dtype)[0]
    for p in range(start, stop):
        kernel_ST, cost_ST = kernel_PST[p], cost_PST[p]
        u_S, v_T = u_P1S[p, 0], v_P1T[p, 0]
        row_terms_S, column_terms_T = row_terms_P1S[p, 0], column_terms_P1T[p, 0]
        column_terms_T[:] = 0
        for i in range(num_rows):
            kernel_T, cost_T = kernel_ST[i], cost_ST[i]
            ui = u_S[i]
            total = zero
            for j in range(num_columns):
                weighted = kernel_T[j] * cost_T[j]
                total += weighted * v_T[j]
                column_terms_T[j] += weighted * ui
            row_terms_S[i] = total


@njit(**_OPTIONS)
def transport_cost_grad(
    kernel_PST, cost_PST, u_P1S, v_P1T, grad_P, out_PST, inv_epsilon, start, stop
):
    """In place, for problems ``start:stop``: ``out`` holds the scaling block's kernel gradient G
    on entry and ``g K * (u v^T * (1 - C / epsilon) - G / epsilon)`` on exit, g = ``grad_P[p]``:
    the cost gradient of ``transport_cost`` (see ``transport._TransportCost``)."""
    num_rows, num_columns = kernel_PST.shape[1], kernel_PST.shape[2]
    for p in range(start, stop):
        kernel_ST, cost_ST, out_ST = kernel_PST[p], cost_PST[p], out_PST[p]
        u_S = u_P1S[p, 0]
        grad = grad_P[p]
        scaled_v_T = v_P1T[p, 0] * grad
        scaled_inv_epsilon = grad * inv_epsilon
        for i in range(num_rows):
            ui = u_S[i]
            kernel_T, cost_T, out_T = kernel_ST[i], cost_ST[i], out_ST[i]
            for j in range(num_columns):
                plan_uv = ui * scaled_v_T[j]  # g P / K
                plan_term = plan_uv - plan_uv * cost_T[j] * inv_epsilon
                out_T[j] = kernel_T[j] * (plan_term - out_T[j] * scaled_inv_epsilon)


@njit(**_OPTIONS)
def attention_cost_grad(cost_PST, grad_PST, out_PST, start, stop):
    """Logit gradient of ``C = 1 - softmax(logits)`` (rows over the last axis), for problems
    ``start:stop``: ``out = w * (sum_j g_j w_j - g)`` with ``w = 1 - C`` and g = ``grad_PST``,
    one row at a time. w is formed first: expanding ``w * x`` as ``x - C x`` would cancel digits
    (C is close to 1)."""
    num_rows, num_columns = cost_PST.shape[1], cost_PST.shape[2]
    one = np.ones(1, dtype=cost_PST.dtype)[0]
    for p in range(start, stop):
        for i in range(num_rows):
            cost_T, grad_T, out_T = cost_PST[p, i], grad_PST[p, i], out_PST[p, i]
            total = one - one
            for j in range(num_columns):
                total += grad_T[j] * (one - cost_T[j])
            for j in range(num_columns):
                out_T[j] = (one - cost_T[j]) * (total - grad_T[j])
