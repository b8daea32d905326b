"""Tests for the batched Sinkhorn solver, against POT and against itself (batching, padding, chunks).

Shape legend: B problems, S student positions (rows), T teacher positions (columns).
"""

from __future__ import annotations

import ot
import pytest
import torch
from torch.testing import assert_close

from cot2align_ds.losses.ot import backend as ot_backend
from cot2align_ds.losses.ot.backend import use_backend
from cot2align_ds.losses.ot.sinkhorn import (
    automatic_absorb_every,
    sinkhorn_chunk_size,
    sinkhorn_log,
    sinkhorn_problem_bytes,
)
from cot2align_ds.losses.ot.transport import transport_cost

F64 = torch.float64


def _ragged_problem(seed=0, dtype=F64, num_problems=4, num_student=7, num_teacher=9):
    """Random costs in [0, 1] with a different number of real positions per problem."""
    generator = torch.Generator().manual_seed(seed)
    cost_BST = torch.rand(num_problems, num_student, num_teacher, generator=generator, dtype=dtype)
    student_lengths = [num_student, 5, 1, 6][:num_problems]
    teacher_lengths = [num_teacher, 9, 4, 2][:num_problems]
    student_mask_BS = torch.arange(num_student)[None, :] < torch.tensor(student_lengths)[:, None]
    teacher_mask_BT = torch.arange(num_teacher)[None, :] < torch.tensor(teacher_lengths)[:, None]
    return cost_BST, student_mask_BS, teacher_mask_BT


def _pot_plan(cost_ST, epsilon, num_iters, stop_threshold=0.0):
    num_student, num_teacher = cost_ST.shape
    a = torch.full((num_student,), 1.0 / num_student, dtype=cost_ST.dtype)
    b = torch.full((num_teacher,), 1.0 / num_teacher, dtype=cost_ST.dtype)
    return ot.bregman.sinkhorn_log(
        a, b, cost_ST, epsilon, numItermax=num_iters, stopThr=stop_threshold, warn=False
    )


def _lengths(student_mask_BS, teacher_mask_BT, b):
    return int(student_mask_BS[b].sum()), int(teacher_mask_BT[b].sum())


@pytest.mark.parametrize("epsilon", [0.05, 0.5, 10.0])
@pytest.mark.parametrize("num_iters", [3, 200])
@pytest.mark.parametrize("absorb_every", [1, 10, None])
def test_matches_pot_on_ragged_problems(epsilon, num_iters, absorb_every):
    # Equal at a fixed iteration count, converged or not: same iteration as POT's sinkhorn_log.
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem()
    plan_BST = sinkhorn_log(
        cost_BST,
        student_mask_BS,
        teacher_mask_BT,
        epsilon=epsilon,
        num_iters=num_iters,
        grad_mode="envelope",
        absorb_every=absorb_every,
    )
    for b in range(cost_BST.shape[0]):
        s, t = _lengths(student_mask_BS, teacher_mask_BT, b)
        expected_ST = _pot_plan(cost_BST[b, :s, :t], epsilon, num_iters)
        assert_close(plan_BST[b, :s, :t], expected_ST, rtol=1e-10, atol=1e-13)
        assert plan_BST[b, s:].abs().sum() == 0 and plan_BST[b, :, t:].abs().sum() == 0


def test_fp32_small_epsilon_converges_to_pot():
    # epsilon=0.01 on a [0, 1] cost: kernel entries down to exp(-100), below fp32's range, so
    # this exercises the absorption that keeps the fp32 solver finite and accurate.
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=3)
    plan_BST = sinkhorn_log(
        cost_BST.float(),
        student_mask_BS,
        teacher_mask_BT,
        epsilon=0.01,
        num_iters=2000,
        grad_mode="envelope",
    )
    assert plan_BST.dtype == torch.float32 and torch.isfinite(plan_BST).all()
    for b in range(cost_BST.shape[0]):
        s, t = _lengths(student_mask_BS, teacher_mask_BT, b)
        expected_ST = _pot_plan(cost_BST[b, :s, :t], 0.01, 20000, 1e-14)
        assert_close(plan_BST[b, :s, :t].double(), expected_ST, rtol=0, atol=1e-5)


def test_batched_equals_per_problem():
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=1, dtype=torch.float32)
    options = dict(epsilon=0.3, num_iters=50, grad_mode="envelope")
    plan_BST = sinkhorn_log(cost_BST, student_mask_BS, teacher_mask_BT, **options)
    for b in range(cost_BST.shape[0]):
        s, t = _lengths(student_mask_BS, teacher_mask_BT, b)
        alone_ST = sinkhorn_log(
            cost_BST[b : b + 1, :s, :t],
            student_mask_BS[b : b + 1, :s],
            teacher_mask_BT[b : b + 1, :t],
            **options,
        )[0]
        assert_close(plan_BST[b, :s, :t], alone_ST, rtol=1e-5, atol=1e-8)


