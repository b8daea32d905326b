"""Compare runs: curves as PNG and a side-by-side ``report.md``.

Inputs per run directory: ``metrics.jsonl`` (written by ``Tracker``: one object per log call
with ``step``, wall ``time`` and metric values) and, when present, ``eval_results.json``
(``{metric: {"mean", "std", "per_seed"}}``, written by ``eval.evaluate.write_eval_results``).
Figures are drawn on ``matplotlib.figure.Figure`` objects, which render with the Agg canvas
and never touch pyplot's global state or the interactive backend.
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from cot2align_ds.atomic import write_bytes_atomic, write_text_atomic
from cot2align_ds.errors import UserError
from cot2align_ds.tracking import METRICS_FILENAME

EVAL_RESULTS_FILENAME = "eval_results.json"  # same name as eval.evaluate.EVAL_RESULTS_FILENAME
REPORT_FILENAME = "report.md"
EVAL_FIGURE = "eval.png"
THROUGHPUT_KEY = "tokens_per_s"  # logged by the training loop at every log interval
_NOT_PLOTTED = ("step", "time")
_MISSING = "–"


class ReportError(UserError):
    """A run directory cannot be read for the report."""


@dataclass
class RunData:
    """What the report needs from one run directory."""

    name: str
    path: Path
    rows: list[dict[str, float]] = field(default_factory=list)
    eval_results: dict[str, dict] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric, in logged order, skipping rows without it."""
        points = [(row["step"], row[key]) for row in self.rows if row.get(key) is not None]
        return [step for step, _ in points], [value for _, value in points]

    def final(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else None


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a metrics.jsonl; a torn last line (the run crashed mid-write) is dropped."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ReportError(f"{path}:{number}: malformed JSON ({error.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ReportError(f"{path}:{number}: expected an object with a 'step' field")
        rows.append(row)
    return rows


def _read_eval_results(path: Path) -> dict[str, dict]:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: malformed JSON ({error.msg})") from None
    if not isinstance(results, dict):
        raise ReportError(f'{path}: expected {{"metric": {{"mean": .., "std": ..}}}}')
    flat: dict[str, dict] = {}
    for key, value in results.items():
        # `cot2align eval` nests per dataset: {dataset: {metric: stats}} -> "dataset/metric".
        if isinstance(value, dict) and "mean" not in value:
            flat.update({f"{key}/{metric}": stats for metric, stats in value.items()})
        else:
            flat[key] = value
    if not all(isinstance(stats, dict) and "mean" in stats for stats in flat.values()):
        raise ReportError(f'{path}: expected {{"metric": {{"mean": .., "std": ..}}}}')
    return flat


def load_run(run_dir: Path, name: str) -> RunData:
    metrics_path, eval_path = run_dir / METRICS_FILENAME, run_dir / EVAL_RESULTS_FILENAME
    if not metrics_path.is_file() and not eval_path.is_file():
        raise ReportError(
            f"{run_dir}: no {METRICS_FILENAME} or {EVAL_RESULTS_FILENAME}; pass a run's output_dir"
        )
    run = RunData(name=name, path=run_dir)
    if metrics_path.is_file():
        run.rows = read_metrics(metrics_path)
    if eval_path.is_file():
        run.eval_results = _read_eval_results(eval_path)
    return run


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Directory names, prefixed with the parent where two runs share a name."""
    names = [path.name or str(path) for path in run_dirs]
    clashes = {name for name in names if names.count(name) > 1}
    names = [
        f"{p.parent.name}/{n}" if n in clashes else n for p, n in zip(run_dirs, names, strict=True)
    ]
    return [
        f"{name} ({index})" if names.count(name) > 1 else name for index, name in enumerate(names)
    ]


def _metric_keys(runs: Sequence[RunData]) -> list[str]:
    """Every logged metric, in first-seen order."""
    keys: dict[str, None] = {}
    for run in runs:
        for row in run.rows:
            keys.update((key, None) for key in row if key not in _NOT_PLOTTED)
    return list(keys)


def _plot_metric(runs: Sequence[RunData], key: str, path: Path) -> None:
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for run in runs:
        steps, values = run.series(key)
        if steps:
            # A lone point (e.g. one eval) gets a marker, or the line would be invisible.
            axes.plot(steps, values, label=run.name, marker="o" if len(steps) == 1 else None)
    axes.set(xlabel="step", ylabel=key, title=key)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(path, buffer.getvalue())


def _figure_names(keys: Sequence[str]) -> dict[str, str]:
    """A distinct, filesystem-safe PNG name per metric ("loss/total" -> "loss_total.png")."""
    names: dict[str, str] = {}
    for key in keys:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_.") or "metric"
        candidate, index = stem, 1
        while f"{candidate}.png" in names.values():
            index += 1
            candidate = f"{stem}_{index}"
        names[key] = f"{candidate}.png"
    return names


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    return f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _throughput(run: RunData) -> float | None:
    # Median over log intervals: robust to the slow first interval (compilation, warm-up).
    values = [v for v in run.series(THROUGHPUT_KEY)[1] if math.isfinite(v)]
    return statistics.median(values) if values else None


def _runs_section(runs: Sequence[RunData]) -> list[str]:
    rows = []
    for run in runs:
        steps, times = run.series("time")
        wall = f"{times[-1] - times[0]:.1f}" if len(times) > 1 else _MISSING
        last_step = str(steps[-1]) if steps else _MISSING
        rows.append([run.name, f"`{run.path}`", last_step, wall, _fmt(_throughput(run))])
    header = ["run", "directory", "last step", "wall s (logged span)", "tokens/s (median)"]
    return ["## Runs", "", *_table(header, rows), ""]


def _final_section(runs: Sequence[RunData], keys: Sequence[str]) -> list[str]:
    if not keys:
        return []
    rows = [[f"`{key}`", *(_fmt(run.final(key)) for run in runs)] for key in keys]
    header = ["metric (last logged)", *(run.name for run in runs)]
    return ["## Final training values", "", *_table(header, rows), ""]


def _eval_cell(stats: dict | None) -> str:
    if stats is None:
        return _MISSING
    num_seeds = len(stats.get("per_seed", [])) or 1
    return f"{stats['mean']:.2f} ± {stats.get('std', 0.0):.2f} (n={num_seeds})"


def _eval_names(runs: Sequence[RunData]) -> list[str]:
    return list(dict.fromkeys(name for run in runs for name in run.eval_results))


def _eval_section(runs: Sequence[RunData]) -> list[str]:
    names = _eval_names(runs)
    if not names:
        return []
    rows = [[name, *(_eval_cell(run.eval_results.get(name)) for run in runs)] for name in names]
    header = ["eval metric (mean ± std over seeds)", *(run.name for run in runs)]
    return ["## Evaluation", "", *_table(header, rows), "", f"![evaluation]({EVAL_FIGURE})", ""]


def _plot_eval(runs: Sequence[RunData], names: Sequence[str], path: Path) -> None:
    """Grouped bars: one group per run, one bar per eval metric, std over seeds as error bar."""
    figure = Figure(figsize=(max(6.4, 0.9 * len(runs)), 4.5), layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        stats = [run.eval_results.get(name) for run in runs]
        means = [entry["mean"] if entry else math.nan for entry in stats]
        stds = [entry.get("std", 0.0) if entry else 0.0 for entry in stats]
        offset = (index - (len(names) - 1) / 2) * width
        positions = [run_index + offset for run_index in range(len(runs))]
        axes.bar(positions, means, width, yerr=stds, capsize=3, label=name)
    labels = [run.name for run in runs]
    axes.set_xticks(range(len(runs)), labels, rotation=40, ha="right", fontsize=7)
    axes.set(ylabel="mean ± std over seeds", title="evaluation")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())


def _curves_section(figures: dict[str, str]) -> list[str]:
    if not figures:
        return []
    lines = ["## Curves", ""]
    for key, file_name in figures.items():
        lines += [f"### `{key}`", "", f"![{key}]({file_name})", ""]
    return lines


def make_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Plot every logged metric of ``run_dirs`` vs step, and their eval results as bars
    (``eval.png``), and write ``report.md``; its path."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(path, name) for path, name in zip(run_dirs, _run_names(run_dirs), strict=True)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = _metric_keys(runs)
    figures = _figure_names(keys)
    for key, file_name in figures.items():
        _plot_metric(runs, key, out_dir / file_name)
    eval_names = _eval_names(runs)
    if eval_names:
        _plot_eval(runs, eval_names, out_dir / EVAL_FIGURE)
    lines = ["# Run comparison", ""]
    lines += _runs_section(runs) + _eval_section(runs) + _final_section(runs, keys)
    lines += _curves_section(figures)
    report_path = out_dir / REPORT_FILENAME
    write_text_atomic(report_path, "\n".join(lines))
    return report_path
