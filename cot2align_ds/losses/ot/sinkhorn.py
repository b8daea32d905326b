"""Batched entropic optimal transport (Sinkhorn) over padded problems, stabilised in the log domain.

Shape legend: B problems (batch), S student positions (rows of the plan), T teacher positions
(columns of the plan). ``*_mask_BS`` / ``*_mask_BT`` are boolean, True where a position is real.

Problem solved for each b (positions restricted to the unmasked ones)::

    P_b = argmin_P <P, C_b> - epsilon * H(P)   s.t.  P 1 = a_b,  P^T 1 = b_b,  P >= 0

with uniform marginals ``a_b`` over the real student positions and ``b_b`` over the real teacher
positions. The Gibbs kernel is ``exp(-C / epsilon)``: the reference code's ``exp(-0.1 * C)`` is
``epsilon=10``. One iteration is a column update followed by a row update, as in POT's
``sinkhorn_log``; after ``num_iters`` iterations the row marginals are exact and the column
marginals carry the remaining error, as long as no row's mass underflows. At an epsilon small
against the cost's range (range / epsilon above ``SAFE_LOG_RANGE``, e.g. 0.01 on the [0, 1]
attention cost) Sinkhorn from zero potentials spends its iterations with underflowing entries
and damped rows, so the warm phase first climbs down an epsilon ladder (``epsilon_ladder``:
solve where nothing underflows, then at geometrically smaller epsilons, each rung starting from
the last one's potentials). Within the same iteration count this brings the plans to their
marginals at epsilon 0.01 and makes a single teacher position exact at 1e-3
(tests/unit/test_sinkhorn.py bounds both against POT's converged value and the closed form).
Further down a fixed count stops short (at 1e-3, 100 iterations leave an L1 error of a few
percent), so the solver has an adaptive budget (``max_iters`` with ``marginal_tol``): after the
iterations without autograd it checks the column marginals and keeps iterating, still without
autograd, until they are within tolerance or the budget is spent; the differentiated iterations
follow. Sinkhorn at range / epsilon = 1000 needs on the order of 1000 iterations (tested against
POT in float64). The diagnostics (``return_diagnostics``) measure what is left, and training
warns once when the logged plan's error exceeds ``cot2align.max_marginal_error``.

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
unchanged stops, with exactly the results of the full count); GPU tensors run them as torch ops
(``backend.py``; ``scaling.py`` holds the iterations and their backward).

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

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from cot2align_ds.losses.masking import fill_masked
from cot2align_ds.losses.ot.scaling import ScalingBlock, scaling_forward

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
    max_iters: int | None = None,
    marginal_tol: float | None = None,
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
        max_iters, marginal_tol: the adaptive budget. When both are set and, after the
            iterations without autograd, some problem's column-marginal L1 error still exceeds
            ``marginal_tol``, the solver keeps iterating without autograd (checking at each
            absorption) until it does not or ``max_iters`` iterations ran in all; the
            differentiated iterations follow. A plan already within tolerance runs exactly
            ``num_iters`` iterations, bit for bit as without the budget (unless an epsilon ladder
            runs: the budget pays for a finer one). ``"unrolled"`` differentiates every
            iteration and ignores it.
        return_diagnostics: also return a ``SinkhornDiagnostics``.

    Returns:
        plan_BST (fp32 or fp64), zero at masked entries; plus diagnostics when asked.
    """
    check_args(cost_BST, student_mask_BS, teacher_mask_BT, epsilon, grad_mode)
    _check_counts(num_iters=num_iters, num_grad_iters=num_grad_iters)
    if absorb_every is not None:
        _check_counts(absorb_every=absorb_every)
    num_problems = cost_BST.shape[0]
    if num_problems == 0:
        return _empty_result(cost_BST, return_diagnostics)
    options, chunk = plan_solve(
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
        max_iters=max_iters,
        marginal_tol=marginal_tol,
    )
    plan_BST, f_BS, g_BT, iters = _solve_in_chunks(
        cost_BST, student_mask_BS, teacher_mask_BT, options, chunk
    )
    if not return_diagnostics:
        return plan_BST
    masks = problem_masks(student_mask_BS, teacher_mask_BT)
    return plan_BST, _diagnose(cost_BST, *masks, epsilon, plan_BST, f_BS, g_BT, iters)


