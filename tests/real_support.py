"""Helpers of the real-model tier (tests/real): model names and run configs."""

from __future__ import annotations

import shutil
from pathlib import Path

GEMMA, SMOLLM2 = "gemma3-270m", "smollm2-135m-instruct"


def seed_vocab_map(cache: Path, output_dir: Path) -> None:
    shutil.copytree(cache, output_dir / "vocab_map_cache", dirs_exist_ok=True)


def real_run_config(
    real_models: dict[str, Path],
    train_file: Path,
    output_dir: Path,
    *,
    teacher: str = GEMMA,
    student: str = SMOLLM2,
    method: str = "uld",
    cot2align: bool = False,
    **train,
) -> dict:
    """A bf16 run through both DeepSpeed engines (ZeRO-3 student, offloaded ZeRO-3 teacher) on
    short word problems: micro-batch 2 holds one record's standard and CoT examples."""
    return {
        "output_dir": str(output_dir),
        "student": {"name_or_path": str(real_models[student])},
        "teacher": {"name_or_path": str(real_models[teacher])},
        "data": {
            "train_file": str(train_file),
            "template": "compact",
            "max_prompt_tokens": 48,
            "max_total_tokens": 72,
            "num_workers": 0,
            "cot_records": "all" if cot2align else "none",
        },
        "distill": {"method": method, "kd_rate": 0.5, "temperature": 1.0},
        "cot2align": {"enabled": cot2align, "num_iters": 20},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2 if cot2align else 1,
            "lr": 5e-5,
            "precision": "bf16",
            "log_every": 1,
            **train,
        },
        "deepspeed": {"dist_timeout_s": 300},
    }