def test_padding_adds_nothing_even_when_it_holds_garbage():
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=2)
    padded_BST = torch.full((4, 12, 15), float("nan"), dtype=F64)
    padded_BST[:, :7, :9] = cost_BST
    padded_BST[:, 7:, :9] = float("inf")
    padded_student_BS = torch.nn.functional.pad(student_mask_BS, (0, 5))
    padded_teacher_BT = torch.nn.functional.pad(teacher_mask_BT, (0, 6))
    options = dict(epsilon=0.2, num_iters=30, grad_mode="envelope")
    plan_BST = sinkhorn_log(cost_BST, student_mask_BS, teacher_mask_BT, **options)
    padded_plan_BST = sinkhorn_log(padded_BST, padded_student_BS, padded_teacher_BT, **options)
    assert_close(padded_plan_BST[:, :7, :9], plan_BST, rtol=1e-12, atol=1e-15)
    assert padded_plan_BST[:, 7:].abs().sum() == 0 and padded_plan_BST[:, :, 9:].abs().sum() == 0


def test_bf16_cost_gives_finite_fp32_plan_with_correct_marginals():
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=4, dtype=torch.float32)
    plan_BST, diagnostics = sinkhorn_log(
        cost_BST.bfloat16(),
        student_mask_BS,
        teacher_mask_BT,
        epsilon=0.1,
        num_iters=300,
        return_diagnostics=True,
    )
    assert plan_BST.dtype == torch.float32 and torch.isfinite(plan_BST).all()
    assert diagnostics.marginal_error_B.max() < 1e-4
    assert_close(plan_BST.sum((1, 2)), torch.ones(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("grad_mode", ["unrolled", "envelope", "truncated"])
def test_empty_problems_give_zero_plan_and_finite_gradient(grad_mode):
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=5, dtype=torch.float32)
    student_mask_BS[1] = False  # no student position
    teacher_mask_BT[2] = False  # no teacher position
    cost_BST = cost_BST.requires_grad_()
    plan_BST, diagnostics = sinkhorn_log(
        cost_BST,
        student_mask_BS,
        teacher_mask_BT,
        epsilon=0.5,
        num_iters=20,
        grad_mode=grad_mode,
        return_diagnostics=True,
    )
    (plan_BST * cost_BST).sum().backward()
    assert plan_BST[1:3].abs().sum() == 0 and torch.isfinite(plan_BST).all()
    assert torch.isfinite(cost_BST.grad).all() and cost_BST.grad[1:3].abs().sum() == 0
    assert_close(plan_BST[[0, 3]].sum((1, 2)), torch.ones(2), rtol=0, atol=1e-5)
    assert diagnostics.marginal_error_B[1:3].abs().sum() == 0
    assert diagnostics.entropy_B[1:3].abs().sum() == 0


@pytest.mark.parametrize("absorb_every", [1, 7, 10, None])
def test_unrolled_gradient_matches_pot_autograd(absorb_every):
    # 20 iterations at epsilon=0.5 is far from converged: this checks the custom backward of the
    # scaling blocks step by step, not a fixed-point identity.
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=6)
    weights_BST = torch.rand(cost_BST.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    cost_BST.requires_grad_()
    plan_BST = sinkhorn_log(
        cost_BST,
        student_mask_BS,
        teacher_mask_BT,
        epsilon=0.5,
        num_iters=20,
        grad_mode="unrolled",
        absorb_every=absorb_every,
    )
    (plan_BST * weights_BST).sum().backward()
    for b in range(cost_BST.shape[0]):
        s, t = _lengths(student_mask_BS, teacher_mask_BT, b)
        pot_cost_ST = cost_BST.detach()[b, :s, :t].clone().requires_grad_()
        (_pot_plan(pot_cost_ST, 0.5, 20) * weights_BST[b, :s, :t]).sum().backward()
        assert_close(cost_BST.grad[b, :s, :t], pot_cost_ST.grad, rtol=1e-9, atol=1e-12)
        assert cost_BST.grad[b, s:].abs().sum() == 0 and cost_BST.grad[b, :, t:].abs().sum() == 0


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_envelope_gradient_matches_pot_solve_envelope():
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=8)
    cost_BST.requires_grad_()
    plan_BST = sinkhorn_log(
        cost_BST, student_mask_BS, teacher_mask_BT, epsilon=0.2, num_iters=500, grad_mode="envelope"
    )
    (plan_BST * cost_BST).sum().backward()
    for b in range(cost_BST.shape[0]):
        s, t = _lengths(student_mask_BS, teacher_mask_BT, b)
        pot_cost_ST = cost_BST.detach()[b, :s, :t].clone().requires_grad_()
        a = torch.full((s,), 1.0 / s, dtype=F64)
        b_weights = torch.full((t,), 1.0 / t, dtype=F64)
        result = ot.solve(
            pot_cost_ST, a, b_weights, reg=0.2, max_iter=500, tol=0.0, grad="envelope"
        )
        result.value.backward()
        assert_close(cost_BST.grad[b, :s, :t], pot_cost_ST.grad, rtol=1e-8, atol=1e-12)


