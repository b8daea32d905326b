"""The embedded demo, quick mode, through the CLI: every stage really ran and was evaluated."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cot2align_ds.cli import app


def test_quick_demo_prints_the_table_from_real_runs(tmp_path):
    result = CliRunner().invoke(
        app, ["demo", "--quick", "--output-dir", str(tmp_path), "--methods", "uld,mined"]
    )
    assert result.exit_code == 0, result.output
    labels = ("teacher", "trained alone (SFT)", "(ULD,", "(MinED,", "(ULD + CoT2Align)")
    for label in labels:
        assert label in result.output
    # Stage headers with their times, and the caveat that quick numbers mean nothing.
    assert "== demo [1/7] train teacher" in result.output
    assert "== demo [7/7] exact match on held-out problems" in result.output
    assert "quick mode: 6 steps per model" in " ".join(result.output.split())
    results = json.loads((tmp_path / "demo_results.json").read_text())
    stages = ("teacher", "student_sft", "student_uld", "student_mined", "student_uld_cot2align")
    run_dirs = results["_meta"]["run_dirs"]
    assert run_dirs["teacher"] == "teacher_finetune" and list(run_dirs) == list(stages)
    for stage in stages:
        assert 0.0 <= results[stage]["exact_match"] <= 100.0
        run = tmp_path / run_dirs[stage]
        rows = (run / "metrics.jsonl").read_text().splitlines()
        assert len(rows) >= 1 and "loss/ce" in json.loads(rows[-1])
        predictions = (run / "test_predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 24
        scored = json.loads((run / "eval_results.json").read_text())["exact_match"]["mean"]
        assert scored == results[stage]["exact_match"]
    # The students distilled from the exported teacher model, not from a run directory.
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    assert not (tmp_path / "teacher" / "student").exists()
    # `cot2align report` on the demo's directory shows every row and its score.
    reported = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert reported.exit_code == 0, reported.output
    report = (tmp_path / "r" / "report.md").read_text()
    for stage in stages:
        assert run_dirs[stage] in report
    assert (tmp_path / "r" / "eval.png").is_file() and (tmp_path / "r" / "curves.png").is_file()
    # The distilled student really went through the teacher engine (a KD term was logged).
    last = json.loads((tmp_path / "student_uld" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss/kd_uld"] > 0
    assert json.loads((tmp_path / "student_uld" / "config.json").read_text())["teacher"]
    # CoT2Align trained on the teacher's own rationales, with its OT terms.
    assert set(results["_meta"]["stage_s"]) == {line.removeprefix("== demo ")
        for line in result.output.splitlines() if line.startswith("== demo ")}  # fmt: skip
    stats = json.loads((tmp_path / "augment" / "augment_stats.json").read_text())
    assert stats["total"] == 240
    last = json.loads(
        (tmp_path / "student_uld_cot2align" / "metrics.jsonl").read_text().splitlines()[-1]
    )
    assert {"loss/ot_main", "loss/ot_cross_std_cot", "loss/ot_cross_cot_std"} <= set(last)
