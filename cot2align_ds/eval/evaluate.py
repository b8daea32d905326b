"""Evaluation runs: generate on standard prompts, score, aggregate over seeds, write files.

The paper's protocol (docs/method.md section 5): standard prompts only, sampling with temperature 1,
top_p 1, no top-k, no-repeat n-gram 6, ROUGE-L F x 100, mean and sample std over seeds
10..50. Greedy decoding is deterministic, so it runs once whatever the seeds. Models are loaded
by ``inference/loading.py``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cot2align_ds.atomic import write_jsonl_atomic, write_text_atomic
from cot2align_ds.data.answers import extract_answer
from cot2align_ds.data.records import Record
from cot2align_ds.data.templates import CHAT, cot_prompt, standard_prompt
from cot2align_ds.eval.metrics import EvalInputError, SeedStats, aggregate_seeds, get_metric
from cot2align_ds.inference.generation import DecodingConfig, generate

EVAL_RESULTS_FILENAME = "eval_results.json"
PAPER_SEEDS = (10, 20, 30, 40, 50)


@dataclass(frozen=True)
class Prediction:
    """One generation for one record under one seed (``seed`` is None for greedy)."""

    id: str
    seed: int | None
    prompt: str
    prediction: str
    references: list[str]
    extracted_answer: str
    scores: dict[str, float]


@dataclass(frozen=True)
class EvalResult:
    """Per-metric statistics over seeds, the seeds that ran, and every prediction."""

    scores: dict[str, SeedStats]
    seeds: list[int | None]
    predictions: list[Prediction]

    def summary(self) -> dict[str, dict]:
        """The ``eval_results.json`` shape: ``{metric: {"mean", "std", "per_seed"}}``."""
        return {name: stats.to_dict() for name, stats in self.scores.items()}


def _references_for(
    records: Sequence[Record], references: Sequence[Sequence[str]] | None
) -> list[list[str]]:
    """Gold answers per record (its ``output`` unless given); fail before any generation."""
    if not records:
        raise EvalInputError("no records to evaluate")
    if references is not None and len(references) != len(records):
        raise EvalInputError(f"{len(references)} reference lists for {len(records)} records")
    gold = []
    for index, record in enumerate(records):
        if references is None and not record.output.strip():
            raise EvalInputError(
                f"record '{record.id}' has an empty 'output'; every evaluated record needs a "
                "gold answer"
            )
        refs = [record.output] if references is None else list(references[index])
        if not refs or not any(ref.strip() for ref in refs):
            raise EvalInputError(f"record '{record.id}': empty references")
        gold.append(refs)
    return gold


def _seeds_to_run(seeds: Sequence[int], greedy: bool) -> list[int | None]:
    if greedy:
        return [None]
    if not seeds:
        raise EvalInputError("sampling evaluation needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise EvalInputError(f"duplicate seeds {list(seeds)}: they would repeat the same run")
    return list(seeds)


def _score(prediction: str, references: list[str], metric_names: Sequence[str]) -> dict[str, float]:
    return {name: get_metric(name)(prediction, references) for name in metric_names}


def evaluate_records(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    *,
    template: str = "alpaca",
    seeds: Sequence[int] = PAPER_SEEDS,
    greedy: bool = False,
    metrics: Sequence[str] = ("rouge_l", "exact_match"),
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_prompt_tokens: int | None = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = 6,
    references: Sequence[Sequence[str]] | None = None,
    show_progress: bool = False,
    prompt_view: str = "standard",
    max_length: int | None = None,
    prompt_cut: str = "left",
    prompt_special_tokens: bool = True,
) -> EvalResult:
    """Generate for every record's standard prompt under each seed and score the outputs.

    ``references`` overrides the gold answers (one list per record; default ``[record.output]``).
    ``max_length`` caps prompt + new tokens (the reference's 512); ``prompt_cut`` and
    ``prompt_special_tokens`` as in training (``data.prompt_truncation`` and its neighbour).
    ``prompt_view="cot"`` prompts with the CoT template instead (a diagnostic: the paper's
    protocol is standard prompts); the answer is then read after "the answer is".
    Each seed's metric value is the mean over records; ``scores`` aggregates them over seeds.
    """
    for name in metrics:
        get_metric(name)  # unknown metric names fail before the (slow) generation
    gold = _references_for(records, references)
    run_seeds = _seeds_to_run(seeds, greedy)
    decoding = DecodingConfig(
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        no_repeat_ngram_size=no_repeat_ngram_size,
        max_prompt_tokens=max_prompt_tokens,
        max_length=max_length,
        prompt_cut=prompt_cut,
        # A chat template writes its own BOS.
        prompt_special_tokens=prompt_special_tokens and template != CHAT,
    )
    if prompt_view not in ("standard", "cot"):
        raise ValueError(f"prompt_view must be 'standard' or 'cot', got {prompt_view!r}")
    make_prompt = cot_prompt if prompt_view == "cot" else standard_prompt
    prompts = [make_prompt(record, template, tokenizer) for record in records]
    predictions: list[Prediction] = []
    for seed in run_seeds:
        texts = generate(
            model,
            tokenizer,
            prompts,
            decoding,
            seed=0 if seed is None else seed,
            batch_size=batch_size,
            show_progress=show_progress,
        )
        for record, prompt, text, refs in zip(records, prompts, texts, gold, strict=True):
            scores = _score(text, refs, metrics)
            predictions.append(
                Prediction(record.id, seed, prompt, text, refs, extract_answer(text), scores)
            )
    return EvalResult(_aggregate(predictions, metrics), run_seeds, predictions)


def _aggregate(predictions: Sequence[Prediction], metrics: Sequence[str]) -> dict[str, SeedStats]:
    """Per metric: mean over records within each seed, then mean/std over seeds."""
    by_seed: dict[int | None, list[Prediction]] = defaultdict(list)
    for prediction in predictions:
        by_seed[prediction.seed].append(prediction)
    scores = {}
    for name in metrics:
        per_seed = [sum(p.scores[name] for p in group) / len(group) for group in by_seed.values()]
        scores[name] = aggregate_seeds(per_seed)
    return scores


def write_predictions(path: str | Path, result: EvalResult) -> None:
    """One JSON line per (record, seed): id, seed, prompt, prediction, references, answer."""
    write_jsonl_atomic(path, (asdict(prediction) for prediction in result.predictions))


def write_eval_results(path: str | Path, result: EvalResult) -> None:
    """``{metric: {"mean", "std", "per_seed"}}`` as JSON, written atomically (read by report)."""
    write_text_atomic(path, json.dumps(result.summary(), indent=2) + "\n")
