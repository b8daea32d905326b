"""The paper table: collecting eval_results.json files under a runs root, and rendering them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cot2align_ds.errors import UserError
from cot2align_ds.experiments.paper_table import (
    MISSING,
    TABLE_FILENAME,
    PaperTableError,
    collect_results,
    dataset_column,
    main,
    render_table,
    write_paper_table,
)
from cot2align_ds.run_dir import RunDirError, best_model_dir


def _scores(mean: float, std: float, seeds: int = 5) -> dict:
    return {"mean": mean, "std": std, "per_seed": [mean] * seeds}


def _result(root: Path, run: str, results: dict, data_files: dict | None = None) -> Path:
    eval_dir = root / run / "eval"
    eval_dir.mkdir(parents=True)
    path = eval_dir / "eval_results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    if data_files is not None:
        args = {"model_path": "m", "data_files": data_files, "seeds": [10, 20, 30, 40, 50]}
        (eval_dir / "eval_args.json").write_text(json.dumps(args), encoding="utf-8")
    return path


def _rouge(mean: float, std: float) -> dict:
    return {"test": {"rouge_l": _scores(mean, std), "exact_match": _scores(1.0, 0.0)}}


@pytest.fixture
def runs(tmp_path) -> Path:
    """What mk/paper.mk lays out: <setting>/<dataset>/<run>/eval/eval_results.json."""
    root = tmp_path / "paper"
    _result(root, "A/dolly/teacher_sft", _rouge(30.0, 0.25))
    _result(root, "A/dolly/uld", _rouge(25.0, 0.5))
    _result(root, "A/dolly/uld+cot2align", _rouge(26.125, 0.333))
    _result(root, "A/alpaca/uld", _rouge(40.0, 1.0))
    _result(root, "A/dolly/sft", _rouge(22.0, 0.4))
    _result(root, "A/dolly/dskd_cma+cot2align", _rouge(27.0, 0.2))
    _result(root, "A_same/dialogsum/vanilla_kd", _rouge(31.5, 0.05))
    return root


def test_table_has_the_paper_layout(runs):
    text = render_table(collect_results(runs))
    lines = text.splitlines()
    assert lines[0].startswith("ROUGE-L (x100): mean ± std over 5 evaluation seeds")
    assert lines[2:] == [
        "| Setting | Method | Dolly | Alpaca | DialogSum |",
        "|---|---|---:|---:|---:|",
        "| A | Teacher (SFT) | 30.00 ± 0.25 | – | – |",
        "| A | SFT | 22.00 ± 0.40 | – | – |",
        "| A | ULD | 25.00 ± 0.50 | 40.00 ± 1.00 | – |",
        "| A | ULD + CoT2Align | 26.12 ± 0.33 | – | – |",
        "| A | DSKD-CMA | – | – | – |",
        "| A | DSKD-CMA + CoT2Align | 27.00 ± 0.20 | – | – |",
        "| A_same | Vanilla KD | – | – | 31.50 ± 0.05 |",
        "| A_same | Vanilla KD + CoT2Align | – | – | – |",
    ]
    assert MISSING == "–"


def test_other_metric_and_missing_metric(runs):
    _result(runs, "B/dolly/mined", {"test": {"rouge_l": _scores(20.0, 1.0)}})  # no exact_match
    text = render_table(collect_results(runs, "exact_match"), "exact_match")
    assert text.splitlines()[0].startswith("Exact match (x100)")
    assert "| A | ULD | 1.00 ± 0.00 | 1.00 ± 0.00 | – |" in text
    assert "| B |" not in text


def test_two_level_layout_takes_datasets_from_the_keys(tmp_path):
    root = tmp_path / "paper"
    _result(
        root,
        "C/uld+cot2align",
        {"dolly_test": {"rouge_l": _scores(1.0, 0.1)}, "s-ni_test": {"rouge_l": _scores(2, 0)}},
    )
    _result(
        root, "C/uld", {"test": {"rouge_l": _scores(3.0, 0.3)}}, {"test": "data/alpaca/test.jsonl"}
    )
    cells = collect_results(root)
    assert set(cells) == {
        ("C", "uld+cot2align", "dolly"),
        ("C", "uld+cot2align", "sni"),
        ("C", "uld", "alpaca"),  # "test" alone: the data file's folder, from eval_args.json
    }
    assert "| C | ULD | – | 3.00 ± 0.30 | – |" in render_table(cells)


@pytest.mark.parametrize(
    ("key", "fallback", "expected"),
    [
        ("dolly_test", None, "dolly"),
        ("test", "dialogsum", "dialogsum"),
        ("test", None, "test"),
        ("S-NI", None, "sni"),
        ("natural_instructions_test", None, "sni"),
        ("self_inst", "dolly", "self_inst"),
    ],
)
def test_dataset_column(key, fallback, expected):
    assert dataset_column(key, fallback) == expected


def test_write_is_atomic_and_main_prints_the_table(runs, capsys):
    path, text = write_paper_table(runs)
    assert path == runs / TABLE_FILENAME and path.read_text(encoding="utf-8") == text
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]  # no temporary left
    other = runs.parent / "elsewhere" / "table.md"
    assert main([str(runs), "--output", str(other)]) == 0
    assert other.read_text(encoding="utf-8") == text
    assert capsys.readouterr().out == text


def test_unexpected_depth_is_skipped_with_a_warning(runs, capsys):
    _result(runs, "A/dolly/uld/extra", _rouge(99.0, 0.0))
    cells = collect_results(runs)
    assert all(cell.mean != 99.0 for cell in cells.values())
    assert "skipped" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "unreadable JSON"),
        ("[1, 2]", "expected {dataset: {metric"),
        ('{"test": 3}', "'test' is not a mapping of metrics"),
        ('{"test": {"rouge_l": {"mean": "high"}}}', "needs numbers 'mean', 'std'"),
    ],
)
def test_malformed_results_name_the_file(runs, content, expected):
    (runs / "A/dolly/uld/eval/eval_results.json").write_text(content, encoding="utf-8")
    with pytest.raises(PaperTableError) as caught:
        collect_results(runs)
    message = str(caught.value)
    assert "A/dolly/uld/eval/eval_results.json" in message and expected in message
    assert "\n" not in message and isinstance(caught.value, UserError)


def test_the_same_cell_twice_is_refused(runs):
    _result(runs, "A/uld", {"dolly_test": {"rouge_l": _scores(1.0, 0.0)}})
    with pytest.raises(PaperTableError, match="A/uld/dolly is also in"):
        collect_results(runs)


def test_no_results(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PaperTableError, match="no eval_results.json with 'rouge_l'"):
        collect_results(tmp_path / "empty")
    with pytest.raises(PaperTableError, match="no such directory"):
        collect_results(tmp_path / "missing")
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------------------------------------
# --best-model
# ---------------------------------------------------------------------------------------------


def _dev_eval(run: Path, kept_path: str) -> None:
    state = {"metric": "rouge_l", "scores": {"40": 20.0}, "best_score": 20.0, "kept": []}
    state["kept"] = [{"step": 40, "score": 20.0, "path": kept_path}]
    (run / "dev_eval.json").write_text(json.dumps(state), encoding="utf-8")


def test_best_model_is_the_kept_dev_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "uld"
    best = run / "best_checkpoints" / "step_00000040"
    best.mkdir(parents=True)
    (run / "student").mkdir()
    monkeypatch.chdir(tmp_path)
    _dev_eval(run, "runs/uld/best_checkpoints/step_00000040")  # relative to where training ran
    assert best_model_dir(run) == Path("runs/uld/best_checkpoints/step_00000040")
    monkeypatch.chdir(run)  # elsewhere: found inside the run
    assert best_model_dir(run) == best
    assert main(["--best-model", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(best)


def test_best_model_falls_back_to_the_final_model(tmp_path):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    assert best_model_dir(run) == run / "student"
    _dev_eval(run, str(tmp_path / "deleted_checkpoint"))
    assert best_model_dir(run) == run / "student"


def test_best_model_without_any_model(tmp_path):
    with pytest.raises(RunDirError, match="no trained model"):
        best_model_dir(tmp_path)


def test_best_model_with_an_unreadable_dev_eval_state(tmp_path):
    (tmp_path / "dev_eval.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RunDirError, match="dev_eval.json: unreadable"):
        best_model_dir(tmp_path)