def test_envelope_gradient_is_the_regularised_value_gradient_by_finite_differences():
    # Envelope theorem: d/dC [<P*, C> + eps * KL(P* | a b^T)] = P*. Central differences along a
    # random direction, on a converged float64 problem.
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=9)
    direction_BST = torch.randn(
        cost_BST.shape, dtype=F64, generator=torch.Generator().manual_seed(1)
    )
    epsilon, step = 0.3, 1e-5

    def regularised_value(cost):
        plan_BST = sinkhorn_log(
            cost, student_mask_BS, teacher_mask_BT, epsilon=epsilon, num_iters=2000
        )
        a_BS = student_mask_BS.double() / student_mask_BS.sum(1, keepdim=True)
        b_BT = teacher_mask_BT.double() / teacher_mask_BT.sum(1, keepdim=True)
        reference_BST = a_BS[:, :, None] * b_BT[:, None, :]
        real_BST = plan_BST > 0
        log_ratio_BST = torch.where(real_BST, plan_BST.log() - reference_BST.log(), 0.0)
        return (plan_BST * cost).sum() + epsilon * (plan_BST * log_ratio_BST).sum()

    plan_BST = sinkhorn_log(
        cost_BST, student_mask_BS, teacher_mask_BT, epsilon=epsilon, num_iters=2000
    )
    finite_difference = (
        regularised_value(cost_BST + step * direction_BST)
        - regularised_value(cost_BST - step * direction_BST)
    ) / (2 * step)
    assert_close(finite_difference, (plan_BST * direction_BST).sum(), rtol=1e-6, atol=1e-9)


def test_gradient_modes_on_a_cost_matrix():
    # Truncated reproduces unrolled (the fixed point contracts fast at epsilon=10); envelope gives
    # the regularised-objective gradient P*, which differs from the transport-cost gradient.
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=10)
    gradients = {}
    for grad_mode in ("unrolled", "truncated", "envelope"):
        cost = cost_BST.clone().requires_grad_()
        plan_BST = sinkhorn_log(
            cost, student_mask_BS, teacher_mask_BT, epsilon=10.0, num_iters=100, grad_mode=grad_mode
        )
        (plan_BST * cost).sum().backward()
        assert torch.isfinite(cost.grad).all()
        gradients[grad_mode] = cost.grad
    assert_close(gradients["truncated"], gradients["unrolled"], rtol=1e-10, atol=1e-14)
    relative = (gradients["envelope"] - gradients["unrolled"]).norm() / gradients["unrolled"].norm()
    # Measured 0.012 here: at epsilon=10 the plan is nearly a b^T and both gradients are
    # dominated by it; the part that reaches the hidden states differs by 2x (test_ot_loss.py).
    assert 1e-3 < relative < 0.05


def test_truncated_gradient_converges_to_unrolled_with_more_differentiated_iterations():
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=11)
    weights_BST = torch.rand(cost_BST.shape, dtype=F64, generator=torch.Generator().manual_seed(2))

    def gradient(grad_mode, num_grad_iters=10):
        cost = cost_BST.clone().requires_grad_()
        plan_BST = sinkhorn_log(
            cost,
            student_mask_BS,
            teacher_mask_BT,
            epsilon=0.1,
            num_iters=100,
            grad_mode=grad_mode,
            num_grad_iters=num_grad_iters,
        )
        (plan_BST * weights_BST).sum().backward()
        return cost.grad

    unrolled = gradient("unrolled")
    errors = [(gradient("truncated", k) - unrolled).norm().item() for k in (1, 5, 20, 60)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6 * unrolled.norm()


@pytest.mark.parametrize("grad_mode", ["unrolled", "envelope", "truncated"])
def test_chunked_equals_unchunked(grad_mode):
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=12, dtype=torch.float32)
    weights_BST = torch.rand(cost_BST.shape, generator=torch.Generator().manual_seed(3))
    num_grad_iters = {"unrolled": 30, "envelope": 0, "truncated": 10}[grad_mode]
    one_problem = sinkhorn_problem_bytes(7, 9, num_grad_iters=num_grad_iters)
    results = []
    for budget in (None, one_problem, 3 * one_problem):  # chunks of 4, 1 and 3 problems
        cost = cost_BST.clone().requires_grad_()
        plan_BST = sinkhorn_log(
            cost,
            student_mask_BS,
            teacher_mask_BT,
            epsilon=0.3,
            num_iters=30,
            grad_mode=grad_mode,
            memory_budget_bytes=budget,
        )
        (plan_BST * weights_BST * cost).sum().backward()  # envelope: the plan is detached
        results.append((plan_BST.detach(), cost.grad))
    for plan_BST, grad_BST in results[1:]:
        assert_close(plan_BST, results[0][0])
        assert_close(grad_BST, results[0][1])


