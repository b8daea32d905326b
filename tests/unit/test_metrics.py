"""ROUGE-L, answer extraction, exact match and aggregation over seeds."""

from __future__ import annotations

import pytest

from cot2align_ds.data.answers import extract_answer, parse_number
from cot2align_ds.data.templates import COT_ANSWER_JOINER, cot_answer
from cot2align_ds.eval.metrics import (
    EvalInputError,
    aggregate_seeds,
    exact_match,
    normalize_answer,
    rouge_l,
)


def test_rouge_l_hand_checked_lcs() -> None:
    # prediction: the cat sat on the mat (6 tokens); reference: the cat is on the mat (6)
    # LCS = the cat on the mat = 5 -> P = R = 5/6 -> F = 5/6 = 83.33
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(500 / 6)


def test_rouge_l_uses_the_stemmer() -> None:
    # Tokens longer than 3 characters are Porter-stemmed: "running dogs" -> [run, dog],
    # "the dog runs" -> [the, dog, run]. LCS = 1 (either "run" or "dog"; their order differs).
    # P = 1/2, R = 1/3, F = 2 * (1/6) / (5/6) = 0.4 -> 40. Without stemming nothing matches.
    assert rouge_l("running dogs", ["the dog runs"]) == pytest.approx(40.0)


def test_rouge_l_lowercases_and_drops_punctuation() -> None:
    # Tokens: [hello, world] against [hello, world]: LCS 2 of 2 -> F = 1 -> 100.
    assert rouge_l("Hello, World!", ["hello world"]) == pytest.approx(100.0)


def test_rouge_l_takes_the_max_over_references() -> None:
    # vs "a b c d": LCS "a b" = 2, P = 2/2, R = 2/4, F = 2 * 0.5 / 1.5 = 2/3 -> 66.67;
    # vs "x y": LCS 0 -> 0. The max is 66.67, not the mean 33.33.
    assert rouge_l("a b", ["x y", "a b c d"]) == pytest.approx(200 / 3)


def test_rouge_l_of_an_empty_prediction_is_zero() -> None:
    assert rouge_l("", ["something"]) == 0.0


@pytest.mark.parametrize("references", [[], "a plain string"])
def test_metrics_reject_bad_references(references) -> None:
    for metric in (rouge_l, exact_match):
        with pytest.raises(EvalInputError, match="references"):
            metric("text", references)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (cot_answer("3 + 4 = 7. 7 - 2 = 5.", "5"), "5"),
        ("Step 1,234 is large.\nTherefore, the answer is: 1,234 apples.", "1234"),
        ("They owe -12 dollars, so the answer is -12", "-12"),
        ("The total is $3.50.", "3.5"),
        ("Therefore, the answer is: 12. Later she had 15.", "12"),  # the joiner wins over last
        ("First 3, then 8, finally 21.", "21"),  # no joiner: last number, period dropped
        ("pages 3-5", "5"),  # a hyphen between digits is not a minus sign
        ("the answer is: .5", "0.5"),
        ("1,2345", "2345"),  # not a thousands group: two numbers
        ("Therefore, the answer is: Paris.\nExtra text", "Paris"),
        ("no digits at all", "no digits at all"),
        ("THE ANSWER IS 7", "7"),
        ("x = -0", "0"),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_follows_the_cot_joiner() -> None:
    # The CoT answer format used in training must be the one the extractor looks for.
    assert extract_answer("rationale 99" + COT_ANSWER_JOINER + "42") == "42"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1,234", "1234"), ("$3.50.", "3.50"), ("-7", "-7"), ("50%", "50"), ("7 apples", None)],
)
def test_parse_number(text: str, value: str | None) -> None:
    parsed = parse_number(text)
    assert (None if parsed is None else str(parsed)) == value


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("3.50", ["3.5"], 100.0),
        ("So the answer is 1,234.", ["1234"], 100.0),
        ("It costs $12", ["12"], 100.0),
        ("-5", ["5"], 0.0),
        ("Therefore, the answer is: The Paris.", ["paris"], 100.0),
        ("Therefore, the answer is: London", ["paris", "london"], 100.0),
        ("Therefore, the answer is: Lyon", ["paris"], 0.0),
    ],
)
def test_exact_match(prediction: str, references: list[str], expected: float) -> None:
    assert exact_match(prediction, references) == expected


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Eiffel tower! ") == "eiffel tower"
    assert normalize_answer("4.0") == "4"


def test_aggregate_seeds_mean_and_sample_std() -> None:
    # mean 20; sample variance ((-10)^2 + 0 + 10^2) / (3 - 1) = 100 -> std 10.
    stats = aggregate_seeds([10.0, 20.0, 30.0])
    assert (stats.mean, stats.std, stats.per_seed) == (20.0, 10.0, [10.0, 20.0, 30.0])
    assert stats.to_dict() == {"mean": 20.0, "std": 10.0, "per_seed": [10.0, 20.0, 30.0]}


def test_aggregate_one_seed_has_zero_std() -> None:
    assert aggregate_seeds([42.5]).std == 0.0
    assert aggregate_seeds([42.5]).mean == 42.5


def test_aggregate_rejects_empty_and_nan() -> None:
    with pytest.raises(EvalInputError, match="no per-seed values"):
        aggregate_seeds([])
    with pytest.raises(EvalInputError, match="NaN"):
        aggregate_seeds([1.0, float("nan")])
