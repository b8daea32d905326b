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

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.config import ConfigError, load_config
from cot2align_ds.data.records import read_records
from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
from cot2align_ds.eval.evaluate import EVAL_RESULTS_FILENAME
from cot2align_ds.eval.export import export_model
from cot2align_ds.eval.metrics import aggregate_seeds
from cot2align_ds.experiments.pipeline import (
    TEACHER_ARCHITECTURE,
    augment_stage,
    exact_match_stage,
    make_tokenizers,
    run_stage,
    stage_config,
    teacher_sft_stage,
    write_splits,
)
from cot2align_ds.methods import METHODS


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


# The teacher-using methods that work across tokenizers: the demo's pair has two.
DIFFERENT_VOCAB_METHODS = tuple(
    m.name for m in METHODS.values() if m.needs_teacher and m.cross_tokenizer
)


@contextlib.contextmanager
def _stage(title: str, timings: dict[str, float]):
    """A header before a stage and its wall time after (stderr, beside the libraries' logs)."""
    print(f"== demo {title}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    timings[title] = time.perf_counter() - started
    print(f"   {timings[title]:.1f} s", file=sys.stderr, flush=True)


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

    size = QUICK if quick else FULL
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    base = load_config("demo").model_dump(mode="json")
    template = base["data"]["template"]
    data = make_data(output_dir, size, seed)
    tokenizers = make_tokenizers(output_dir, data["train"], template)
    common = {
        "data__train_file": str(data["train"]),
        "data__dev_file": str(data["dev"]),
        "train__max_steps": size.max_steps,
        "train__seed": seed,
    }
    # The teacher's fine-tuning run lives in teacher_finetune/; the model it produced is
    # exported to teacher/, which the students distil from (a run keeps its model in student/).
    teacher_dir = output_dir / "teacher"
    run_dirs = {"teacher": output_dir / "teacher_finetune"}
    stages = {
        "teacher": teacher_sft_stage(
            base,
            {"architecture": TEACHER_ARCHITECTURE, "tokenizer": str(tokenizers["teacher"])},
            output_dir=str(run_dirs["teacher"]),
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
            teacher={"name_or_path": str(teacher_dir)},
            distill__method=method,
            train__epochs=size.student_epochs,
            **common,
        )
    timings: dict[str, float] = {}
    total = len(stages) + 3  # + augmentation, CoT2Align, evaluation
    model_dirs = {}
    for index, (name, raw) in enumerate(stages.items(), start=1):
        with _stage(f"[{index}/{total}] train {name}", timings):
            model_dirs[name] = run_stage(raw, f"demo stage {name}")[0]
            if name == "teacher":
                export_model(run_dirs[name], teacher_dir, last=True, overwrite=True)
                model_dirs[name] = teacher_dir
    # CoT augmentation: the fine-tuned teacher writes its own rationales; CoT2Align trains on
    # them (paired standard/CoT views, OT on main and Cross-CoT pairs) on top of the base.
    with _stage(f"[{len(stages) + 1}/{total}] the teacher writes rationales", timings):
        cot_data = augment_stage(
            model_dirs["teacher"], data["train"], output_dir / "augment", base, seed=seed
        ).output_file
    name = f"student_{cot2align_base}_cot2align"
    cot2align_stage = stage_config(
        stages[f"student_{cot2align_base}"],
        output_dir=str(output_dir / name),
        data__train_file=str(cot_data),
        data__cot_records="all",
        cot2align__enabled=True,
    )
    with _stage(f"[{len(stages) + 2}/{total}] train {name}", timings):
        model_dirs[name] = run_stage(cot2align_stage, f"demo stage {name}")[0]
    test = read_records(data["test"])
    results = {}
    with _stage(f"[{total}/{total}] exact match on held-out problems", timings):
        for name, model_dir in model_dirs.items():
            run_dir = run_dirs.get(name, output_dir / name)
            score = exact_match_stage(
                model_dir, test, base, run_dir / "test_predictions.jsonl", max_new_tokens=8,
                batch_size=32,
            )  # fmt: skip
            results[name] = {"exact_match": score}
            # In the layout `cot2align eval` writes, so `cot2align report` shows the scores.
            summary = {"exact_match": aggregate_seeds([score]).to_dict()}
            write_text_atomic(run_dir / EVAL_RESULTS_FILENAME, json.dumps(summary, indent=2))
    results["_meta"] = {
        "wall_s": time.perf_counter() - started,
        "quick": quick,
        "stage_s": timings,
        "max_steps": size.max_steps,
        "train_problems": size.num_train,
        # Each row's run directory, relative to output_dir: `cot2align report` reads them.
        "run_dirs": {name: run_dirs.get(name, output_dir / name).name for name in model_dirs},
    }
    write_text_atomic(output_dir / "demo_results.json", json.dumps(results, indent=2))
    return results