def plan_solve(
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
    max_iters=None,
    marginal_tol=None,
) -> tuple[_Options, int]:
    """Solver options (absorption interval, differentiated iterations) and problems per chunk."""
    _check_counts(num_iters=num_iters, num_grad_iters=num_grad_iters)
    if absorb_every is not None:
        _check_counts(absorb_every=absorb_every)
    if (max_iters is None) != (marginal_tol is None):
        raise ValueError("max_iters and marginal_tol go together (the adaptive budget)")
    if max_iters is not None and max_iters < num_iters:
        raise ValueError(f"max_iters ({max_iters}) must be at least num_iters ({num_iters})")
    if marginal_tol is not None and not marginal_tol > 0:
        raise ValueError(f"marginal_tol must be positive, got {marginal_tol}")
    num_problems, num_student, num_teacher = cost_BST.shape
    if absorb_every is None or cost_range is None:
        cost_range = kernel_cost_range(cost_BST, student_mask_BS, teacher_mask_BT, cost_range)
    if absorb_every is None:
        absorb_every = automatic_absorb_every(
            cost_BST, student_mask_BS, teacher_mask_BT, epsilon, num_iters, tol, cost_range
        )
    num_grad = {"unrolled": num_iters, "envelope": 0}.get(grad_mode, min(num_grad_iters, num_iters))
    # Every unrolled iteration is differentiated: no iterations without autograd to add.
    total = max_iters if max_iters is not None and grad_mode != "unrolled" else num_iters
    # The adaptive budget may pay for a finer ladder than the fixed count (at most half of the
    # warm iterations go to rungs either way).
    ladder = epsilon_ladder(cost_range, epsilon, total - num_grad)
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
    options = _Options(
        epsilon,
        num_iters,
        num_grad,
        tol,
        absorb_every,
        chunk < num_problems,
        ladder,
        total,
        marginal_tol,
    )
    return options, chunk


# Kernel dynamic range (in units of epsilon) up to which plain scaling iterations are safe in fp32
# without intermediate absorptions: see the module docstring.
SAFE_LOG_RANGE = 20.0

_DEFAULT_ABSORB_EVERY = 10


RUNG_ITERS = 10  # iterations per rung of the epsilon ladder


def kernel_cost_range(cost_BST, student_mask_BS, teacher_mask_BT, cost_range=None) -> float | None:
    """``max C - min C`` over the real entries: ``cost_range`` when known, else measured (one
    device synchronisation); None when no entry is real."""
    if cost_range is not None:
        return cost_range
    pair_mask_BST = student_mask_BS.bool()[:, :, None] & teacher_mask_BT.bool()[:, None, :]
    if not bool(pair_mask_BST.any()):
        return None
    real = cost_BST.detach()[pair_mask_BST]
    return float(real.max() - real.min())