def test_chunk_size_fits_the_budget():
    kwargs = dict(num_grad_iters=100, absorb_every=10)
    assert sinkhorn_chunk_size(64, 100, 100, memory_budget_bytes=1, **kwargs) == 1
    one = sinkhorn_problem_bytes(100, 100, **kwargs)
    assert one == (2 + 10 + 2) * 100 * 100 * 4
    assert sinkhorn_chunk_size(64, 100, 100, memory_budget_bytes=5 * one, **kwargs) == 5
    assert sinkhorn_chunk_size(64, 100, 100, memory_budget_bytes=10**12, **kwargs) == 64
    envelope = sinkhorn_chunk_size(64, 100, 100, memory_budget_bytes=5 * one)
    assert envelope > 5  # no autograd: less memory per problem, bigger chunks


def test_tolerance_stops_early_and_reports_diagnostics():
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=13)
    plan_BST, diagnostics = sinkhorn_log(
        cost_BST,
        student_mask_BS,
        teacher_mask_BT,
        epsilon=1.0,
        num_iters=1000,
        tol=1e-9,
        grad_mode="envelope",
        return_diagnostics=True,
    )
    assert diagnostics.num_iters < 1000 and diagnostics.num_iters % 10 == 0
    assert diagnostics.marginal_error_B.max() <= 1e-9
    valid_BST = plan_BST > 0
    entropy_B = -(plan_BST * torch.where(valid_BST, plan_BST.log(), 0.0)).sum((1, 2))
    assert_close(diagnostics.entropy_B, entropy_B)
    _, fixed = sinkhorn_log(
        cost_BST,
        student_mask_BS,
        teacher_mask_BT,
        epsilon=1.0,
        num_iters=5,
        return_diagnostics=True,
    )
    assert fixed.num_iters == 5 and fixed.marginal_error_B.max() > 1e-9


def test_uniform_plan_at_large_epsilon_and_marginals():
    # Sanity of the epsilon convention: exp(-C / eps) with a huge eps makes the plan a b^T.
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=14)
    plan_BST = sinkhorn_log(cost_BST, student_mask_BS, teacher_mask_BT, epsilon=1e8, num_iters=5)
    a_BS = student_mask_BS.double() / student_mask_BS.sum(1, keepdim=True)
    b_BT = teacher_mask_BT.double() / teacher_mask_BT.sum(1, keepdim=True)
    assert_close(plan_BST, a_BS[:, :, None] * b_BT[:, None, :], rtol=1e-6, atol=1e-12)


def test_empty_batch_and_invalid_arguments():
    empty = sinkhorn_log(
        torch.zeros(0, 3, 4),
        torch.zeros(0, 3, dtype=torch.bool),
        torch.zeros(0, 4, dtype=torch.bool),
        epsilon=1.0,
        num_iters=3,
    )
    assert empty.shape == (0, 3, 4)
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem()
    bad_calls = [
        dict(epsilon=0.0, num_iters=3),
        dict(epsilon=1.0, num_iters=0),
        dict(epsilon=1.0, num_iters=3, grad_mode="implicit"),
        dict(epsilon=1.0, num_iters=3, absorb_every=0),
        dict(epsilon=1.0, num_iters=3, num_grad_iters=0),
    ]
    for kwargs in bad_calls:
        with pytest.raises(ValueError):
            sinkhorn_log(cost_BST, student_mask_BS, teacher_mask_BT, **kwargs)
    with pytest.raises(ValueError):
        sinkhorn_log(cost_BST, student_mask_BS[:, :3], teacher_mask_BT, epsilon=1.0, num_iters=3)


