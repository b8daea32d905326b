"""Evaluation metrics: ROUGE-L, answer extraction, exact match, aggregation over seeds.

ROUGE-L is the paper's metric (F-measure with the Porter stemmer, x100, max over references),
computed with the ``rouge_score`` package the DSKD/MiniLLM evaluation uses, so numbers are
comparable with theirs. Exact match is for reasoning tasks (e.g. the synthetic arithmetic
benchmark): the answer is pulled out of a free-form (possibly chain-of-thought) generation and
compared numerically when both sides are numbers.
"""

from __future__ import annotations

import math
import re
import statistics
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from rouge_score import rouge_scorer

from cot2align_ds.data.answers import canonical_number, extract_answer, parse_number
from cot2align_ds.errors import UserError


class EvalInputError(UserError):
    """Evaluation input is unusable (no references, no gold answer, missing field)."""


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    # Building the scorer loads the stemmer; one shared instance is enough (it is stateless).
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str):
        raise EvalInputError("references must be a list of strings, not one string")
    if not references:
        raise EvalInputError("empty references: every example needs at least one gold answer")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F (stemmed) x 100 of ``prediction``, the max over ``references``."""
    _check_references(references)
    score = _rouge_scorer().score_multi(list(references), prediction)["rougeL"]
    return 100.0 * score.fmeasure


def normalize_answer(text: str) -> str:
    """Canonical number if ``text`` is one; else lowercased, no punctuation/articles/extra spaces."""
    value = parse_number(text)
    if value is not None:
        return canonical_number(value)
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION_TABLE))
    return " ".join(text.split())


def _answers_match(predicted: str, reference: str) -> bool:
    predicted_value, reference_value = parse_number(predicted), parse_number(reference)
    if predicted_value is not None and reference_value is not None:
        return predicted_value == reference_value  # Decimal: 3.50 == 3.5
    return normalize_answer(predicted) == normalize_answer(reference)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the answer extracted from ``prediction`` matches any reference, else 0."""
    _check_references(references)
    predicted = extract_answer(prediction)
    return 100.0 if any(_answers_match(predicted, ref) for ref in references) else 0.0


MetricFn = Callable[[str, Sequence[str]], float]
METRICS: dict[str, MetricFn] = {"rouge_l": rouge_l, "exact_match": exact_match}


def get_metric(name: str) -> MetricFn:
    if name not in METRICS:
        raise EvalInputError(f"unknown metric '{name}'; choose from {sorted(METRICS)}")
    return METRICS[name]


@dataclass(frozen=True)
class SeedStats:
    """A metric over several seeds: mean, sample standard deviation and the per-seed values."""

    mean: float
    std: float
    per_seed: list[float]

    def to_dict(self) -> dict[str, float | list[float]]:
        return {"mean": self.mean, "std": self.std, "per_seed": list(self.per_seed)}


def aggregate_seeds(values: Sequence[float]) -> SeedStats:
    """Mean and sample std (n - 1, as papers report over seeds); one seed -> std 0.0."""
    if not values:
        raise EvalInputError("no per-seed values to aggregate")
    values = [float(value) for value in values]
    if any(math.isnan(value) for value in values):
        raise EvalInputError(f"per-seed values contain NaN: {values}")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return SeedStats(mean=statistics.fmean(values), std=std, per_seed=values)
