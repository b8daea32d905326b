"""``make bench``: every benchmark in one run, one summary table of ratios against peers.

Each module's ``run(quick)`` returns rows ``{section, case, ours, peer, peer_name, unit,
target}`` measured in the same process run (peers interleaved, medians of repeats), so the
ratio ``ours / peer`` is meaningful on a noisy shared machine even when absolute numbers are not.

Usage: ``python -m bench.run [--quick] [--gpu] [--only ot,vocab_loss,alignment,step] [--json FILE]``.
``--gpu`` is passed to the suites whose ``run`` accepts ``gpu=`` (issue-size runs on CUDA).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import time
from datetime import date

from rich.console import Console
from rich.table import Table

SUITES = {
    "alignment": "bench.bench_alignment",
    "vocab_loss": "bench.bench_vocab_loss",
    "ot": "bench.bench_ot",
    "step": "bench.bench_step",
    "breakdown": "bench.bench_breakdown",
    "ot_calls": "bench.bench_ot_calls",
    "teacher": "bench.bench_teacher",
    "real": "bench.bench_real",
}


def _ratio(row: dict) -> str:
    ours, peer = row.get("ours"), row.get("peer")
    if not isinstance(ours, int | float) or not isinstance(peer, int | float) or peer == 0:
        return "-"
    return f"{ours / peer:.2f}"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value)


def collect(
    names: list[str], quick: bool, gpu: bool = False
) -> tuple[list[dict], dict[str, float]]:
    rows, seconds = [], {}
    for name in names:
        started = time.perf_counter()
        module = importlib.import_module(SUITES[name])
        # Only suites with a GPU path take the flag; the others run as they always do.
        extra = {"gpu": gpu} if gpu and "gpu" in inspect.signature(module.run).parameters else {}
        rows += [{"suite": name, **row} for row in module.run(quick=quick, **extra)]
        seconds[name] = time.perf_counter() - started
    return rows, seconds


def print_table(rows: list[dict], seconds: dict[str, float], quick: bool) -> None:
    title = (
        f"cot2align-ds bench ({'quick' if quick else 'full'}), {date.today()}, "
        f"{platform.machine()} {platform.processor() or ''}".strip()
    )
    table = Table(title=title)
    for column in ("suite", "case", "ours", "peer", "unit", "ours/peer", "target"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["suite"],
            row["case"],
            _fmt(row.get("ours")),
            f"{_fmt(row.get('peer'))} ({row.get('peer_name', '')})",
            row.get("unit", ""),
            _ratio(row),
            row.get("target", ""),
        )
    console = Console(width=160)
    console.print(table)
    console.print("suite wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(SUITES))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--gpu", action="store_true", help="issue-size GPU runs where supported")
    args = parser.parse_args()
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {sorted(SUITES)}")
    rows, seconds = collect(names, args.quick, args.gpu)
    print_table(rows, seconds, args.quick)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "seconds": seconds}, handle, indent=2)


if __name__ == "__main__":
    main()
