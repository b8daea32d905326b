"""Where one distillation step spends its time (tiny models, world size 1, ZeRO-3 engines).

A ``Trainer`` is built in-process from ``bench_step``'s workspace and run config, and the bench
installs timing wrappers on its instance (no package code changes): ``trainer._forward_teacher``,
``trainer._forward_student``, ``objective._kd_sums`` (the vocabulary-space KD loss),
``objective._ot_sums`` (all CoT2Align OT problems) and ``student_engine.backward`` /
``student_engine.step``. The bench drives the steps itself the way ``Trainer.train`` does
(fetch the window, then ``train_step``), so "data wait" is the time blocked on the DataLoader.
"other" is the rest of the step: the CE loss, normalisers, host-to-device moves, bookkeeping.
Phases never nest (the objective calls neither forward), so shares sum to exactly 1.

Each row's peer is the whole step (share = ours / peer). For the CoT2Align cases a target row
checks the issue's "OT loss under 10% of the step", and a step-time row compares against the
base method on the same batches (``bench_step.CASES``; target <= 2.2x); the base on standard
records alone is reported per step and per student token. The trainers of all cases are alive
together and their steps alternate, so a noisy neighbour hits every case alike.

Two optimisations of the CoT2Align step run against the same step without them: one teacher
forward for the main and standard views (``cot2align.fuse_teacher_views``) and no LM head on
the standard views, whose logits no loss reads. Both save what these tiny CPU models barely
have: the first halves the offloaded teacher's weight transfers (about 15 GB over
PCIe per call for a 7.6B teacher in bf16; here the "offload" is a CPU-to-CPU copy), the second a (rows, positions, vocab)
matmul (vocabularies of 400-600 here, 150k in Qwen). So their rows are reported, not targets:
they measure that neither costs anything on CPU (measured 0.97-1.05x, noise).

Timing uses ``time.perf_counter()``: correct on CPU, where every op is synchronous. On a GPU the
wrappers would need a device synchronize at each boundary (not done here: this suite is CPU).
Torch is pinned to one thread while timing (restored afterwards) for the reason ``bench_ot``
gives: on a shared 2-core machine a descheduled OpenMP thread stalls every parallel region.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.bench_step import CASES as STEP_CASES
from bench.bench_step import _config, _workspace

SECTION = "breakdown"
PHASES = ("data_wait", "teacher_fwd", "student_fwd", "kd_loss", "ot_loss", "backward_step", "other")
# The step suite's cases (see bench_step.CASES for the two peers of CoT2Align), plus each
# CoT2Align case without one of its view optimisations (OPTIMISATIONS below).
CASES = {
    **{
        name: STEP_CASES[name]
        for name in ("uld", "uld on CoT data", "uld+cot2align")
        + ("dskd_cma", "dskd_cma on CoT data", "dskd_cma+cot2align")
    },
    "uld+cot2align, teacher views apart": STEP_CASES["uld+cot2align"],
    "dskd_cma+cot2align, teacher views apart": STEP_CASES["dskd_cma+cot2align"],
    "uld+cot2align, full LM head on standard views": STEP_CASES["uld+cot2align"],
    "dskd_cma+cot2align, full LM head on standard views": STEP_CASES["dskd_cma+cot2align"],
}
BASE = {"uld+cot2align": "uld on CoT data", "dskd_cma+cot2align": "dskd_cma on CoT data"}
STANDARD_DATA_BASE = {"uld+cot2align": "uld", "dskd_cma+cot2align": "dskd_cma"}
# Each optimisation of the CoT2Align step against the same step without it.
OPTIMISATIONS = {
    "one teacher forward for both views": "teacher views apart",
    "LM head skipped on standard views": "full LM head on standard views",
}
OT_SHARE_TARGET = 0.10


class PhaseTimer:
    """Accumulates wall time per phase for the step in progress."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started

        return timed


