"""In-training dev evaluation on a tiny real model: metrics, sharding, best-K, early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from cot2align_ds.config import EvalConfig
from cot2align_ds.data.records import Record
from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
from cot2align_ds.eval.evaluate import evaluate_records
from cot2align_ds.eval.metrics import EvalInputError
from cot2align_ds.train.dev_eval import DevEvaluator, shard_indices

OPTIONS = {"template": "compact", "max_prompt_tokens": 64}


@pytest.fixture(scope="module")
def records() -> list[Record]:
    """Free-text answers (as in Dolly), so that even a random model scores some ROUGE-L."""
    problems = make_split(4, ArithmeticTaskSpec(num_steps=2), seed=3, prefix="dev")
    return [r.model_copy(update={"output": f"Step by step: {r.rationale}"}) for r in problems]


@pytest.fixture(scope="module")
def model_and_tokenizer(workspace):
    tokenizer = AutoTokenizer.from_pretrained(workspace["student_tok"])
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.3,  # peaked logits: greedy outputs differ from prompt to prompt
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def _evaluator(tokenizer, records, tmp_path: Path, **config) -> DevEvaluator:
    settings = {"max_new_tokens": 8, "batch_size": 4, **config}
    return DevEvaluator(
        EvalConfig(**settings),
        records,
        tokenizer,
        output_dir=tmp_path,
        is_main=True,
        steps_per_epoch=10,
        **OPTIONS,
    )


@pytest.mark.parametrize(("num_records", "world_size"), [(7, 2), (6, 3), (2, 4), (1, 1)])
def test_shards_cover_every_record_once_with_equal_counts(num_records, world_size):
    shards = [shard_indices(num_records, rank, world_size) for rank in range(world_size)]
    assert len({len(indices) for indices, _ in shards}) == 1  # same number of generate calls
    counted = sorted(
        index
        for indices, weights in shards
        for index, weight in zip(indices, weights, strict=True)
        if weight
    )
    assert counted == list(range(num_records))


@pytest.mark.parametrize(
    ("config", "due_steps"),
    [
        ({"every_steps": 4}, [4, 8, 12, 16, 20]),
        ({"every_epoch": True}, [10, 20]),
        ({"every_steps": 4, "every_epoch": True}, [4, 8, 10, 12, 16, 20]),
        ({}, []),
    ],
)
def test_due_every_n_steps_and_at_epoch_ends(
    model_and_tokenizer, records, tmp_path, config, due_steps
):
    evaluator = _evaluator(model_and_tokenizer[1], records, tmp_path, **config)
    assert [step for step in range(1, 21) if evaluator.due(step)] == due_steps


def _predictions(directory: Path, step: int) -> list[dict]:
    return [
        json.loads(line) for line in (directory / "dev_predictions" / f"step_{step}.jsonl").open()
    ]


def _with_own_answers(model, tokenizer, records: list[Record], tmp_path: Path) -> list[Record]:
    """Half the records answered with the model's own greedy output: they must score 100, so
    equal metrics below cannot be a vacuous 0 == 0."""
    _evaluator(tokenizer, records, tmp_path / "probe").evaluate(model, step=0)
    own = {row["id"]: row["prediction"] for row in _predictions(tmp_path / "probe", 0)}
    half = {record.id for record in records[: len(records) // 2] if own[record.id].strip()}
    assert half, "the model answered every probe with nothing"
    return [r.model_copy(update={"output": own[r.id]}) if r.id in half else r for r in records]


@pytest.mark.parametrize("greedy", [True, False])
def test_metrics_equal_a_plain_evaluation(model_and_tokenizer, records, tmp_path, greedy):
    model, tokenizer = model_and_tokenizer
    if greedy:
        records = _with_own_answers(model, tokenizer, records, tmp_path)
    evaluator = _evaluator(tokenizer, records, tmp_path, greedy=greedy, seeds=[10, 20])
    metrics = evaluator.evaluate(model, step=5)
    expected = evaluate_records(
        model, tokenizer, records, seeds=[10, 20], greedy=greedy, max_new_tokens=8,
        batch_size=4, **OPTIONS,
    )  # fmt: skip
    assert metrics == pytest.approx(
        {f"eval/{name}": stats.mean for name, stats in expected.scores.items()}
    )
    if greedy:
        assert metrics["eval/rouge_l"] >= 100.0 / len(records)  # at least one perfect answer
    rows = _predictions(tmp_path, 5)
    assert [(row["id"], row["seed"], row["prediction"]) for row in rows] == [
        (p.id, p.seed, p.prediction) for p in expected.predictions
    ]
    state = json.loads((tmp_path / "dev_eval.json").read_text())
    assert state["scores"] == {"5": metrics["eval/rouge_l"]}


def test_max_records_evaluates_a_prefix(model_and_tokenizer, records, tmp_path):
    model, tokenizer = model_and_tokenizer
    evaluator = _evaluator(tokenizer, records, tmp_path, max_records=2)
    evaluator.evaluate(model, step=1)
    rows = (tmp_path / "dev_predictions" / "step_1.jsonl").read_text().splitlines()
    assert [json.loads(row)["id"] for row in rows] == [records[0].id, records[1].id]


def _observe(evaluator: DevEvaluator, step: int, score: float) -> None:
    evaluator.observe(step, {"eval/rouge_l": score, "eval/exact_match": 0.0})


def test_best_k_rotation_keeps_the_highest_scores(model_and_tokenizer, records, tmp_path):
    evaluator = _evaluator(model_and_tokenizer[1], records, tmp_path, keep_best=2)
    deleted, kept_steps = [], []
    for step, score in [(1, 10.0), (2, 30.0), (3, 20.0), (4, 40.0), (5, 5.0), (6, 30.0)]:
        _observe(evaluator, step, score)
        if evaluator.should_keep({"eval/rouge_l": score}):
            kept_steps.append(step)
            evaluator.register_checkpoint(step, tmp_path / f"step_{step}")
        deleted += evaluator.paths_to_delete()
    # 5.0 never enters; 30.0 at step 6 ties the kept 30.0 (step 2) and does not displace it.
    assert kept_steps == [1, 2, 3, 4]
    assert deleted == [tmp_path / "step_1", tmp_path / "step_3"]
    assert [kept.step for kept in evaluator.kept] == [4, 2]
    assert evaluator.best_checkpoint == tmp_path / "step_4"
    assert evaluator.paths_to_delete() == []  # each path is handed out once


def test_keep_best_zero_keeps_nothing(model_and_tokenizer, records, tmp_path):
    evaluator = _evaluator(model_and_tokenizer[1], records, tmp_path, keep_best=0)
    _observe(evaluator, 1, 50.0)
    assert not evaluator.should_keep({"rouge_l": 50.0})


def test_early_stopping_counts_evaluations_without_improvement(
    model_and_tokenizer, records, tmp_path
):
    evaluator = _evaluator(model_and_tokenizer[1], records, tmp_path, early_stopping_patience=2)
    stops = []
    for step, score in enumerate([10.0, 20.0, 20.0, 25.0, 24.0, 3.0, 30.0], start=1):
        _observe(evaluator, step, score)
        stops.append(evaluator.should_stop)
    # An equal score is no improvement; 25 resets the count; two misses (24, 3) stop the run.
    assert stops == [False, False, False, False, False, True, False]
    no_patience = _evaluator(model_and_tokenizer[1], records, tmp_path / "b")
    for step in range(1, 6):
        _observe(no_patience, step, 1.0)
    assert not no_patience.should_stop


def test_state_round_trip_resumes_the_bookkeeping(model_and_tokenizer, records, tmp_path):
    tokenizer = model_and_tokenizer[1]
    first = _evaluator(tokenizer, records, tmp_path, keep_best=1, early_stopping_patience=2)
    for step, score in [(1, 30.0), (2, 10.0)]:
        _observe(first, step, score)
        if first.should_keep({"rouge_l": score}):
            first.register_checkpoint(step, tmp_path / f"step_{step}")
    resumed = _evaluator(tokenizer, records, tmp_path, keep_best=1, early_stopping_patience=2)
    resumed.load_state_dict(json.loads((tmp_path / "dev_eval.json").read_text()))
    assert resumed.kept == first.kept and resumed.best_score == 30.0
    _observe(resumed, 3, 20.0)
    assert resumed.should_stop and not resumed.should_keep({"rouge_l": 20.0})


def test_registering_without_an_evaluation_is_refused(model_and_tokenizer, records, tmp_path):
    evaluator = _evaluator(model_and_tokenizer[1], records, tmp_path)
    with pytest.raises(ValueError, match="no dev evaluation at step 3"):
        evaluator.register_checkpoint(3, tmp_path / "step_3")


def test_bad_inputs_are_one_clear_line(model_and_tokenizer, records, tmp_path):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(EvalInputError, match="data.dev_file: no dev records"):
        _evaluator(tokenizer, [], tmp_path)
    with pytest.raises(EvalInputError, match="unknown template 'markdown'"):
        DevEvaluator(
            EvalConfig(), records, tokenizer, template="markdown", max_prompt_tokens=64,
            output_dir=tmp_path, is_main=True, steps_per_epoch=1,
        )  # fmt: skip
    too_long = _evaluator(tokenizer, records, tmp_path, max_new_tokens=100)
    with pytest.raises(EvalInputError, match=r"= 164 exceeds the student's 128 positions") as info:
        too_long.evaluate(model, step=1)
    assert "\n" not in str(info.value)