def test_automatic_absorption_interval_follows_the_kernel_range():
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem()
    masks = (student_mask_BS, teacher_mask_BT)
    # Attention cost at the reference epsilon: one absorption for the whole run.
    assert automatic_absorb_every(cost_BST, *masks, 10.0, 100) == 100
    assert automatic_absorb_every(cost_BST, *masks, 10.0, 100, cost_range=1.0) == 100
    # A known range wider than 20 epsilons, a measured one, or a tolerance: every 10.
    assert automatic_absorb_every(cost_BST, *masks, 0.01, 100, cost_range=1.0) == 10
    assert automatic_absorb_every(cost_BST * 100, *masks, 0.1, 100) == 10
    assert automatic_absorb_every(cost_BST, *masks, 10.0, 100, tol=1e-6) == 10
    # NaN at masked entries does not enter the measured range; NaN at a real one is not "safe".
    pair_mask_BST = student_mask_BS[:, :, None] & teacher_mask_BT[:, None, :]
    padded_BST = cost_BST.masked_fill(~pair_mask_BST, float("nan"))
    assert automatic_absorb_every(padded_BST, *masks, 1.0, 50) == 50
    padded_BST[0, 0, 0] = float("nan")
    assert automatic_absorb_every(padded_BST, *masks, 1.0, 50) == 10


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_automatic_absorption_stays_finite_on_a_wide_kernel(dtype):
    # Range / epsilon = 400: plain scaling would underflow fp32 (exp(-400)); auto must absorb.
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=3)
    cost_BST = (cost_BST * 40.0).to(dtype)
    kwargs = dict(epsilon=0.1, num_iters=60, grad_mode="envelope")
    auto_BST = sinkhorn_log(cost_BST, student_mask_BS, teacher_mask_BT, **kwargs)
    every_BST = sinkhorn_log(cost_BST, student_mask_BS, teacher_mask_BT, absorb_every=1, **kwargs)
    assert torch.isfinite(auto_BST).all()
    # fp32: the two absorption schedules round differently; plans have total mass 1.
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(auto_BST, every_BST, rtol=0, atol=atol)


@pytest.mark.parametrize("grad_mode", ["unrolled", "envelope", "truncated"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_cpu_and_torch_loops_agree(solver_backend, grad_mode, dtype, backend):
    # CPU tensors run the scaling loops compiled (numba, the default) or through NumPy views;
    # every other device through torch. All must produce the same plan and gradient, up to the
    # order of float additions.

    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=11, dtype=dtype)
    weights_BST = torch.rand(
        cost_BST.shape, dtype=dtype, generator=torch.Generator().manual_seed(3)
    )
    results = {}
    for loops in (backend, "torch"):
        solver_backend(cpu_arrays=loops)
        leaf = cost_BST.clone().requires_grad_()
        plan_BST = sinkhorn_log(
            leaf, student_mask_BS, teacher_mask_BT, epsilon=0.5, num_iters=30, grad_mode=grad_mode
        )
        (plan_BST * leaf * weights_BST).sum().backward()  # envelope: the gradient is the plan
        results[loops] = plan_BST.detach(), leaf.grad
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {}
    assert_close(results[backend][0], results["torch"][0], **tolerance)
    assert_close(results[backend][1], results["torch"][1], **tolerance)


def test_numpy_loops_keep_blas_on_torch_thread_count():
    # OpenBLAS has its own pool; inside the loops it must follow torch's thread setting.
    import numpy as np
    from threadpoolctl import threadpool_info

    seen = []

    def loop(xp, kernel):
        blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        seen.append((xp, type(kernel), blas))

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ot_backend.run_loop(loop, torch.zeros(2, 3, 3))
    finally:
        torch.set_num_threads(previous)
    [(xp, array_type, blas)] = seen
    assert xp is np and array_type is np.ndarray and blas and set(blas) == {1}


# -- transport_cost: the loss <P, C> as one autograd op ----------------------------------------


def _transport_under(field, values, cost_BST, masks, **solver):
    """Value and gradient of transport_cost with the solver backend's ``field`` set to each of
    ``values``."""
    results = []
    weights_B = torch.linspace(0.5, 2.0, cost_BST.shape[0], dtype=cost_BST.dtype)
    for value in values:
        leaf = cost_BST.clone().requires_grad_()
        with use_backend(**{field: value}):
            value_B = transport_cost(leaf, *masks, **solver)
        (value_B * weights_B).sum().backward()  # per-problem upstream gradients differ
        results.append((value_B.detach(), leaf.grad))
    return results


def _transport_both_ways(cost_BST, masks, **solver):
    """Value and gradient of transport_cost, fused and through sinkhorn_log + autograd."""
    return _transport_under("fused_loss", (True, False), cost_BST, masks, **solver)


@pytest.mark.parametrize(
    ("grad_mode", "epsilon", "num_iters", "absorb_every"),
    [
        ("truncated", 0.5, 30, None),  # warm block + one differentiated block
        ("truncated", 0.5, 30, 12),  # several warm blocks, then one differentiated block
        ("truncated", 0.5, 30, 4),  # differentiated iterations over several blocks: fallback
        ("unrolled", 0.5, 20, None),  # no warm phase
        ("envelope", 0.5, 30, None),
        ("envelope", 0.5, 30, 7),
        ("truncated", 10.0, 100, None),  # the reference setting
    ],
)
def test_transport_cost_matches_the_autograd_chain(grad_mode, epsilon, num_iters, absorb_every):
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=21)
    solver = {"epsilon": epsilon, "num_iters": num_iters, "grad_mode": grad_mode}
    fused, chain = _transport_both_ways(
        cost_BST,
        (student_mask_BS, teacher_mask_BT),
        absorb_every=absorb_every,
        **solver,
    )
    assert_close(fused[0], chain[0], rtol=1e-12, atol=1e-14)
    assert_close(fused[1], chain[1], rtol=1e-10, atol=1e-13)
    # Masked entries: zero gradient; the problem with one student position still has one.
    assert fused[1][1, 5:].abs().sum() == 0 and fused[1][3, :, 2:].abs().sum() == 0
    assert fused[1][2, 0, :4].abs().sum() > 0


