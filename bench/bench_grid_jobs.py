"""The reasoning grid's runs at once: ``--jobs 2`` (two runs, one thread each) against
``--jobs 1`` (one run at a time on every thread), the same runs, timed in the same process.

Each mode trains and scores the same number of runs of one cell (different seeds, so no run is
kept from the other mode) through ``reasoning_bench.run_cells``, as the grid does, from one
teacher cache built beforehand. The wall time of the whole batch is the measure: start-up,
training, scoring, and for ``--jobs 2`` the worker processes' start.

Which grid: the full grid's data, teacher and rationales in ``$COT2ALIGN_BENCH_GRID`` (default
``runs/reasoning_bench``) when they are there, with a shortened student budget (``STEPS``);
otherwise, and always with ``--quick``, the quick grid's in a temporary directory (tiny sizes:
it checks the path, its ratio says little). The row names which one it measured.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

from bench.bench_grid_teacher import GRID_ENV

CELL = "dskd_cma+cot2align"  # the grid's most common cost line (six of its fourteen cells)
RUNS = 4  # per mode: two per worker, so the workers' start is spread as in a grid
STEPS = 60


def _timed_batch(shared, cell, seeds: tuple[int, ...], root: Path, jobs: int) -> float:
    from cot2align_ds.experiments import reasoning_bench as bench

    started = time.perf_counter()
    bench.run_cells(shared, [cell], seeds, root, jobs)
    return time.perf_counter() - started


def measure(shared, root: Path) -> dict[str, float]:
    """Wall seconds of ``RUNS`` runs of ``CELL`` with ``--jobs 2`` and with ``--jobs 1``."""
    from cot2align_ds.experiments import reasoning_bench as bench

    cell = bench.CELLS_BY_NAME[CELL]
    # The cache does not depend on the seed: built once, outside both timings.
    raw = bench.cell_config(shared, cell, 0, root / "cells" / CELL / "seed0")
    bench.with_teacher_cache(raw, root / "teacher_cache")
    # Ours first: whatever a cold start costs (imports, page cache) counts against it.
    two = _timed_batch(shared, cell, tuple(range(100, 100 + RUNS)), root, jobs=2)
    one = _timed_batch(shared, cell, tuple(range(200, 200 + RUNS)), root, jobs=1)
    return {"jobs2_s": two, "jobs1_s": one}


def rows(result: dict[str, float], grid: str, steps: int | None) -> list[dict]:
    return [{
        "section": "reasoning grid runs at once",
        "case": f"{grid}: {RUNS} runs of {CELL} ({steps} steps, scored), "
                "2 at a time on 1 thread each vs 1 at a time on all threads",
        "unit": "s",
        "ours": result["jobs2_s"],
        "peer": result["jobs1_s"],
        "peer_name": "--jobs 1",
        "target": "<= 0.8x --jobs 1",
    }]  # fmt: skip


def run(quick: bool = False) -> list[dict]:
    from cot2align_ds.experiments import reasoning_bench as bench

    os.environ.setdefault("WANDB_MODE", "disabled")
    full = Path(os.environ.get(GRID_ENV, "runs/reasoning_bench"))
    shared = None if quick else bench.load_shared(full, bench.FULL)
    with tempfile.TemporaryDirectory() as tmp:
        if shared is None:
            shared, grid = bench.build_shared(Path(tmp) / "shared", bench.QUICK), "quick grid"
        else:
            grid = f"full grid {full}"
            size = dataclasses.replace(shared.size, student_max_steps=STEPS)
            shared = dataclasses.replace(shared, size=size)
        result = measure(shared, Path(tmp) / "runs")
    return rows(result, grid, shared.size.student_max_steps)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from bench.run import print_table

    print_table([{"suite": "grid_jobs", **r} for r in run(args.quick)], {}, args.quick)
