"""The run-comparison report, from metric logs written by the Tracker itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread

from cot2align_ds.eval import evaluate
from cot2align_ds.eval.evaluate import EvalResult, write_eval_results
from cot2align_ds.eval.metrics import aggregate_seeds
from cot2align_ds.eval.report import EVAL_RESULTS_FILENAME, ReportError, make_report
from cot2align_ds.tracking import METRICS_FILENAME, Tracker


def _fake_run(path: Path, *, num_steps: int, with_ot: bool, eval_values: list[float]) -> Path:
    with Tracker(path, wandb_mode="disabled") as tracker:
        for step in range(1, num_steps + 1):
            metrics = {
                "loss/total": 3.0 / step,
                "loss/ce": 2.0 / step,
                "tokens_per_s": 100.0 * step,
            }
            if with_ot:
                metrics["loss/ot"] = 0.5 / step
            tracker.log(metrics, step)
        tracker.log({"eval/rouge_l": 20.0 + num_steps}, num_steps)
    if eval_values:
        scores = {"rouge_l": aggregate_seeds(eval_values)}
        seeds = list(range(len(eval_values)))
        write_eval_results(path / EVAL_RESULTS_FILENAME, EvalResult(scores, seeds, []))
    return path


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    return [
        _fake_run(tmp_path / "sft", num_steps=4, with_ot=False, eval_values=[20.0, 22.0]),
        _fake_run(tmp_path / "cot2align", num_steps=5, with_ot=True, eval_values=[]),
    ]


def test_report_has_one_grid_of_curves_and_a_side_by_side_table(two_runs, tmp_path) -> None:
    out_dir = tmp_path / "report"
    report = make_report(two_runs, out_dir)
    assert report == out_dir / "report.md"
    assert sorted(p.name for p in out_dir.glob("*.png")) == ["curves.png", "eval.png"]
    for name in ("curves.png", "eval.png"):
        image = imread(out_dir / name)  # a real, decodable PNG
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # Five metrics -> two rows of three panels.
    assert imread(out_dir / "curves.png").shape[0] >= 2 * 3.1 * 90  # inches x dpi
    text = report.read_text()
    # Final values side by side: loss/total is 3/4 for sft and 3/5 for cot2align.
    assert "| `loss/total` | 0.75 | 0.6 |" in text
    assert "| `loss/ot` | – | 0.1 |" in text  # present in one run only
    # Seeds: mean 21, sample std sqrt(2) = 1.41.
    assert "| rouge_l | 21.00 ± 1.41 (n=2) | – |" in text
    # Median tokens/s over the logs: [100..400] -> 250, [100..500] -> 300.
    assert "| sft | " in text and "| 250 |" in text and "| 300 |" in text
    assert "![curves](curves.png)" in text
    assert "![evaluation](eval.png)" in text  # the eval bars (mean, std as error bar)
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_same_named_runs_are_told_apart(tmp_path) -> None:
    runs = [
        _fake_run(tmp_path / "a" / "run", num_steps=2, with_ot=False, eval_values=[]),
        _fake_run(tmp_path / "b" / "run", num_steps=2, with_ot=False, eval_values=[]),
    ]
    text = make_report(runs, tmp_path / "report").read_text()
    assert "| a/run |" in text and "| b/run |" in text


def test_a_torn_last_line_is_tolerated_but_not_a_torn_middle(tmp_path) -> None:
    run = _fake_run(tmp_path / "run", num_steps=3, with_ot=False, eval_values=[])
    metrics = run / METRICS_FILENAME
    with metrics.open("a") as handle:
        handle.write('{"step": 4, "loss/tot')  # the process died mid-write
    text = make_report([run], tmp_path / "report").read_text()
    assert "| `loss/total` | 1 |" in text  # step 3's value: 3/3
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: malformed JSON"):
        make_report([run], tmp_path / "report")


def test_a_directory_without_logs_is_one_clear_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no metrics.jsonl or eval_results.json") as info:
        make_report([tmp_path / "empty"], tmp_path / "report")
    assert "\n" not in str(info.value)
    with pytest.raises(ReportError, match="no run directories"):
        make_report([], tmp_path / "report")


def test_file_names_agree_with_the_writers() -> None:
    assert EVAL_RESULTS_FILENAME == evaluate.EVAL_RESULTS_FILENAME


def test_constant_bookkeeping_and_duplicate_curves_get_no_panel(tmp_path) -> None:
    from cot2align_ds.eval.report import load_run, plotted_keys

    with Tracker(tmp_path / "run", wandb_mode="disabled") as tracker:
        for step in range(1, 4):
            tracker.log({"loss/total": 1.0 / step, "lr/student_decay": 0.1 / step,
                         "lr/student_no_decay": 0.1 / step, "epoch": step / 3,
                         "skipped_steps": 0.0, "mem/peak_host_rss_mb": 500.0}, step)  # fmt: skip
    run = load_run(tmp_path / "run", "run")
    keys = [key for key in run.rows[0] if key not in ("step", "time")]
    drawn, constant = plotted_keys([run], keys)
    assert drawn == ["loss/total", "lr/student_decay"]  # the second LR curve is the same
    assert constant == ["mem/peak_host_rss_mb"]
    text = make_report([tmp_path / "run"], tmp_path / "report").read_text()
    assert "Constant over the logged steps (not drawn): `mem/peak_host_rss_mb`." in text


def test_a_metric_logged_once_gets_a_panel(tmp_path) -> None:
    """Quick runs log once: an OT term that only one run has is a point worth showing."""
    from cot2align_ds.eval.report import load_run, plotted_keys

    runs = []
    for name, extra in (("sft", {}), ("cot2align", {"loss/ot_main": 1.4})):
        with Tracker(tmp_path / name, wandb_mode="disabled") as tracker:
            tracker.log({"loss/total": 2.0 + len(extra), "lr/student": 0.1, **extra}, 6)
        runs.append(load_run(tmp_path / name, name))
    drawn, constant = plotted_keys(runs, ["loss/total", "lr/student", "loss/ot_main"])
    assert drawn == ["loss/total", "loss/ot_main"] and constant == ["lr/student"]


def test_all_zero_scores_do_not_get_a_negative_axis(tmp_path) -> None:
    from matplotlib.figure import Figure

    from cot2align_ds.eval import report as report_module

    path = _fake_run(tmp_path / "teacher_sft", num_steps=2, with_ot=False, eval_values=[0.0, 0.0])
    limits = {}
    original = Figure.savefig

    def spy(figure, *args, **kwargs):
        limits[len(limits)] = [axes.get_ylim() for axes in figure.axes]
        return original(figure, *args, **kwargs)

    Figure.savefig = spy
    try:
        report_module.make_report([path], tmp_path / "report")
    finally:
        Figure.savefig = original
    eval_limits = limits[len(limits) - 1][0]
    assert eval_limits[0] == 0.0 and eval_limits[1] > 0
