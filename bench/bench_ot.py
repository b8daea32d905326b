"""OT loss (batched Sinkhorn) against POT and a reference-style per-sample loop: time and memory.

Every case is the CoT2Align reference setting: attention cost ``1 - softmax(x y^T / sqrt(D))``,
epsilon=10 (kernel ``exp(-0.1 C)``), exactly 100 iterations (no early exit on either side),
uniform marginals, every position real, fp32. Every peer is timed and its peak memory measured
at B=4 with S=T=128, 512 and 1024 (quick: 128, 256); the loop's 10x target is at B=8 (128, 256,
512, 1024; quick: 128).
"ours" is ``ot_loss`` forward + backward (to the hidden states) in the named gradient mode; each
peer computes the same cost with the same ``cost_matrix`` and then:

- ``POT sinkhorn2``: ``ot.sinkhorn2(a, b, C_b, 10, method="sinkhorn_log", numItermax=100,
  stopThr=0)`` per problem, summed, autograd through the iterations;
- ``POT solve envelope``: ``ot.solve(C_b, a, b, reg=10, max_iter=100, tol=0, grad="envelope")``
  per problem, backward of ``value`` (gradient = the plan);
- ``reference loop``: the reference code's structure (docs/method.md section 4, and the public OT
  criteria of the DSKD-derived code it comes from): a Python loop over samples, each pruned to
  its real positions; plain (non-log) Sinkhorn ``v = b / (K^T u + 1e-9)``,
  ``u = a / (K v + 1e-9)`` with ``K = exp(-0.1 C)``; every iteration copies ``u`` and tests
  the largest change on the host (threshold 0 here, so all 100 iterations run); the plan is
  formed as ``diag(u) K diag(v)``; autograd through all of it. fp32: the reference runs bf16 on
  GPU, which a CPU does not run faster.
- ``lean per-sample loop``: the same loop without the per-iteration test and with the plan
  formed by broadcasting: what is left of the gap is batching alone (reported, no target).

How ours runs on CPU: the scaling loops are compiled (numba, the solver backend's ``cpu_arrays``)
and stop a problem once its iterate is bitwise stationary (``stationary_exit``): every
later iteration would repeat it exactly, so plan, loss and gradients are those of all 100
iterations, bit for bit (tests/unit/test_cpu_kernels.py), while the peers run every iteration.
The report rows below time ours with every iteration run.

Report rows, same inputs, B=8, one thread: ours with every iteration run; ours with its scaling
loops run through NumPy views instead, and as torch ops (what GPU tensors run); ours with the
loss ``<P, C>`` taken through ``sinkhorn_log`` and an autograd chain instead of the one-op
``transport_cost`` (``fused_loss``); at 512 and 1024, the NumPy loops with every
problem's kernel streamed at each scaling step instead of problems run in cache-sized groups
(``cache_groups``); the bitwise padding mask (``fill_masked``) against
``torch.where``; the one-op masked attention cost against ``fill_masked`` + ``cost_matrix``.
Each is forward + backward. And the floor against the loop: the cost op alone (forward +
backward) and the 110 scaling iteration pairs alone (every iteration run).

Time: in this process, torch pinned to ONE thread (restored afterwards): on these shared 2-core
machines other jobs run alongside, and with 2 OpenMP threads a descheduled thread stalls every
parallel region, which swung identical POT calls by 10x and more; per-core numbers are stable.
The comparison with the per-sample loop is also run with every core (torch's default thread
count), the configuration a user runs; those rows name their thread count.
Each callable is warmed up once, then ours and the peer alternate ``repeats`` times on the same
inputs and each row reports the medians.

Memory: peak resident memory above a baseline, in one child process (``python -m bench.bench_ot
--memory-child``) started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor over 64 kB is
its own mmap, returned to the OS when freed. Per case the child builds the inputs, runs a tiny
warm-up, returns free heap pages to the OS (``malloc_trim``: glibc would otherwise serve the case
from heap pages an earlier case left resident, which hid whole peaks), resets the kernel's
peak-RSS mark (``echo 5 > /proc/self/clear_refs``), reads VmRSS as the
baseline, runs one forward + backward and reports VmHWM minus the baseline: the cost, the plan,
the solver's working tensors and everything autograd keeps. Where clear_refs is unavailable each
case gets its own child (the peak then also covers the warm-up, a few MB). Linux only.

Run: ``python -m bench.bench_ot [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 256
EPSILON = 10.0
NUM_ITERS = 100
SECTION = "ot"
NUM_THREADS = 1


def _inputs(batch: int, positions: int, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    student_BSD = torch.randn(batch, positions, HIDDEN, generator=generator)
    teacher_BTD = torch.randn(batch, positions, HIDDEN, generator=generator)
    mask_BS = torch.ones(batch, positions, dtype=torch.bool)
    return student_BSD, teacher_BTD, mask_BS


def _ours(
    grad_mode: str,
    num_iters: int = NUM_ITERS,
    absorb_every: int | None = None,
    loops: str = "numba",
    fused: bool = True,
    cache_groups: bool = True,
    stationary_exit: bool = True,
):
    from cot2align_ds.losses.ot.backend import use_backend
    from cot2align_ds.losses.ot.loss import ot_loss

    backend = {
        "cpu_arrays": loops,
        "fused_loss": fused,
        "cache_groups": cache_groups,
        "stationary_exit": stationary_exit,
    }

    def call(student_BSD, teacher_BTD, mask_BS):
        student, teacher = student_BSD.requires_grad_(), teacher_BTD.requires_grad_()
        with use_backend(**backend):
            loss_sum, _ = ot_loss(
                student,
                teacher,
                mask_BS,
                mask_BS,
                epsilon=EPSILON,
                num_iters=num_iters,
                grad_mode=grad_mode,
                absorb_every=absorb_every,
            )
            loss_sum.backward()

    return call


def _pot(kind: str):
    import ot
    import torch

    from cot2align_ds.losses.ot.loss import cost_matrix

    def call(student_BSD, teacher_BTD, mask_BS):
        student, teacher = student_BSD.requires_grad_(), teacher_BTD.requires_grad_()
        cost_BST = cost_matrix(student, teacher, "attention", teacher_mask_BT=mask_BS)
        num = cost_BST.shape[1]
        a = torch.full((num,), 1.0 / num)
        total = 0.0
        for cost_ST in cost_BST.unbind(0):
            if kind == "sinkhorn2":
                total = total + ot.sinkhorn2(
                    a,
                    a,
                    cost_ST,
                    EPSILON,
                    method="sinkhorn_log",
                    numItermax=NUM_ITERS,
                    stopThr=0.0,
                    warn=False,
                )
            else:
                result = ot.solve(
                    cost_ST, a, a, reg=EPSILON, max_iter=NUM_ITERS, tol=0.0, grad="envelope"
                )
                total = total + result.value
        total.backward()

    return call


def _reference_loop(num_iters: int = NUM_ITERS, lean: bool = False):
    """A per-sample loop. ``lean=False`` follows the reference code's structure; ``lean=True``
    keeps only the loop itself (plan by broadcasting, no per-iteration test) as a harder peer."""
    import torch

    from cot2align_ds.losses.ot.loss import cost_matrix

    def call(student_BSD, teacher_BTD, mask_BS):
        student, teacher = student_BSD.requires_grad_(), teacher_BTD.requires_grad_()
        total = 0.0
        for b in range(student.shape[0]):
            # The reference prunes each sample to its real positions, then solves it alone.
            x_SD, y_TD = student[b][mask_BS[b]], teacher[b][mask_BS[b]]
            cost_ST = cost_matrix(x_SD[None], y_TD[None], "attention")[0]
            a_S = torch.full((cost_ST.shape[0],), 1.0 / cost_ST.shape[0])
            b_T = torch.full((cost_ST.shape[1],), 1.0 / cost_ST.shape[1])
            kernel_ST = torch.exp(-cost_ST / EPSILON)
            u_S = torch.ones_like(a_S)
            for _ in range(num_iters):
                u_previous = None if lean else u_S.clone()
                v_T = b_T / (kernel_ST.T @ u_S + 1e-9)
                u_S = a_S / (kernel_ST @ v_T + 1e-9)
                # The reference's exit test: the change of u, read on the host every
                # iteration (a device sync on GPU). Threshold 0: all iterations run.
                if not lean and (u_S - u_previous).abs().max() < 0.0:
                    break
            if lean:
                plan_ST = u_S[:, None] * kernel_ST * v_T[None, :]
            else:  # the reference builds the plan as diag(u) K diag(v): two dense matmuls
                plan_ST = torch.diag(u_S) @ kernel_ST @ torch.diag(v_T)
            total = total + (plan_ST * cost_ST).sum()
        total.backward()

    return call


def _masking(kind: str):
    """Zero the padded rows of (B, S, D) states, forward + backward of a weighted sum."""
    import torch

    from cot2align_ds.losses.masking import fill_masked

    def call(student_BSD, teacher_BTD, mask_BS):
        states = student_BSD.requires_grad_()
        keep_BS1 = mask_BS[:, :, None]
        if kind == "bits":
            masked = fill_masked(states, keep_BS1, 0.0)
        else:
            masked = torch.where(keep_BS1, states, 0.0)
        (masked * teacher_BTD).sum().backward()

    return call


def _attention_cost(fused: bool):
    """The masked attention cost, forward + backward of a weighted sum."""
    from cot2align_ds.losses.masking import fill_masked
    from cot2align_ds.losses.ot.loss import cost_matrix, masked_attention_cost

    def call(student_BSD, teacher_BTD, mask_BS):
        student, teacher = student_BSD.requires_grad_(), teacher_BTD.requires_grad_()
        if fused:
            cost_BST = masked_attention_cost(student, teacher, mask_BS, mask_BS)
        else:
            keep_BS1 = mask_BS[:, :, None]
            cost_BST = cost_matrix(
                fill_masked(student, keep_BS1, 0.0),
                fill_masked(teacher, keep_BS1, 0.0),
                "attention",
                teacher_mask_BT=mask_BS,
            )
        (cost_BST * cost_BST.detach()).sum().backward()

    return call


def _scaling_iterations():
    """The truncated loss's 110 scaling iteration pairs (100 forward, 10 backward) alone, as
    110 forward pairs on a kernel built once per input shape: with the cost op's row, the
    floor that any loss at these settings pays."""
    import torch

    from cot2align_ds.losses.ot.backend import use_backend
    from cot2align_ds.losses.ot.loss import masked_attention_cost
    from cot2align_ds.losses.ot.scaling import scaling_forward

    kernels = {}

    def call(student_BSD, teacher_BTD, mask_BS):
        shape = tuple(student_BSD.shape)
        if shape not in kernels:  # the warm-up round builds it
            with torch.no_grad():
                cost_BST = masked_attention_cost(student_BSD, teacher_BTD, mask_BS, mask_BS)
            marginal_B1N = torch.full((shape[0], 1, shape[1]), 1.0 / shape[1])
            kernels[shape] = torch.exp(cost_BST / -EPSILON), marginal_B1N
        kernel_BST, marginal_B1N = kernels[shape]
        with use_backend(stationary_exit=False):
            scaling_forward(kernel_BST, marginal_B1N, marginal_B1N, NUM_ITERS + 10, 1e-19)

    return call


_PIECES = {
    "fill_masked (bit ops)": _masking("bits"),
    "torch.where": _masking("where"),
    "fused masked attention cost": _attention_cost(fused=True),
    "fill_masked + cost_matrix": _attention_cost(fused=False),
    "110 scaling iteration pairs": _scaling_iterations(),
}


_OURS_OPTIONS = {  # "ours <mode>, <option>, ...": what each option changes in _ours
    "absorb every 10": {"absorb_every": 10},
    "NumPy loops": {"loops": "numpy"},
    "torch loops": {"loops": "torch"},
    "autograd chain": {"fused": False},
    "kernels streamed": {"cache_groups": False},
    "every iteration": {"stationary_exit": False},
}


def _callable(name: str, num_iters: int = NUM_ITERS):
    if name.startswith("ours "):
        mode, *options = name.removeprefix("ours ").split(", ")
        settings = {}
        for option in options:
            settings.update(_OURS_OPTIONS[option])
        return _ours(mode, num_iters, **settings)
    if name in _PIECES:
        return _PIECES[name]
    if name == "reference loop":
        return _reference_loop(num_iters)
    if name == "lean per-sample loop":
        return _reference_loop(num_iters, lean=True)
    return _pot("sinkhorn2" if name == "POT sinkhorn2" else "solve")


# ----------------------------------------------------------------------------------------------
# time


def _time_pair(
    ours_name: str, peer_name: str, batch: int, positions: int, repeats: int, threads: int
):
    """Median wall times (ms) of ours and the peer, alternating on the same inputs."""
    import torch

    torch.set_num_threads(threads)
    inputs = _inputs(batch, positions)
    calls = {"ours": _callable(ours_name), "peer": _callable(peer_name)}
    times = {"ours": [], "peer": []}
    for repeat in range(repeats + 1):
        for side, call in calls.items():
            fresh = [tensor.detach().clone() for tensor in inputs]
            start = time.perf_counter()
            call(*fresh)
            if repeat > 0:  # the first round is the warm-up
                times[side].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times["ours"]), statistics.median(times["peer"])


def _time_rows(quick: bool) -> list[dict]:
    sizes = (128, 256) if quick else (128, 512, 1024)
    loop_sizes = (128,) if quick else (128, 256)
    cases = []
    for positions in sizes:
        repeats = 3 if quick or positions > 512 else 5
        # At 1024 one POT sinkhorn2 call takes ~5 s: only the default mode is compared there.
        modes = ("truncated",) if positions > 512 else ("envelope", "truncated", "unrolled")
        for mode in modes:
            cases.append((f"ours {mode}", "POT sinkhorn2", 4, positions, repeats, 1, "<= 0.5x"))
        cases.append(("ours envelope", "POT solve envelope", 4, positions, repeats, 1, "<= 0.5x"))
        # The reference-style loop on the same B=4 inputs (its target is at B=8, below).
        cases.append(("ours truncated", "reference loop", 4, positions, repeats, 1, "report"))
    # The automatic absorption interval (one absorption per phase when the kernel's range
    # allows) against the fixed interval of 10 it replaced.
    for positions in sizes:
        peer = "ours truncated, absorb every 10"
        cases.append(("ours truncated", peer, 4, positions, 3 if quick else 5, 1, "< 1x"))
    # Against the per-sample loop both sides also run on every core of the machine (torch's
    # default): batching is what lets a solver use them, which a loop of tiny ops cannot.
    all_cores = max(os.cpu_count() or 1, 1)
    for threads in sorted({NUM_THREADS, all_cores}):
        for positions in loop_sizes:
            repeats = 5 if quick else 11  # the target rows: a steadier median
            # The target is on the loss as shipped (truncated, the default, whose gradient is the
            # unrolled one to 4e-7); the unrolled mode, the reference's own, is reported.
            for mode, target in (("truncated", "<= 0.1x (10x faster)"), ("unrolled", "report")):
                cases.append(
                    (f"ours {mode}", "reference loop", 8, positions, repeats, threads, target)
                )
            peer = "lean per-sample loop"
            cases.append(("ours truncated", peer, 8, positions, repeats, threads, "report"))
        # The longer sequences at B=8 too (one loop call takes ~1 s at 512, ~6 s at 1024).
        for positions, repeats in () if quick else ((512, 5), (1024, 3)):
            target = "<= 0.1x (10x faster)"
            cases.append(
                ("ours truncated", "reference loop", 8, positions, repeats, threads, target)
            )
    # The NumPy loops' problems in cache-sized groups vs every kernel streamed at each step.
    for positions in () if quick else (512, 1024):
        peer = "ours truncated, NumPy loops, kernels streamed"
        cases.append(("ours truncated, NumPy loops", peer, 8, positions, 3, NUM_THREADS, "report"))
    # What the loss's pieces gain, in isolation (report only): the scaling loops through NumPy
    # views vs torch ops, the one-op loss vs the autograd chain, the bitwise mask vs torch.where,
    # the one-op attention cost vs its composition; and the floor (cost op, iterations) vs the loop.
    for positions in loop_sizes:
        repeats = 5 if quick else 7
        for peer in (
            "ours truncated, every iteration",
            "ours truncated, NumPy loops",
            "ours truncated, torch loops",
            "ours truncated, autograd chain",
        ):
            cases.append(("ours truncated", peer, 8, positions, repeats, NUM_THREADS, "report"))
        for ours_name, peer in (
            ("fill_masked (bit ops)", "torch.where"),
            ("fused masked attention cost", "fill_masked + cost_matrix"),
            ("fused masked attention cost", "reference loop"),
            ("110 scaling iteration pairs", "reference loop"),
        ):
            cases.append((ours_name, peer, 8, positions, repeats, NUM_THREADS, "report"))
    rows = []
    for ours_name, peer_name, batch, positions, repeats, threads, target in cases:
        ours, peer = _time_pair(ours_name, peer_name, batch, positions, repeats, threads)
        # The iteration pairs run forward only (see _scaling_iterations); the peer is fwd+bwd.
        passes = "ours forward, loop fwd+bwd" if "iteration pairs" in ours_name else "fwd+bwd"
        case = f"{ours_name} vs {peer_name}, B={batch} S=T={positions}, {passes}"
        if threads != NUM_THREADS:
            case += f", {threads} threads"
        rows.append(_row(case, ours, peer, peer_name, "ms", target))
    return rows


# ----------------------------------------------------------------------------------------------
# memory


def _memory_rows(quick: bool) -> list[dict]:
    positions = 256 if quick else 1024
    cases = [
        ("reference loop", 100, "reference loop", 20, positions, "grows with iterations"),
        ("ours unrolled", 100, "ours unrolled", 20, positions, "report"),
        ("ours envelope", 100, "ours envelope", 20, positions, "~1.0x (independent of iters)"),
        ("ours truncated", 100, "ours truncated", 20, positions, "~1.0x (independent of iters)"),
    ]
    # Each peer at every size. POT's autograd keeps every iteration (~3 GB at 1024). POT's
    # envelope solve and the loop hold one problem at a time, ours the whole batch: reported.
    for size in (128, 256) if quick else (128, 512, 1024):
        cases += [
            ("ours truncated", 100, "POT sinkhorn2", 100, size, "< 1x"),
            ("ours envelope", 100, "POT solve envelope", 100, size, "report"),
            ("ours truncated", 100, "reference loop", 100, size, "report"),
        ]
    measured = _measure_memory(
        [(name, iters, positions) for name, iters, _, _, positions, _ in cases]
        + [(name, iters, positions) for _, _, name, iters, positions, _ in cases]
    )
    rows = []
    for index, (ours_name, ours_iters, peer_name, peer_iters, size, target) in enumerate(cases):
        ours, peer = measured[index], measured[len(cases) + index]
        case = f"peak memory {ours_name} @{ours_iters} it vs {peer_name} @{peer_iters} it, "
        case += f"B=4 S=T={size}"
        rows.append(_row(case, ours, peer, f"{peer_name} @{peer_iters} it", "MB", target))
    return rows


def _measure_memory(cases: list[tuple[str, int, int]]) -> list[float]:
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, "-m", "bench.bench_ot", "--memory-child", json.dumps(cases)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result is not None:
        return result
    return [_measure_memory([case])[0] for case in cases] if len(cases) > 1 else [float("nan")]


def _memory_child(cases: list[list]) -> list[float] | None:
    """Peak RSS above baseline (MB) per case; None when the peak mark cannot be reset."""
    import torch

    from bench.memory import PeakRSS

    torch.set_num_threads(NUM_THREADS)
    results = []
    for name, num_iters, positions in cases:
        call = _callable(name, num_iters)
        call(*_inputs(1, 8, seed=1))  # warm-up: kernels, thread pools, POT's backend
        inputs = _inputs(4, positions)
        with PeakRSS() as peak:
            call(*inputs)
        if not peak.resettable and len(cases) > 1:
            return None  # the parent falls back to one child per case
        results.append(peak.mb)
        del inputs
    return results


# ----------------------------------------------------------------------------------------------


def _row(case: str, ours: float, peer: float, peer_name: str, unit: str, target: str) -> dict:
    return {
        "section": SECTION,
        "case": case,
        "ours": round(ours, 1),
        "peer": round(peer, 1),
        "peer_name": peer_name,
        "unit": unit,
        "target": target,
    }


def run(quick: bool = False) -> list[dict]:
    """Bench rows: time of ours vs POT / the reference-style loop, and peak memory."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    try:
        with warnings.catch_warnings():
            # POT warns that 100 iterations did not reach its tolerance: intended here.
            warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
            return _time_rows(quick) + _memory_rows(quick)
    finally:
        torch.set_num_threads(previous_threads)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", metavar="CASES_JSON")
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(_memory_child(json.loads(args.memory_child))))
        return
    for row in run(quick=args.quick):
        ratio = row["ours"] / row["peer"] if row["peer"] else float("nan")
        print(
            f"{row['case']:<78} ours {row['ours']:>8.1f} {row['unit']:<2}  "
            f"peer {row['peer']:>8.1f} {row['unit']:<2}  ratio {ratio:5.2f}  [{row['target']}]"
        )


if __name__ == "__main__":
    _main()
