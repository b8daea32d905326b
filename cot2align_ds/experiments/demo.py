"""The embedded demo: a complete cross-tokenizer distillation, offline, on CPU.

1. Generate synthetic arithmetic word problems with gold rationales (train/dev/test).
2. Train two genuinely different tokenizers: byte-level BPE (teacher), Unigram (student).
3. Fine-tune a tiny Llama-style teacher on standard and CoT views (DeepSpeed ZeRO-3).
4. Train the student alone (SFT) and distill it from the teacher (ULD) through both engines:
   ZeRO-3 student training engine + ZeRO-3 inference-only teacher with CPU-offloaded params.
5. CoT augmentation with the fine-tuned teacher, then ULD + CoT2Align on its rationales.
6. Evaluate exact match on held-out problems with standard prompts and print the table.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.config import ConfigError, load_config, validate_config
from cot2align_ds.data.augment import run_augment
from cot2align_ds.data.examples import make_examples
from cot2align_ds.data.records import Record, read_records, write_records
from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
from cot2align_ds.methods import METHODS
from cot2align_ds.models.toy_tokenizers import train_byte_bpe, train_unigram
from cot2align_ds.train.loop import run_train

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


@dataclass(frozen=True)
class DemoSize:
    num_train: int
    num_test: int
    teacher_epochs: int
    student_epochs: int
    max_steps: int | None


FULL = DemoSize(num_train=1500, num_test=200, teacher_epochs=4, student_epochs=3, max_steps=None)
QUICK = DemoSize(num_train=240, num_test=24, teacher_epochs=1, student_epochs=1, max_steps=6)
TASK = ArithmeticTaskSpec(num_steps=2, max_start=9, max_operand=5)


def make_data(out: Path, size: DemoSize, seed: int) -> dict[str, Path]:
    splits = {
        "train": make_split(size.num_train, TASK, seed, "train"),
        "dev": make_split(max(size.num_test // 2, 8), TASK, seed + 1, "dev"),
        "test": make_split(size.num_test, TASK, seed + 2, "test"),
    }
    return write_splits(out, splits)


def write_splits(out: Path, splits: dict[str, list[Record]]) -> dict[str, Path]:
    """Each split to ``out/data/<name>.jsonl``; the paths by split name."""
    paths = {name: out / "data" / f"{name}.jsonl" for name in splits}
    for name, records in splits.items():
        write_records(paths[name], records)
    return paths


def tokenizer_corpus(records: list[Record], template: str) -> list[str]:
    examples = make_examples(records, template=template, cot_records="all")
    return [f"{example.prompt}{example.answer}" for example in examples]


def make_tokenizers(out: Path, records: list[Record], template: str) -> dict[str, Path]:
    corpus = tokenizer_corpus(records, template)
    paths = {"teacher": out / "tokenizers" / "teacher", "student": out / "tokenizers" / "student"}
    train_byte_bpe(corpus, vocab_size=600).save_pretrained(paths["teacher"])
    train_unigram(corpus, vocab_size=400).save_pretrained(paths["student"])
    return paths


def stage_config(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    config = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


# The teacher-using methods that work across tokenizers: the demo's pair has two.
DIFFERENT_VOCAB_METHODS = tuple(
    m.name for m in METHODS.values() if m.needs_teacher and m.cross_tokenizer
)


def run_demo(
    output_dir: Path,
    *,
    quick: bool = False,
    seed: int = 42,
    methods: tuple[str, ...] = ("uld",),
    cot2align_base: str = "uld",
) -> dict[str, dict]:
    """``methods``: base KD methods distilled in their own row; ``cot2align_base``: the one
    that also gets a "+ CoT2Align" row (trained on the teacher's own rationales)."""
    from cot2align_ds.eval.evaluate import evaluate_records, write_predictions
    from cot2align_ds.inference.loading import load_model_for_eval

    size = QUICK if quick else FULL
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    base = load_config("demo").model_dump(mode="json")
    template = base["data"]["template"]
    data = make_data(output_dir, size, seed)
    tokenizers = make_tokenizers(output_dir, read_records(data["train"]), template)
    common = {
        "data__train_file": str(data["train"]),
        "data__dev_file": str(data["dev"]),
        "train__max_steps": size.max_steps,
        "train__seed": seed,
    }
    teacher_dir = output_dir / "teacher"
    stages = {
        "teacher": stage_config(
            base,
            output_dir=str(teacher_dir),
            student={"architecture": TEACHER_ARCHITECTURE, "tokenizer": str(tokenizers["teacher"])},
            teacher=None,
            distill__method="sft",
            data__cot_records="all",
            train__epochs=size.teacher_epochs,
            **common,
        ),
        "student_sft": stage_config(
            base,
            output_dir=str(output_dir / "student_sft"),
            student__tokenizer=str(tokenizers["student"]),
            teacher=None,
            distill__method="sft",
            train__epochs=size.student_epochs,
            **common,
        ),
    }
    for method in dict.fromkeys((*methods, cot2align_base)):
        if method not in DIFFERENT_VOCAB_METHODS:
            raise ConfigError(
                f"--methods: '{method}' does not work across tokenizers; choose from "
                f"{', '.join(DIFFERENT_VOCAB_METHODS)}"
            )
        stages[f"student_{method}"] = stage_config(
            base,
            output_dir=str(output_dir / f"student_{method}"),
            student__tokenizer=str(tokenizers["student"]),
            teacher={"name_or_path": str(teacher_dir / "student")},
            distill__method=method,
            train__epochs=size.student_epochs,
            **common,
        )
    model_dirs = {}
    for name, raw in stages.items():
        config = validate_config(raw, f"demo stage {name}")
        model_dirs[name] = run_train(config, overwrite=True).model_dir
    # CoT augmentation: the fine-tuned teacher writes its own rationales; CoT2Align trains on
    # them (paired standard/CoT views, OT on main and Cross-CoT pairs) on top of the base.
    cot_data = run_augment(
        model_dirs["teacher"],
        data["train"],
        output_dir / "augment",
        template=template,
        selection="all",
        max_prompt_tokens=base["data"]["max_prompt_tokens"],
        max_total_tokens=base["data"]["max_total_tokens"],
        batch_size=64,
        seed=seed,
        show_progress=False,
    ).output_file
    name = f"student_{cot2align_base}_cot2align"
    cot2align_stage = stage_config(
        stages[f"student_{cot2align_base}"],
        output_dir=str(output_dir / name),
        data__train_file=str(cot_data),
        data__cot_records="all",
        cot2align__enabled=True,
    )
    config = validate_config(cot2align_stage, f"demo stage {name}")
    model_dirs[name] = run_train(config, overwrite=True).model_dir
    test = read_records(data["test"])
    results = {}
    for name, model_dir in model_dirs.items():
        model, tokenizer = load_model_for_eval(model_dir)
        result = evaluate_records(
            model,
            tokenizer,
            test,
            template=template,
            seeds=[seed],
            greedy=True,
            metrics=("exact_match",),
            batch_size=32,
            max_new_tokens=8,
            max_prompt_tokens=base["data"]["max_prompt_tokens"],
        )
        write_predictions(output_dir / name / "test_predictions.jsonl", result)
        results[name] = {"exact_match": result.summary()["exact_match"]["mean"]}
    results["_meta"] = {"wall_s": time.perf_counter() - started, "quick": quick}
    write_text_atomic(output_dir / "demo_results.json", json.dumps(results, indent=2))
    return results