def test_transport_cost_backward_matches_finite_differences():
    # The written-out backward against numerical derivatives of the same function: unrolled
    # mode differentiates exactly what the forward computes (8 iterations, far from converged).
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=22, num_problems=3)
    cost_BST.requires_grad_()

    def loss(cost):
        value_B = transport_cost(
            cost, student_mask_BS, teacher_mask_BT, epsilon=0.3, num_iters=8, grad_mode="unrolled"
        )
        return value_B * torch.tensor([1.0, -0.7, 2.0], dtype=F64)

    assert torch.autograd.gradcheck(loss, (cost_BST,), eps=1e-6, atol=1e-8)


def test_transport_cost_chunks_and_empty_problems():
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=23)
    student_mask_BS = student_mask_BS.clone()
    student_mask_BS[1] = False  # no student position: zero cost, zero gradient
    masks = (student_mask_BS, teacher_mask_BT)
    whole = _transport_both_ways(cost_BST, masks, epsilon=0.5, num_iters=30)[0]
    assert whole[0][1] == 0 and whole[1][1].abs().sum() == 0
    # A budget below the batch solves it in chunks (through sinkhorn_log): same results.
    budget = sinkhorn_problem_bytes(7, 9, num_grad_iters=10, absorb_every=30, bytes_per_element=8)
    chunked = _transport_both_ways(
        cost_BST, masks, epsilon=0.5, num_iters=30, memory_budget_bytes=budget
    )[0]
    assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-14)
    assert_close(chunked[1], whole[1], rtol=1e-10, atol=1e-13)
    assert transport_cost(
        cost_BST[:0], student_mask_BS[:0], teacher_mask_BT[:0], epsilon=1.0, num_iters=5
    ).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_transport_cost_low_precision_input(dtype):
    # bf16 costs are solved in fp32; the value is fp32 and the gradient comes back in bf16.
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(seed=24)
    reference_B = transport_cost(
        cost_BST, student_mask_BS, teacher_mask_BT, epsilon=10.0, num_iters=100
    )
    leaf = cost_BST.to(dtype).requires_grad_()
    value_B = transport_cost(leaf, student_mask_BS, teacher_mask_BT, epsilon=10.0, num_iters=100)
    value_B.sum().backward()
    assert value_B.dtype == torch.float32 and leaf.grad.dtype == dtype
    assert torch.isfinite(leaf.grad.float()).all()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert_close(value_B.double(), reference_B, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("grad_mode", ["truncated", "envelope"])
def test_cache_groups_change_nothing(solver_backend, monkeypatch, grad_mode):
    # One problem per group (a tiny cache) against all problems streamed at each step: the same
    # per-problem products, so the same bits.

    solver_backend(cpu_arrays="numpy")  # the loops that group
    assert ot_backend.cache_bytes() >= 1 << 16  # the real lookup: some plausible size
    monkeypatch.setattr(ot_backend, "cache_bytes", lambda: 1)
    cost_BST, *masks = _ragged_problem(seed=25, dtype=torch.float32)
    grouped, streamed = _transport_under(
        "cache_groups",
        (True, False),
        cost_BST,
        masks,
        epsilon=0.5,
        num_iters=30,
        grad_mode=grad_mode,
    )
    assert torch.equal(grouped[0], streamed[0])
    assert torch.equal(grouped[1], streamed[1])


def test_scaling_loops_run_problems_in_cache_sized_groups(monkeypatch):

    def groups_seen(kernel_bytes_budget, num_problems=5, size=32):
        seen = []
        monkeypatch.setattr(ot_backend, "cache_bytes", lambda: kernel_bytes_budget)
        ot_backend.run_loop(
            lambda xp, kernel, row: seen.append(kernel.shape[0]),
            torch.zeros(num_problems, size, size),
            torch.zeros(num_problems, 1, size),
        )
        return seen

    one_kernel = 32 * 32 * 4  # bytes; a group may take 1/8 of the cache
    assert groups_seen(8 * 2 * one_kernel) == [2, 2, 1]
    assert groups_seen(1) == [1, 1, 1, 1, 1]
    assert groups_seen(1 << 30) == [5]


@pytest.mark.parametrize("grad_mode", ["truncated", "unrolled", "envelope"])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_transport_cost_cpu_and_torch_loops_agree(grad_mode, backend):
    # The torch loops are what GPU tensors run; on CPU they are selected by CPU_ARRAY_BACKEND.
    cost_BST, *masks = _ragged_problem(seed=26, dtype=torch.float32)
    numpy, torch_loops = _transport_under(
        "cpu_arrays",
        (backend, "torch"),
        cost_BST,
        masks,
        epsilon=0.5,
        num_iters=30,
        grad_mode=grad_mode,
    )
    assert_close(numpy[0], torch_loops[0], rtol=1e-5, atol=1e-7)
    assert_close(numpy[1], torch_loops[1], rtol=1e-5, atol=1e-7)


# -- small epsilon: the epsilon ladder -----------------------------------------------------------


def _pot_cost(cost_BST: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Converged entropic transport cost per problem, POT's log-domain solver in float64."""
    _, num_student, num_teacher = cost_BST.shape
    a = torch.full((num_student,), 1.0 / num_student, dtype=F64)
    b = torch.full((num_teacher,), 1.0 / num_teacher, dtype=F64)
    return torch.stack(
        [
            ot.sinkhorn2(
                a, b, cost, epsilon, method="sinkhorn_log", numItermax=20000, stopThr=1e-12
            )
            for cost in cost_BST.to(F64)
        ]
    )


@pytest.mark.parametrize(("scale", "epsilon", "marginal_tol", "cost_rtol"), [
    (1.0, 1e-2, 2e-3, 5e-4),  # the attention cost at epsilon 0.01: range / epsilon = 100
    (300.0, 1.0, 2e-2, 5e-3),  # a cost scaled to hundreds
])  # fmt: skip
def test_small_epsilon_plans_reach_their_marginals_in_the_fixed_budget(
    scale, epsilon, marginal_tol, cost_rtol
):
    cost_BST = torch.rand(4, 12, 9, generator=torch.Generator().manual_seed(0), dtype=F64) * scale
    masks = torch.ones(4, 12, dtype=torch.bool), torch.ones(4, 9, dtype=torch.bool)
    plan_BST, diagnostics = sinkhorn_log(
        cost_BST.float(), *masks, epsilon=epsilon, num_iters=100, grad_mode="envelope",
        return_diagnostics=True,
    )  # fmt: skip
    assert diagnostics.marginal_error_B.max() < marginal_tol
    ours = (plan_BST.double() * cost_BST).sum((1, 2))
    assert_close(ours, _pot_cost(cost_BST, epsilon), rtol=cost_rtol, atol=0)


@pytest.mark.parametrize("grad_mode", ["truncated", "envelope"])
def test_a_single_teacher_position_gets_all_the_mass_at_tiny_epsilon(grad_mode):
    # With T = 1 the only feasible plan is the student marginal itself: the loss is the mean
    # cost, whatever epsilon and whatever the gradient mode.
    cost_BST = torch.rand(2, 10, 1, generator=torch.Generator().manual_seed(1))
    masks = torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool)
    leaf = cost_BST.clone().requires_grad_()
    value_B = transport_cost(leaf, *masks, epsilon=1e-3, num_iters=100, grad_mode=grad_mode)
    assert_close(value_B, cost_BST.mean((1, 2)), rtol=1e-5, atol=1e-6)
    value_B.sum().backward()
    assert torch.isfinite(leaf.grad).all()


# -- small epsilon: the adaptive iteration budget --------------------------------------------------


@pytest.mark.parametrize(("scale", "epsilon"), [
    (1.0, 1e-3),  # the attention cost at epsilon 0.001: range / epsilon = 1000
    (300.0, 0.3),  # a cost scaled to hundreds at epsilon 0.3: range / epsilon = 1000
])  # fmt: skip
@pytest.mark.parametrize("grad_mode", ["truncated", "envelope"])
def test_adaptive_budget_brings_tiny_epsilon_plans_to_their_marginals(scale, epsilon, grad_mode):
    generator = torch.Generator().manual_seed(2)
    cost_BST = torch.rand(4, 16, 11, generator=generator, dtype=F64) * scale
    masks = torch.ones(4, 16, dtype=torch.bool), torch.ones(4, 11, dtype=torch.bool)
    solve = dict(epsilon=epsilon, num_iters=100, grad_mode=grad_mode, return_diagnostics=True)
    _, fixed = sinkhorn_log(cost_BST.float(), *masks, **solve)
    assert fixed.marginal_error_B.max() > 0.01  # the fixed count stops short here
    plan_BST, adaptive = sinkhorn_log(
        cost_BST.float(), *masks, max_iters=3000, marginal_tol=1e-3, **solve
    )
    assert 100 < adaptive.num_iters <= 3000
    assert adaptive.marginal_error_B.max() <= 1e-3
    ours = (plan_BST.double() * cost_BST).sum((1, 2))
    assert_close(ours, _pot_cost(cost_BST, epsilon), rtol=2e-3, atol=0)
    # The fused loss runs the same budget: same values, finite gradient.
    leaf = cost_BST.float().requires_grad_()
    value_B = transport_cost(
        leaf, *masks, epsilon=epsilon, num_iters=100, grad_mode=grad_mode, max_iters=3000,
        marginal_tol=1e-3,
    )  # fmt: skip
    assert_close(value_B.double(), ours, rtol=1e-4, atol=0)
    value_B.sum().backward()
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("grad_mode", ["truncated", "envelope"])
def test_adaptive_budget_changes_nothing_where_the_fixed_count_converged(grad_mode):
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem(dtype=torch.float32)
    masks = student_mask_BS, teacher_mask_BT
    solve = dict(epsilon=10.0, num_iters=100, grad_mode=grad_mode)
    plain = transport_cost(cost_BST, *masks, **solve)
    budgeted = transport_cost(cost_BST, *masks, max_iters=1000, marginal_tol=1e-3, **solve)
    assert torch.equal(plain, budgeted)
    _, diagnostics = sinkhorn_log(
        cost_BST, *masks, max_iters=1000, marginal_tol=1e-3, return_diagnostics=True, **solve
    )
    assert diagnostics.num_iters == 100


def test_adaptive_budget_arguments_are_checked():
    cost_BST, student_mask_BS, teacher_mask_BT = _ragged_problem()
    masks = student_mask_BS, teacher_mask_BT
    for bad in [dict(max_iters=1000), dict(marginal_tol=1e-3), dict(max_iters=50, marginal_tol=1e-3),
                dict(max_iters=500, marginal_tol=0.0)]:  # fmt: skip
        with pytest.raises(ValueError):
            sinkhorn_log(cost_BST, *masks, epsilon=1.0, num_iters=100, **bad)


@pytest.mark.parametrize("num_iters", [2, 30])
def test_adaptive_budget_runs_before_an_all_differentiated_tail(num_iters):
    # Truncated mode with num_iters <= num_grad_iters has no warm iterations of its own: the
    # budget's iterations come before the differentiated ones, in both solver paths.
    cost_BST = torch.rand(3, 10, 7, generator=torch.Generator().manual_seed(4))
    masks = torch.ones(3, 10, dtype=torch.bool), torch.ones(3, 7, dtype=torch.bool)
    solve = dict(epsilon=1e-3, num_iters=num_iters, num_grad_iters=30, max_iters=3000)
    _, diagnostics = sinkhorn_log(
        cost_BST, *masks, marginal_tol=1e-3, return_diagnostics=True, **solve
    )
    assert diagnostics.marginal_error_B.max() <= 1e-3
    leaf = cost_BST.clone().requires_grad_()
    value_B = transport_cost(leaf, *masks, marginal_tol=1e-3, **solve)
    assert_close(value_B.double(), _pot_cost(cost_BST.double(), 1e-3), rtol=2e-3, atol=0)
    value_B.sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_without_numba_the_numpy_loops_run_with_the_same_results(tmp_path):
    """numba is an optional extra: where it cannot be imported the solver falls back to its
    NumPy loops by itself (a fresh process in which ``import numba`` fails)."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from cot2align_ds.losses.ot.backend import current_backend\n"
        "from cot2align_ds.losses.ot.transport import transport_cost\n"
        "assert current_backend().cpu_arrays == 'numpy', current_backend()\n"
        "cost = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(0))\n"
        "masks = torch.ones(3, 7, dtype=torch.bool), torch.ones(3, 5, dtype=torch.bool)\n"
        "value = transport_cost(cost, *masks, epsilon=0.5, num_iters=30)\n"
        "print(' '.join(repr(float(v)) for v in value))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    numpy_values = [float(v) for v in result.stdout.split()]
    cost = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(0))
    masks = torch.ones(3, 7, dtype=torch.bool), torch.ones(3, 5, dtype=torch.bool)
    compiled = transport_cost(cost, *masks, epsilon=0.5, num_iters=30)
    assert_close(torch.tensor(numpy_values), compiled, rtol=1e-5, atol=1e-7)