def _ignore_only_hidden(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The peer of the LM-head skip: every view's forward computes all its logits."""

    @functools.wraps(forward)
    def full_head(*inputs: Any, only_hidden: bool = False) -> Any:
        return forward(*inputs)

    return full_head


class StepCase:
    """One live Trainer with timing wrappers; ``step()`` runs one optimizer step."""

    def __init__(self, trainer: Any, name: str) -> None:
        self.trainer = trainer
        self.timer = PhaseTimer()
        wrap = self.timer.wrap
        # Instance attributes shadow the methods: _forward_all and Objective.__call__ look them
        # up through self, so the wrappers see every call.
        trainer._forward_student = wrap("student_fwd", trainer._forward_student)
        if trainer.teacher_engine is not None:
            trainer._forward_teacher = wrap("teacher_fwd", trainer._forward_teacher)
        cached = trainer.models.teacher_cache
        if cached is not None:  # the teacher's outputs from its cache: the head over them
            cached.outputs = wrap("teacher_fwd", cached.outputs)
        objective = trainer.objective
        objective._kd_sums = wrap("kd_loss", objective._kd_sums)
        objective._ot_sums = wrap("ot_loss", objective._ot_sums)
        if name.endswith("full LM head on standard views"):
            trainer._forward_student = _ignore_only_hidden(trainer._forward_student)
            if trainer.teacher_engine is not None:
                trainer._forward_teacher = _ignore_only_hidden(trainer._forward_teacher)
        engine = trainer.student_engine
        engine.backward = wrap("backward_step", engine.backward)
        engine.step = wrap("backward_step", engine.step)
        self.batches = trainer._batches()
        trainer.student_engine.train()

    def step(self) -> dict[str, float]:
        """One step as ``Trainer.train`` runs it; returns seconds per phase and in total."""
        self.timer.reset()
        accumulation = self.trainer.config.train.grad_accum
        started = time.perf_counter()
        window = [next(self.batches) for _ in range(accumulation)]
        fetched = time.perf_counter()
        self.trainer.train_step(window)
        total = time.perf_counter() - started
        seconds = dict(self.timer.seconds, data_wait=fetched - started)
        seconds["other"] = total - sum(v for k, v in seconds.items() if k != "other")
        # Same count as the loop's tokens_per_s (student main view), so the per-token ratio
        # below matches bench_step's: CoT2Align's main view holds the longer CoT records.
        tokens = sum(int(batch.student.attention_mask.sum()) for batch in window)
        return {**seconds, "total": total, "tokens": float(tokens)}


def _trainer(ws: dict, root: Path, name: str, tiny: bool) -> Any:
    from cot2align_ds.config import validate_config
    from cot2align_ds.engine import deepspeed_engines as dse
    from cot2align_ds.train.loop import Trainer

    method, cot2align, cot_data = CASES[name]
    out = root / f"run-{name.replace(', ', '-').replace(' ', '_')}"
    config = _config(ws, out, method, cot2align, steps=1000, workers=1, cot_data=cot_data)
    config["cot2align"]["fuse_teacher_views"] = not name.endswith("teacher views apart")
    if tiny:
        config["train"]["micro_batch_size"] = 4
        config["student"]["architecture"] = {**config["student"]["architecture"], "n_embd": 32}
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(validate_config(config), out, dse.init_distributed(300), None)


def measure(
    cases: list[str], steps: int, warmup: int, tiny: bool = False
) -> dict[str, list[dict[str, float]]]:
    """Per case, the per-phase seconds of each timed step (steps of all cases interleaved)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws = _workspace(root, 64 if tiny else 400)
        live = {name: StepCase(_trainer(ws, root, name, tiny), name) for name in cases}
        try:
            return interleave(live, steps, warmup)
        finally:
            close(live)


def interleave(
    live: dict[str, StepCase], steps: int, warmup: int, threads: int = 1
) -> dict[str, list[dict[str, float]]]:
    """Per case, the per-phase seconds of each timed step; one step of each case in turn, so a
    noisy neighbour hits every case alike. Torch runs on ``threads`` threads meanwhile."""
    import torch

    previous = torch.get_num_threads()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in live}
    torch.set_num_threads(threads)
    try:
        for index in range(warmup + steps):
            for name, case in live.items():
                seconds = case.step()
                if index >= warmup:  # first steps pay for allocator growth and worker start
                    samples[name].append(seconds)
    finally:
        torch.set_num_threads(previous)
    return samples


def close(live: dict[str, StepCase]) -> None:
    for case in live.values():
        case.batches.close()
        case.trainer.tracker.close()


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    # Shares from summed seconds (not medians of shares) so that they add up to 1 exactly.
    totals = {key: sum(run[key] for run in runs) for key in runs[0]}
    medians = {
        "step_median": statistics.median(run["total"] for run in runs),
        "per_1k_tokens": 1000 * totals["total"] / totals["tokens"],
        "steps": len(runs),
    }
    return {**totals, **medians}


def rows_from(samples: dict[str, list[dict[str, float]]]) -> list[dict]:
    rows = []
    summary = {name: summarise(runs) for name, runs in samples.items()}
    for name, phases in summary.items():
        # The optimisation peers ("<case>, <without it>") get their step-time row only.
        for phase in PHASES if ", " not in name else ():
            is_ot_target = phase == "ot_loss" and "cot2align" in name
            rows.append(
                {
                    "section": SECTION,
                    "case": f"{name} {phase} share",
                    "unit": "s (summed)",
                    "ours": phases[phase],
                    "peer": phases["total"],
                    "peer_name": "whole step",
                    "target": f"< {OT_SHARE_TARGET:.0%} of step" if is_ot_target else "report",
                }
            )
        base = BASE.get(name)
        if base in summary:
            rows.append(
                {
                    "section": SECTION,
                    "case": f"{name} step time vs {base} (same batches)",
                    "unit": "s/step",
                    "ours": phases["step_median"],
                    "peer": summary[base]["step_median"],
                    "peer_name": base,
                    "target": "<= 2.2x base",
                }
            )
        base = STANDARD_DATA_BASE.get(name)
        if base in summary:
            rows.append(
                {
                    "section": SECTION,
                    "case": f"{name} step time vs {base} on standard records (shorter rows)",
                    "unit": "s/step",
                    "ours": phases["step_median"],
                    "peer": summary[base]["step_median"],
                    "peer_name": base,
                    "target": "report",
                }
            )
            rows.append(
                {
                    "section": SECTION,
                    "case": f"{name} time per student token vs {base} on standard records",
                    "unit": "s/1k tok",
                    "ours": phases["per_1k_tokens"],
                    "peer": summary[base]["per_1k_tokens"],
                    "peer_name": base,
                    "target": "report",
                }
            )
        for gain, suffix in OPTIMISATIONS.items():
            peer = f"{name}, {suffix}"
            if peer in summary:
                rows.append(
                    {
                        "section": SECTION,
                        "case": f"{name}: {gain}",
                        "unit": "s/step",
                        "ours": phases["step_median"],
                        "peer": summary[peer]["step_median"],
                        "peer_name": "without",
                        "target": "report (gains at scale, see above)",
                    }
                )
    return rows


def run(quick: bool = False, tiny: bool = False) -> list[dict]:
    """``tiny``: smaller models and batch, two cases, for the smoke test (seconds, not minutes)."""
    if tiny:
        cases, steps, warmup = ["uld on CoT data", "uld+cot2align"], 2, 1
    elif quick:
        cases, steps, warmup = list(CASES), 6, 2
    else:
        cases, steps, warmup = list(CASES), 16, 3
    return rows_from(measure(cases, steps, warmup, tiny=tiny))


if __name__ == "__main__":
    import sys

    from bench.run import print_table

    quick = "--quick" in sys.argv
    rows = run(quick, tiny="--tiny" in sys.argv)
    print_table([{"suite": SECTION, **r} for r in rows], {}, quick)
