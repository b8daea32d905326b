"""The compiled (numba) CPU kernels against the NumPy loops and torch ops they replace."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cot2align_ds.losses.ot import scaling
from cot2align_ds.losses.ot.backend import use_backend

F64 = torch.float64


def _kernel(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=dtype).mul_(0.9).add_(0.1)


def _marginals(num_problems, size, dtype):
    return torch.full((num_problems, 1, size), 1.0 / max(size, 1), dtype=dtype)


def _under(backend, function, *args, **kwargs):
    with use_backend(cpu_arrays=backend):
        return function(*args, **kwargs)


# S, T not multiples of the kernels' four-row blocks; one row, one column; a wide problem.
SHAPES = [(3, 7, 9), (2, 13, 5), (2, 1, 3), (1, 4, 1), (2, 6, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("keep", [False, True])
def test_forward_matches_the_numpy_loops(shape, dtype, keep):
    kernel_BST = _kernel(shape, dtype)
    a_B1S = _marginals(shape[0], shape[1], dtype)
    b_B1T = _marginals(shape[0], shape[2], dtype)
    args = (kernel_BST, a_B1S, b_B1T, 12, 1e-19)
    compiled = _under("numba", scaling.scaling_forward, *args, keep=keep)
    numpy = _under("numpy", scaling.scaling_forward, *args, keep=keep)
    tolerance = {"rtol": 2e-6, "atol": 0} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 0}
    outputs = 4 if keep else 2
    for ours, theirs in zip(compiled[:outputs], numpy[:outputs], strict=True):
        assert_close(ours, theirs, **tolerance)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_backward_matches_the_numpy_loops(solver_backend, shape, dtype):
    num_problems, num_student, num_teacher = shape
    kernel_BST = _kernel(shape, dtype, seed=1)
    a_B1S = _marginals(num_problems, num_student, dtype)
    b_B1T = _marginals(num_problems, num_teacher, dtype)
    solver_backend(cpu_arrays="numpy")
    _, _, rows_BNS, columns_BNT = scaling.scaling_forward(
        kernel_BST, a_B1S, b_B1T, 6, 1e-19, keep=True
    )
    generator = torch.Generator().manual_seed(2)
    grad_u_B1S = torch.randn(num_problems, 1, num_student, generator=generator, dtype=dtype)
    grad_v_B1T = torch.randn(num_problems, 1, num_teacher, generator=generator, dtype=dtype)
    args = (kernel_BST, a_B1S, b_B1T, rows_BNS, columns_BNT, grad_u_B1S, grad_v_B1T)
    compiled = _under("numba", scaling.scaling_backward, *args)
    numpy = _under("numpy", scaling.scaling_backward, *args)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    assert_close(compiled[0], numpy[0], **tolerance)
    assert_close(compiled[1], numpy[1], **tolerance)


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 5, 0)])
def test_empty_sides_give_what_the_numpy_loops_give(shape):
    kernel_BST = torch.ones(shape)
    a_B1S, b_B1T = _marginals(2, shape[1], torch.float32), _marginals(2, shape[2], torch.float32)
    compiled = _under("numba", scaling.scaling_forward, kernel_BST, a_B1S, b_B1T, 3, 1e-19)
    numpy = _under("numpy", scaling.scaling_forward, kernel_BST, a_B1S, b_B1T, 3, 1e-19)
    assert torch.equal(compiled[0], numpy[0]) and torch.equal(compiled[1], numpy[1])


def test_nan_in_the_kernel_propagates():
    # fastmath is limited to reassociation: a NaN must not be optimised away.
    kernel_BST = _kernel((2, 5, 6), torch.float32)
    kernel_BST[1, 2, 3] = float("nan")
    a_B1S, b_B1T = _marginals(2, 5, torch.float32), _marginals(2, 6, torch.float32)
    u_B1S, v_B1T, _, _ = _under(
        "numba", scaling.scaling_forward, kernel_BST, a_B1S, b_B1T, 4, 1e-19
    )
    assert torch.isfinite(u_B1S[0]).all() and torch.isfinite(v_B1T[0]).all()
    assert torch.isnan(u_B1S[1]).all() and torch.isnan(v_B1T[1]).all()


def test_a_marginal_for_fewer_problems_is_refused():
    # The compiled loops index without bounds checks: shapes are checked before they run.
    kernel_BST = _kernel((3, 4, 5), torch.float32)
    with pytest.raises(ValueError, match="one entry per problem"):
        _under(
            "numba",
            scaling.scaling_forward,
            kernel_BST,
            _marginals(1, 4, torch.float32),
            _marginals(3, 5, torch.float32),
            2,
            1e-19,
        )


def test_problems_split_over_threads_give_the_same_bits(solver_backend):
    solver_backend(cpu_arrays="numba")
    kernel_BST = _kernel((5, 11, 8), torch.float32, seed=3)
    a_B1S, b_B1T = _marginals(5, 11, torch.float32), _marginals(5, 8, torch.float32)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(scaling.scaling_forward(kernel_BST, a_B1S, b_B1T, 9, 1e-19, keep=True))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for ours, theirs in zip(results[0], other, strict=True):
            assert torch.equal(ours, theirs)


def _run_forward(kernel_BST, num_iters, keep, stationary_exit):
    """cpu_kernels.scaling_forward on fresh state; returns (u, v, rows, columns, iterations)."""
    import numpy as np

    from cot2align_ds.losses.ot import cpu_kernels

    kernel = kernel_BST.numpy()
    num_problems, num_student, num_teacher = kernel.shape
    a = np.full((num_problems, 1, num_student), 1.0 / num_student, dtype=kernel.dtype)
    b = np.full((num_problems, 1, num_teacher), 1.0 / num_teacher, dtype=kernel.dtype)
    u, v = np.ones_like(a), np.empty_like(b)
    slots = num_iters if keep else 1
    rows = np.zeros((num_problems, slots, num_student), dtype=kernel.dtype)
    columns = np.zeros((num_problems, slots, num_teacher), dtype=kernel.dtype)
    iters = np.zeros(num_problems, dtype=np.int64)
    tiny = kernel.dtype.type(1e-19)
    cpu_kernels.scaling_forward(
        kernel, a, b, u, v, rows, columns, iters, num_iters, tiny, keep, stationary_exit, 0,
        num_problems,
    )  # fmt: skip
    return u, v, rows, columns, iters


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_stationary_exit_stops_early_with_the_same_bits(keep, dtype):
    import numpy as np

    # The reference setting: kernel exp(-C / 10) of a cost in [0, 1] contracts fast, so the
    # iterates stop moving long before 100 iterations.
    generator = torch.Generator().manual_seed(5)
    cost_BST = torch.rand((3, 13, 10), generator=generator, dtype=dtype)
    kernel_BST = torch.exp(cost_BST / -10.0)
    *stopped, stopped_iters = _run_forward(kernel_BST, 100, keep, stationary_exit=True)
    *full, full_iters = _run_forward(kernel_BST, 100, keep, stationary_exit=False)
    assert (full_iters == 100).all()
    assert (stopped_iters < 100).all() and (stopped_iters >= 2).all()
    for ours, theirs in zip(stopped, full, strict=True):
        assert np.array_equal(ours, theirs)


def test_stationary_exit_never_fires_on_nan():
    kernel_BST = _kernel((2, 5, 6), torch.float32)
    kernel_BST[0, 1, 2] = float("nan")
    *_, iters = _run_forward(kernel_BST, 40, keep=False, stationary_exit=True)
    assert iters[0] == 40 and iters[1] < 40


@pytest.mark.parametrize("grad_mode", ["truncated", "unrolled", "envelope"])
def test_stationary_exit_leaves_the_ot_loss_bit_for_bit(solver_backend, grad_mode):
    from cot2align_ds.losses.ot.loss import ot_loss

    generator = torch.Generator().manual_seed(6)
    student_BSD = torch.randn(3, 11, 8, generator=generator)
    teacher_BTD = torch.randn(3, 9, 8, generator=generator)
    student_mask_BS = torch.arange(11)[None, :] < torch.tensor([[11], [6], [3]])
    teacher_mask_BT = torch.arange(9)[None, :] < torch.tensor([[9], [9], [4]])
    solver_backend(cpu_arrays="numba")
    results = []
    for stationary_exit in (True, False):
        solver_backend(stationary_exit=stationary_exit)
        student, teacher = (
            student_BSD.clone().requires_grad_(),
            teacher_BTD.clone().requires_grad_(),
        )
        loss_sum, _ = ot_loss(
            student, teacher, student_mask_BS, teacher_mask_BT, grad_mode=grad_mode
        )
        loss_sum.backward()
        results.append((loss_sum.detach(), student.grad, teacher.grad))
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_attention_cost_backward_matches_the_torch_ops(solver_backend, dtype):
    from cot2align_ds.losses.ot.loss import masked_attention_cost

    generator = torch.Generator().manual_seed(7)
    student_BSD = torch.randn(2, 7, 6, generator=generator, dtype=dtype)
    teacher_BTD = torch.randn(2, 5, 6, generator=generator, dtype=dtype)
    student_mask_BS = torch.arange(7)[None, :] < torch.tensor([[7], [4]])
    teacher_mask_BT = torch.arange(5)[None, :] < torch.tensor([[5], [2]])
    upstream_BST = torch.randn(2, 7, 5, generator=generator, dtype=dtype)
    grads = {}
    for backend in ("numba", "torch"):
        solver_backend(cpu_arrays=backend)
        student, teacher = (
            student_BSD.clone().requires_grad_(),
            teacher_BTD.clone().requires_grad_(),
        )
        cost_BST = masked_attention_cost(student, teacher, student_mask_BS, teacher_mask_BT)
        (cost_BST * upstream_BST).sum().backward()
        grads[backend] = student.grad, teacher.grad
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    for ours, theirs in zip(grads["numba"], grads["torch"], strict=True):
        assert_close(ours, theirs, **tolerance)
    assert grads["numba"][0][1, 4:].abs().max() == 0  # padded positions: exactly zero


def test_a_forked_child_runs_the_threaded_kernels(solver_backend):
    # The parent's thread pool has no threads in a fork: the child must build its own, not hang.
    import multiprocessing

    solver_backend(cpu_arrays="numba")
    kernel_BST = _kernel((4, 6, 5), torch.float32, seed=8)
    a_B1S, b_B1T = _marginals(4, 6, torch.float32), _marginals(4, 5, torch.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = scaling.scaling_forward(kernel_BST, a_B1S, b_B1T, 5, 1e-19)[0]
        with multiprocessing.get_context("fork").Pool(1) as pool:
            result = pool.apply_async(_forward_in_child, (kernel_BST, a_B1S, b_B1T))
            got = result.get(timeout=60)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, expected)


def _forward_in_child(kernel_BST, a_B1S, b_B1T):
    torch.set_num_threads(2)
    return scaling.scaling_forward(kernel_BST, a_B1S, b_B1T, 5, 1e-19)[0]
