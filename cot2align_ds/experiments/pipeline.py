"""The pipeline every experiment runs: fine-tune the teacher, let it write rationales, distil the
student, evaluate. The demos, the reasoning benchmark and ``cot2align sft-teacher`` build their
stages from these pieces, so the stages are the same wherever they run.

Stage configs are plain dicts (a validated ``RunConfig`` dumped to JSON) changed with
``stage_config``, so one base recipe yields every stage.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from cot2align_ds.config import validate_config
from cot2align_ds.data.augment import AugmentResult, run_augment
from cot2align_ds.data.examples import make_examples
from cot2align_ds.data.records import Record, read_records, write_records
from cot2align_ds.models.toy_tokenizers import train_byte_bpe, train_unigram
from cot2align_ds.train.loop import run_train

# The toy pipelines' teacher: a small Llama-style model, trained from scratch in minutes on CPU.
TEACHER_ARCHITECTURE = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def stage_config(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` with ``section__key=value`` changes (``key=value`` for whole keys)."""
    config = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


def teacher_sft_stage(base: dict[str, Any], teacher: dict[str, Any], **changes: Any) -> dict:
    """The teacher (a model spec dict) trained alone, cross-entropy only, in the student's
    place: the first stage of every pipeline."""
    return stage_config(
        base,
        student=teacher,
        teacher=None,
        distill__method="sft",
        cot2align__enabled=False,
        **changes,
    )


def run_stage(raw: dict[str, Any], where: str) -> tuple[Path, float]:
    """Validate and train one stage (its output directory overwritten); the saved model's
    directory and the wall time in seconds."""
    started = time.perf_counter()
    model_dir = run_train(validate_config(raw, where), overwrite=True).model_dir
    return model_dir, time.perf_counter() - started


def augment_stage(
    teacher_dir: Path, train_file: Path, out_dir: Path, base: dict[str, Any], *, seed: int
) -> AugmentResult:
    """The tuned teacher writes a rationale for every training record (``selection="all"``),
    with the recipe's template, length limits and n-gram rule (``eval.no_repeat_ngram_size``:
    the decoding the recipe scores with is the one its rationales are written with)."""
    return run_augment(
        teacher_dir,
        train_file,
        out_dir,
        template=base["data"]["template"],
        selection="all",
        max_prompt_tokens=base["data"]["max_prompt_tokens"],
        max_total_tokens=base["data"]["max_total_tokens"],
        no_repeat_ngram_size=base["eval"]["no_repeat_ngram_size"],
        batch_size=64,
        seed=seed,
        show_progress=False,
    )


def exact_match_stage(
    model_dir: Path,
    records: list[Record],
    base: dict[str, Any],
    predictions_file: Path,
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    prompt_view: str = "standard",
) -> float:
    """Greedy exact match (%) of a saved model on ``records``, with the recipe's n-gram rule
    (``eval.no_repeat_ngram_size``); the predictions are kept."""
    from cot2align_ds.eval.evaluate import evaluate_records, write_predictions
    from cot2align_ds.inference.loading import load_model_for_eval

    model, tokenizer = load_model_for_eval(model_dir)
    result = evaluate_records(
        model,
        tokenizer,
        records,
        template=base["data"]["template"],
        greedy=True,
        metrics=("exact_match",),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=base["data"]["max_prompt_tokens"],
        no_repeat_ngram_size=base["eval"]["no_repeat_ngram_size"],
        prompt_view=prompt_view,
    )
    write_predictions(predictions_file, result)
    return result.summary()["exact_match"]["mean"]


def write_splits(out: Path, splits: dict[str, list[Record]]) -> dict[str, Path]:
    """Each split to ``out/data/<name>.jsonl``; the paths by split name."""
    paths = {name: out / "data" / f"{name}.jsonl" for name in splits}
    for name, records in splits.items():
        write_records(paths[name], records)
    return paths


def tokenizer_corpus(records: list[Record], template: str) -> list[str]:
    examples = make_examples(records, template=template, cot_records="all")
    return [f"{example.prompt}{example.answer}" for example in examples]


def make_tokenizers(out: Path, train_file: Path, template: str) -> dict[str, Path]:
    """Two genuinely different toy tokenizers trained on the training texts: byte-level BPE
    (teacher) and Unigram (student)."""
    corpus = tokenizer_corpus(read_records(train_file), template)
    paths = {"teacher": out / "tokenizers" / "teacher", "student": out / "tokenizers" / "student"}
    train_byte_bpe(corpus, vocab_size=600).save_pretrained(paths["teacher"])
    train_unigram(corpus, vocab_size=400).save_pretrained(paths["student"])
    return paths
