"""The reasoning benchmark grid's teacher time, with the live teacher against its caches.

``cot2align reasoning-bench --teacher-time`` (``reasoning_bench.measure_teacher_time``) does the
measuring: per cache layout of the grid, a fresh cache build, then the same steps of one cell
back to back with the live teacher and from the cache. These rows are its result.

Which grid: the full grid in ``$COT2ALIGN_BENCH_GRID`` (default ``runs/reasoning_bench``, where
``make reproduce-small`` writes it) when it is there; otherwise, and always with ``--quick``, a
quick grid of two cells and one seed built in a temporary directory (tiny sizes: its ratios say
less about the full grid's). The row names which one it measured.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

GRID_ENV = "COT2ALIGN_BENCH_GRID"
QUICK_CELLS = ("uld", "uld+cot2align")


def rows_from_teacher_time(result: dict, grid: str) -> list[dict]:
    """``teacher_time.json`` as bench rows: one step-time row per cache layout (the target on
    the layout CoT2Align cells read), then the grid's total teacher time."""
    rows = []
    for layout in result["layouts"]:
        cot2align = any("+cot2align" in cell for cell in layout["cells"])
        rows.append({
            "section": "reasoning grid teacher",
            "case": f"{grid}: {layout['measured_on']} step, cached teacher vs live "
                    f"({len(layout['cells'])} cells share the cache)",
            "unit": "s",
            "ours": float(layout["step_s_cached"]),
            "peer": float(layout["step_s_live"]),
            "peer_name": "live teacher",
            "target": "<= 0.6x live" if cot2align else "report",
        })  # fmt: skip
    seeds = len(result["grid_seeds"])
    rows.append({
        "section": "reasoning grid teacher",
        "case": f"{grid}: teacher time of the grid ({seeds} seeds), cache builds vs live",
        "unit": "s",
        "ours": float(result["grid_teacher_s_cached"]),
        "peer": float(result["grid_teacher_s_live"]),
        "peer_name": "live teacher, every step of every run",
        "target": "report",
    })  # fmt: skip
    return rows


def run(quick: bool = False) -> list[dict]:
    from cot2align_ds.experiments import reasoning_bench as bench

    os.environ.setdefault("WANDB_MODE", "disabled")
    full = Path(os.environ.get(GRID_ENV, "runs/reasoning_bench"))
    if not quick and (full / "results.json").is_file():
        result = bench.measure_teacher_time(full, quick=False, steps=100)
        return rows_from_teacher_time(result, f"full grid {full}")
    with tempfile.TemporaryDirectory() as tmp:
        bench.run_reasoning_bench(
            Path(tmp), quick=True, seeds=bench.QUICK_SEEDS[:1], cells=QUICK_CELLS
        )
        result = bench.measure_teacher_time(Path(tmp), quick=True, steps=4 if quick else 20)
    return rows_from_teacher_time(result, "quick grid (tiny sizes)")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from bench.run import print_table

    print_table([{"suite": "grid_teacher", **r} for r in run(args.quick)], {}, args.quick)
