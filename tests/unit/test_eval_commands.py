"""``run_eval`` / ``run_report`` on a tiny saved model: files, numbers, and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from cot2align_ds.data.records import RecordError, read_records, write_records
from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
from cot2align_ds.errors import UserError
from cot2align_ds.eval.commands import dataset_names, run_eval, run_report
from cot2align_ds.eval.evaluate import evaluate_records
from cot2align_ds.inference.loading import load_model_for_eval

FAST = {"template": "compact", "max_new_tokens": 6, "max_prompt_tokens": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def saved_model(workspace, tmp_path_factory) -> Path:
    """A tiny GPT-2 with the Unigram student tokenizer, saved as a Hugging Face directory."""
    tokenizer = AutoTokenizer.from_pretrained(workspace["student_tok"])
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("model")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> list[Path]:
    """Two test sets whose files are both named test.jsonl (their names must not collide)."""
    root = tmp_path_factory.mktemp("data")
    files = []
    for name, seed in (("arith2", 1), ("arith3", 2)):
        records = make_split(3, ArithmeticTaskSpec(num_steps=2), seed=seed, prefix=name)
        write_records(root / name / "test.jsonl", records)
        files.append(root / name / "test.jsonl")
    return files


def test_dataset_names_are_stems_unless_they_clash():
    assert dataset_names([Path("a/dolly.jsonl"), Path("b/sni.jsonl")]) == ["dolly", "sni"]
    assert dataset_names([Path("x/test.jsonl"), Path("y/test.jsonl")]) == ["x_test", "y_test"]
    assert dataset_names([Path("x/t.jsonl"), Path("x/t.jsonl")]) == ["x_t_0", "x_t_1"]
    assert dataset_names([Path("a/my data!.jsonl")]) == ["my_data"]


def test_run_eval_writes_predictions_and_mean_std_per_dataset(saved_model, data_files, tmp_path):
    console = Console(record=True, width=120)
    results = run_eval(
        saved_model, data_files, output_dir=tmp_path, seeds=(10, 20), console=console, **FAST
    )
    assert list(results) == ["arith2_test", "arith3_test"]
    on_disk = json.loads((tmp_path / "eval_results.json").read_text())
    assert on_disk == results
    model, tokenizer = load_model_for_eval(saved_model)
    for name, path in zip(results, data_files, strict=True):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        rows = (tmp_path / f"predictions_{name}.jsonl").read_text().splitlines()
        assert len(rows) == 2 * len(records)  # one per (record, seed)
        assert {json.loads(row)["seed"] for row in rows} == {10, 20}
        expected = evaluate_records(model, tokenizer, read_records(path), seeds=(10, 20), **FAST)
        assert results[name] == expected.summary()
        assert set(results[name]) == {"rouge_l", "exact_match"}
        assert len(results[name]["rouge_l"]["per_seed"]) == 2
    printed = console.export_text()
    assert "arith2_test: 3 records, seeds 10, 20" in printed and "± " in printed
    args = json.loads((tmp_path / "eval_args.json").read_text())
    assert args["seeds"] == [10, 20] and args["data_files"]["arith3_test"] == str(data_files[1])


def test_greedy_evaluation_runs_once(saved_model, data_files, tmp_path):
    results = run_eval(
        saved_model, data_files[:1], output_dir=tmp_path, greedy=True, metrics=["exact_match"],
        console=Console(quiet=True), **FAST,
    )  # fmt: skip
    assert list(results) == ["test"] and list(results["test"]) == ["exact_match"]
    stats = results["test"]["exact_match"]
    assert stats["per_seed"] == [stats["mean"]] and stats["std"] == 0.0
    assert len((tmp_path / "predictions_test.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"metrics": ["bleu"]}, UserError, "unknown metric 'bleu'"),
        ({"template": "markdown"}, UserError, "unknown template 'markdown'"),
        ({"seeds": (1, 1)}, UserError, r"duplicate seeds \[1, 1\]"),
        ({"seeds": ()}, UserError, "needs at least one seed"),
        ({"batch_size": 0}, UserError, "batch_size must be >= 1"),
        ({"max_new_tokens": 0}, UserError, "max_new_tokens must be >= 1"),
        ({"dtype": "int8"}, UserError, "dtype 'int8': choose fp32, bf16 or fp16"),
        ({"dtype": "half-ish"}, UserError, "dtype 'half-ish': choose fp32, bf16 or fp16"),
        ({"data_files": ["missing.jsonl"]}, RecordError, "missing.jsonl: data file not found"),
        ({"data_files": []}, UserError, "no data files"),
    ],
)
def test_bad_inputs_fail_before_the_model_loads(data_files, tmp_path, options, error, message):
    # The model path does not exist: each error must come from checking the inputs first.
    arguments = {"data_files": data_files, **FAST, **options}
    with pytest.raises(error, match=message) as info:
        run_eval(tmp_path / "no-model", output_dir=tmp_path / "out", **arguments)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_refused(saved_model, data_files, tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(UserError, match="is a file; give a directory"):
        run_eval(saved_model, data_files, output_dir=tmp_path / "taken", **FAST)


def test_run_report_compares_runs(tmp_path):
    for name, losses in (("a", [3.0, 2.0]), ("b", [3.0, 1.5])):
        run_dir = tmp_path / name
        run_dir.mkdir()
        rows = [
            {"step": step, "time": float(step), "loss/total": loss}
            for step, loss in enumerate(losses, start=1)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = run_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text()
    assert "| `loss/total` | 2 | 1.5 |" in text and (tmp_path / "report" / "curves.png").is_file()
