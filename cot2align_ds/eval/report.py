"""Compare runs: one grid of curves, eval bars, and a side-by-side ``report.md``.

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
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

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


# Not worth a panel: bookkeeping that rises linearly with the step.
_NOT_CURVES = ("epoch", "skipped_steps")
CURVES_FIGURE = "curves.png"
_COLUMNS = 3


def _unit(key: str) -> str:
    """The y-axis label of a metric."""
    ot_diagnostics = {
        "ot/marginal_error": "L1 marginal error",
        "ot/plan_entropy": "entropy (nats)",
        "ot/plan_entropy_normalised": "entropy / uniform plan's",
    }
    if key in ot_diagnostics:
        return ot_diagnostics[key]
    if key.startswith(("loss/", "ot/")):
        return "loss term (per token / record)"
    if key.startswith("lr/"):
        return "learning rate"
    if key.startswith("eval/"):
        return "score (x100)"
    if key.startswith("mem/"):
        return "MB"
    return {"tokens_per_s": "tokens / s", "grad_norm": "L2 norm", "data_wait_share": "share"}.get(
        key, key
    )


def plotted_keys(runs: Sequence[RunData], keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the metrics that get a panel, the constant ones left out): bookkeeping, constants (one
    value logged more than once) and curves identical to an earlier panel (e.g. two parameter
    groups' learning rates) have none."""
    kept, constant, seen = [], [], set()
    for key in keys:
        if key in _NOT_CURVES:
            continue
        series = tuple((run.name, tuple(run.series(key)[1])) for run in runs)
        values = {value for _, values in series for value in values}
        # One value logged several times says nothing; a single point (one run, one log) does.
        if len(values) <= 1 and sum(len(values) for _, values in series) > 1:
            constant.append(key)
            continue
        if series in seen:
            continue
        seen.add(series)
        kept.append(key)
    return kept, constant


def _is_teacher(run: RunData) -> bool:
    return "teacher" in run.name.lower()


def _plot_curves(runs: Sequence[RunData], keys: Sequence[str], path: Path) -> None:
    """One grid: a panel per metric, every run a line (teacher runs dashed), one legend."""
    rows = math.ceil(len(keys) / _COLUMNS)
    columns = min(len(keys), _COLUMNS)
    figure = Figure(figsize=(4.6 * columns, 3.1 * rows + 0.6), layout="constrained")
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    handles: dict[str, object] = {}
    for index, key in enumerate(keys):
        axes = axes_grid[index // _COLUMNS][index % _COLUMNS]
        for run_index, run in enumerate(runs):
            steps, values = run.series(key)
            if not steps:
                continue
            # The teacher's runs dashed, with square markers: the reference the students aim at.
            teacher = _is_teacher(run)
            style = {"linestyle": "--"} if teacher else {}
            # Few points (quick runs, evaluations) get markers, or a line of one is invisible.
            marker = ("s" if teacher else "o") if len(steps) <= 5 else None
            color = f"C{run_index % 10}"  # the same run has the same colour in every panel
            (line,) = axes.plot(steps, values, marker=marker, markersize=3, color=color, **style)
            handles.setdefault(run.name, line)
        axes.set_title(key, fontsize=9)
        axes.set_ylabel(_unit(key), fontsize=8)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    for index in range(len(keys), rows * columns):
        axes_grid[index // _COLUMNS][index % _COLUMNS].set_visible(False)
    figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                  ncols=min(len(handles), 4), fontsize=8)  # fmt: skip
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    write_bytes_atomic(path, buffer.getvalue())


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


def _means(runs: Sequence[RunData], name: str) -> list[float]:
    return [run.eval_results[name]["mean"] for run in runs if run.eval_results.get(name)]


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
        bars = axes.bar(positions, means, width, yerr=stds, capsize=3, label=name)
        for bar, run in zip(bars, runs, strict=True):
            if _is_teacher(run):
                bar.set_hatch("//")  # the teacher: the reference the students aim at
    labels = [run.name for run in runs]
    if all(not math.isnan(m) and m >= 0 for name in names for m in _means(runs, name)):
        axes.set_ylim(bottom=0)  # scores are non-negative: no axis below zero, even all-zero
    axes.set_xticks(range(len(runs)), labels, rotation=40, ha="right", fontsize=7)
    axes.set(ylabel="mean ± std over seeds", title="evaluation")
    axes.grid(axis="y", alpha=0.3)
    # Plain patches: the first bar of a group may be the teacher's hatched one.
    patches = [Patch(facecolor=f"C{index}", label=name) for index, name in enumerate(names)]
    axes.legend(handles=patches, fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())


def _curves_section(keys: Sequence[str], constant: Sequence[str]) -> list[str]:
    if not keys:
        return []
    lines = ["## Curves", "", f"![curves]({CURVES_FIGURE})", ""]
    if constant:
        listed = ", ".join(f"`{key}`" for key in constant)
        lines += [f"Constant over the logged steps (not drawn): {listed}.", ""]
    return lines


DEMO_RESULTS_FILENAME = "demo_results.json"  # written by experiments.demo


def expand_demo_dirs(run_dirs: Sequence[Path]) -> list[Path]:
    """A demo's output directory stands for its runs, in the demo's order (the teacher's
    fine-tuning run first); other directories are kept as given."""
    expanded: list[Path] = []
    for path in run_dirs:
        summary = path / DEMO_RESULTS_FILENAME
        if (path / METRICS_FILENAME).is_file() or not summary.is_file():
            expanded.append(path)
            continue
        try:
            runs = json.loads(summary.read_text(encoding="utf-8"))["_meta"]["run_dirs"]
            expanded += [path / runs[name] for name in runs]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ReportError(f"{summary}: no run list ({error}); rerun the demo") from None
    return expanded


def make_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """One grid of the logged metrics of ``run_dirs`` vs step (``curves.png``), their eval
    results as bars (``eval.png``), and ``report.md``; its path. A demo's output directory
    (it holds ``demo_results.json``) stands for all of its runs."""
    run_dirs = expand_demo_dirs([Path(run_dir) for run_dir in run_dirs])
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(path, name) for path, name in zip(run_dirs, _run_names(run_dirs), strict=True)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = _metric_keys(runs)
    drawn, constant = plotted_keys(runs, keys)
    if drawn:
        _plot_curves(runs, drawn, out_dir / CURVES_FIGURE)
    eval_names = _eval_names(runs)
    if eval_names:
        _plot_eval(runs, eval_names, out_dir / EVAL_FIGURE)
    lines = ["# Run comparison", ""]
    lines += _runs_section(runs) + _eval_section(runs) + _final_section(runs, keys)
    lines += _curves_section(drawn, constant)
    report_path = out_dir / REPORT_FILENAME
    write_text_atomic(report_path, "\n".join(lines))
    return report_path
