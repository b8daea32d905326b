"""Publish a run's best model as a plain Hugging Face directory (safetensors + tokenizer).

A fine-tuned teacher feeds two later steps, ``cot2align augment`` and distillation
(``teacher.name_or_path``), and the paper keeps the best dev checkpoint, not the last epoch.
Best checkpoints are ZeRO shards (``best_checkpoints/``); ``publish_best_model`` consolidates the
best one, merging LoRA adapters, into ``<run>/<name>/``. Without a kept checkpoint (no dev
evaluation), ``<run>/<name>`` is a relative link to the final ``student/`` model, so the path
that later steps read is the same either way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cot2align_ds.inference.loading import load_model_for_eval
from cot2align_ds.run_dir import FINAL_MODEL_DIRNAME, best_model_dir

# Training precision -> the dtype the published weights are saved in.
_SAVE_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def publish_best_model(run_dir: Path, name: str, precision: str) -> tuple[Path, bool]:
    """``<run_dir>/<name>``: the best dev checkpoint, else a link to the final model.

    Returns the path and whether it holds the best checkpoint. A previous ``<name>`` is replaced
    only once the new one is complete.
    """
    run_dir = Path(run_dir)
    source = best_model_dir(run_dir)
    target = run_dir / name
    staging = run_dir / f".{name}.partial-{os.getpid()}"
    _remove(staging)
    is_best = source.resolve() != (run_dir / FINAL_MODEL_DIRNAME).resolve()
    if is_best:
        model, tokenizer = load_model_for_eval(source, dtype=_SAVE_DTYPE[precision])
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    else:
        staging.symlink_to(os.path.relpath(source, run_dir))
    _remove(target)
    os.replace(staging, target)
    return target, is_best


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