def epsilon_ladder(cost_range: float | None, epsilon: float, num_warm: int) -> tuple[float, ...]:
    """The larger epsilons the warm phase runs first (epsilon scaling), largest first; empty
    when the kernel's range is safe at ``epsilon`` itself.

    At an epsilon small against the cost's range, Sinkhorn started from zero potentials needs
    many absorptions before the kernel stops underflowing, and a fixed iteration count stops far
    from the marginals. Solving first at ``cost_range / SAFE_LOG_RANGE`` (where nothing
    underflows), then down a geometric ladder, hands each stage potentials already close to its
    optimum. ``RUNG_ITERS`` iterations per rung (whatever the absorption interval, so the
    iterates do not depend on it), at most half of the warm iterations, so at least half run at
    the target epsilon.
    """
    if cost_range is None or not math.isfinite(cost_range) or cost_range <= 0:
        return ()
    start = cost_range / SAFE_LOG_RANGE
    rungs = min(math.ceil(math.log2(start / epsilon)), (num_warm // 2) // RUNG_ITERS)
    if start <= epsilon or rungs < 1:
        return ()
    ratio = (epsilon / start) ** (1.0 / rungs)
    return tuple(start * ratio**rung for rung in range(rungs))


def warm_start(cost_BST, student_mask_BS, teacher_mask_BT, options, *, clean=True):
    """Potentials (in units of ``options.epsilon``) after the epsilon ladder, and the iterations
    it ran; zero potentials and 0 without a ladder. Masks must come from ``problem_masks``."""
    f_BS = g_BT = None
    iters, previous = 0, None
    with torch.no_grad():
        for rung in options.ladder:
            stage = Problem(cost_BST, student_mask_BS, teacher_mask_BT, rung, clean=clean)
            if f_BS is None:
                f_BS, g_BT = stage.initial_potentials()
            else:  # potentials are in units of epsilon: the same potential at a new epsilon
                f_BS, g_BT = f_BS * (previous / rung), g_BT * (previous / rung)
            _, f_BS, g_BT, done = stage.iterate(
                f_BS, g_BT, RUNG_ITERS, absorb_every=options.absorb_every, tol=None,
                want_plan=False,
            )  # fmt: skip
            iters, previous = iters + done, rung
    if f_BS is None:
        return None, None, 0
    scale = previous / options.epsilon
    return f_BS * scale, g_BT * scale, iters


def extend_warm(problem, f_BS, g_BT, options, plan_BST=None):
    """The adaptive budget: potentials after further iterations without autograd while some
    problem's column-marginal error exceeds ``options.marginal_tol``, and how many ran (0 when
    the potentials were already within tolerance). ``plan_BST``: the plan at (f, g) if the
    caller has it (saves one pass over the kernel). One host synchronisation per check."""
    budget = options.max_iters - options.num_iters
    if budget <= 0:
        return f_BS, g_BT, 0
    if plan_BST is None:
        plan_BST = problem.plan_at(f_BS, g_BT)
    if column_error(plan_BST, problem.b_B1T).max() <= options.marginal_tol:
        return f_BS, g_BT, 0
    _, f_BS, g_BT, done = problem.iterate(
        f_BS, g_BT, budget, absorb_every=options.absorb_every, tol=options.marginal_tol,
        want_plan=False,
    )  # fmt: skip
    return f_BS, g_BT, done


def column_error(plan_BST: torch.Tensor, b_B1T: torch.Tensor) -> torch.Tensor:
    """L1 distance of each plan's column sums from the teacher marginal, (B,)."""
    return (plan_BST.sum(1) - b_B1T[:, 0]).abs().sum(1)


def automatic_absorb_every(
    cost_BST, student_mask_BS, teacher_mask_BT, epsilon, num_iters, tol=None, cost_range=None
) -> int:
    """Absorption interval: ``num_iters`` when the kernel's range allows it, else 10.

    With ``tol`` set, convergence is checked at absorptions, so the interval stays 10.
    """
    if tol is not None:
        return _DEFAULT_ABSORB_EVERY
    cost_range = kernel_cost_range(cost_BST, student_mask_BS, teacher_mask_BT, cost_range)
    if cost_range is None:
        return max(num_iters, 1)
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


def check_args(cost_BST, student_mask_BS, teacher_mask_BT, epsilon, grad_mode):
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
    ladder: tuple[float, ...] = ()  # epsilon scaling: the warm phase's larger epsilons first
    max_iters: int = 0  # adaptive budget: iterations in all while the error exceeds marginal_tol
    marginal_tol: float | None = None


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
    student_mask_BS, teacher_mask_BT = problem_masks(student_mask_BS, teacher_mask_BT)
    num_warm = options.num_iters - options.num_grad
    differentiated = options.num_grad > 0 and torch.is_grad_enabled() and cost_BST.requires_grad
    recompute = differentiated and options.recompute
    problem = None
    if options.num_grad > 0 and not recompute:
        # Built once with autograd; the warm phase runs on a detached view of the same log-kernel.
        problem = Problem(cost_BST, student_mask_BS, teacher_mask_BT, options.epsilon)
    with torch.no_grad():
        if problem is None:
            warm = Problem(cost_BST, student_mask_BS, teacher_mask_BT, options.epsilon)
        else:
            warm = problem.detached()
        f_BS, g_BT, iters = warm_start(cost_BST, student_mask_BS, teacher_mask_BT, options)
        if f_BS is None:
            f_BS, g_BT = warm.initial_potentials()
        num_warm -= iters
        plan_BST = None
        if num_warm > 0:
            plan_BST, f_BS, g_BT, done = warm.iterate(
                f_BS,
                g_BT,
                num_warm,
                absorb_every=options.absorb_every,
                tol=options.tol,
                want_plan=options.num_grad == 0,
            )
            iters += done
        f_BS, g_BT, extra = extend_warm(warm, f_BS, g_BT, options, plan_BST)
        if extra:
            iters += extra
            plan_BST = warm.plan_at(f_BS, g_BT) if options.num_grad == 0 else None
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
    problem = Problem(cost_BST, student_mask_BS, teacher_mask_BT, options.epsilon)
    return _iterate_differentiated(problem, f_BS, g_BT, options)


def _iterate_differentiated(problem, f_BS, g_BT, options):
    # In truncated mode the differentiated tail always runs in full; unrolled honours tol.
    tol = options.tol if options.num_grad == options.num_iters else None
    return problem.iterate(
        f_BS.detach(), g_BT.detach(), options.num_grad, absorb_every=options.absorb_every, tol=tol
    )


@torch.no_grad()
def _diagnose(cost_BST, student_mask_BS, teacher_mask_BT, epsilon, plan_BST, f_BS, g_BT, iters):
    problem = Problem(cost_BST, student_mask_BS, teacher_mask_BT, epsilon)
    plan_BST = plan_BST.detach()
    error_B = (plan_BST.sum(2) - problem.a_B1S[:, 0]).abs().sum(1)
    error_B = error_B + (plan_BST.sum(1) - problem.b_B1T[:, 0]).abs().sum(1)
    log_plan_BST = problem.log_kernel_BST + f_BS[:, :, None] + g_BT[:, None, :]
    pair_mask_BST = problem.student_mask_BS[:, :, None] & problem.teacher_mask_BT[:, None, :]
    masked_log_plan_BST = torch.where(pair_mask_BST, log_plan_BST, 0.0)
    entropy_B = -(plan_BST * masked_log_plan_BST).sum((1, 2))
    return SinkhornDiagnostics(marginal_error_B=error_B, entropy_B=entropy_B, num_iters=iters)


def problem_masks(student_mask_BS, teacher_mask_BT):
    """Empty out problems that lack real positions on either side, so their plan is all zero."""
    student_mask_BS, teacher_mask_BT = student_mask_BS.bool(), teacher_mask_BT.bool()
    solvable_B1 = (student_mask_BS.any(1) & teacher_mask_BT.any(1))[:, None]
    return student_mask_BS & solvable_B1, teacher_mask_BT & solvable_B1


class Problem:
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
        twin = object.__new__(Problem)
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
        if num_iters <= 0:  # e.g. an epsilon ladder that used up the warm iterations
            return (self.plan_at(f_BS, g_BT) if want_plan else None), f_BS, g_BT, 0
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

    def plan_at(self, f_BS, g_BT):
        """The plan ``exp(log K + f + g)`` at potentials (f, g), in the reusable buffer when
        iterating without autograd."""
        return self._absorbed_kernel(f_BS, g_BT)

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
            return ScalingBlock.apply(kernel_BST, self.a_B1S, self.b_B1T, num_iters, self.tiny)
        return scaling_forward(kernel_BST, self.a_B1S, self.b_B1T, num_iters, self.tiny)[:2]

    def _column_error(self, kernel_BST, u_BS, v_BT):
        column_sum_BT = torch.bmm(u_BS[:, None, :], kernel_BST)[:, 0] * v_BT
        return (column_sum_BT - self.b_B1T[:, 0]).abs().sum(1)


def _log_zero_where_masked(keep, dtype):
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, _LOG_ZERO)


def _uniform(mask_BN, dtype):
    """Uniform weights over the True entries of each row; an all-False row gets all zeros."""
    count_B1 = mask_BN.sum(1, keepdim=True).clamp_min(1)
    return mask_BN.to(dtype) / count_B1.to(dtype)
