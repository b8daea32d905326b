"""The evaluation and report commands: what ``cot2align eval`` and ``cot2align report`` run.

``run_eval`` checks every input (data files, metrics, seeds, decoding settings, template)
before the model loads, so a typo costs seconds, not a model load. It writes, atomically,
``predictions_<dataset>.jsonl`` per data file and ``eval_results.json``
(``{dataset: {metric: {"mean", "std", "per_seed"}}}``), rewritten after each dataset so a long
evaluation keeps what it finished.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.data.records import Record, read_records
from cot2align_ds.data.templates import TEMPLATE_NAMES
from cot2align_ds.eval.evaluate import (
    EVAL_RESULTS_FILENAME,
    PAPER_SEEDS,
    EvalResult,
    evaluate_records,
    write_predictions,
)
from cot2align_ds.eval.metrics import EvalInputError, get_metric
from cot2align_ds.eval.report import make_report
from cot2align_ds.inference.generation import DecodingConfig
from cot2align_ds.inference.loading import load_model_for_eval
from cot2align_ds.run_dir import best_model_dir, read_run_config

EVAL_ARGS_FILENAME = "eval_args.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def predictions_filename(dataset: str) -> str:
    return f"predictions_{dataset}.jsonl"


def dataset_names(data_files: Sequence[Path]) -> list[str]:
    """One filesystem-safe name per file: its stem, with the parent folder where stems clash."""
    stems = [_safe_name(path.stem) for path in data_files]
    names = [
        _safe_name(f"{path.parent.name}_{stem}") if stems.count(stem) > 1 else stem
        for path, stem in zip(data_files, stems, strict=True)
    ]
    return [
        f"{name}_{index}" if names.count(name) > 1 else name for index, name in enumerate(names)
    ]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "data"


def _check_settings(
    template: str, metrics: Sequence[str], seeds: Sequence[int], greedy: bool, batch_size: int
) -> None:
    if batch_size < 1:
        raise EvalInputError(f"batch_size must be >= 1 (got {batch_size})")
    if template not in TEMPLATE_NAMES:
        raise EvalInputError(f"unknown template '{template}'; choose from {TEMPLATE_NAMES}")
    if not metrics:
        raise EvalInputError("no metrics; choose from rouge_l, exact_match")
    for name in metrics:
        get_metric(name)
    if not greedy and not seeds:
        raise EvalInputError("sampling evaluation needs at least one seed (or pass greedy)")
    if len(set(seeds)) != len(seeds):
        raise EvalInputError(f"duplicate seeds {list(seeds)}: they would repeat the same run")


def _read_datasets(data_files: Sequence[str | Path]) -> dict[str, list[Record]]:
    if not data_files:
        raise EvalInputError("no data files to evaluate; pass at least one JSONL file")
    paths = [Path(path) for path in data_files]
    return {
        name: read_records(path) for name, path in zip(dataset_names(paths), paths, strict=True)
    }


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise EvalInputError(f"output_dir '{output_dir}' is a file; give a directory")


def print_eval_table(dataset: str, result: EvalResult, console: Console | None = None) -> None:
    """One table per dataset: mean ± sample std over seeds, and each seed's value."""
    num_records = len({prediction.id for prediction in result.predictions})
    runs = "greedy" if result.seeds == [None] else f"seeds {', '.join(map(str, result.seeds))}"
    table = Table(title=f"{dataset}: {num_records} records, {runs}")
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    table.add_column("per seed", justify="right")
    for name, stats in result.scores.items():
        per_seed = " ".join(f"{value:.2f}" for value in stats.per_seed)
        table.add_row(name, f"{stats.mean:.2f} ± {stats.std:.2f}", per_seed)
    (console or Console()).print(table)


def _resolve_dtype(dtype: str | None) -> torch.dtype | None:
    """None keeps the saved dtype; the run config's names and torch's names are accepted."""
    if dtype is None or dtype == "auto":
        return None
    value = _DTYPES.get(dtype, getattr(torch, dtype, None))
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise EvalInputError(f"dtype '{dtype}': choose fp32, bf16 or fp16 (or auto)")
    return value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_settings_of_run(run_dir: str | Path) -> tuple[Path, dict]:
    """A run's best model (``run_dir.best_model_dir``) and the evaluation settings it trained
    and evaluated with (template, prompt length, new tokens), from its ``config.json``."""
    config = read_run_config(run_dir)
    data, evaluation = config.get("data") or {}, config.get("eval") or {}
    settings = {
        "template": data.get("template"),
        "max_prompt_tokens": data.get("max_prompt_tokens"),
        "max_new_tokens": evaluation.get("max_new_tokens"),
        "max_length": evaluation.get("max_length"),
        "prompt_cut": data.get("prompt_truncation"),
        "prompt_special_tokens": data.get("prompt_special_tokens"),
    }
    return best_model_dir(Path(run_dir)), {k: v for k, v in settings.items() if v is not None}


def run_eval(
    model_path: str | Path,
    data_files: Sequence[str | Path],
    *,
    output_dir: str | Path,
    template: str = "alpaca",
    seeds: Sequence[int] = PAPER_SEEDS,
    greedy: bool = False,
    metrics: Sequence[str] = ("rouge_l", "exact_match"),
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_prompt_tokens: int = 256,
    max_length: int | None = None,
    prompt_cut: str = "left",
    prompt_special_tokens: bool = True,
    tokenizer_path: str | Path | None = None,
    base_model: str | Path | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
) -> dict[str, dict[str, dict]]:
    """Evaluate a saved model, LoRA adapter or ZeRO checkpoint on each data file.

    Returns ``{dataset: {metric: {"mean", "std", "per_seed"}}}`` (what ``eval_results.json``
    holds); the dataset name is the file's stem.
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir)
    _check_settings(template, metrics, seeds, greedy, batch_size)
    DecodingConfig(
        max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, max_length=max_length
    )
    torch_dtype = _resolve_dtype(dtype)
    datasets = _read_datasets(data_files)
    model, tokenizer = load_model_for_eval(
        model_path,
        device=device or _default_device(),
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        tokenizer_path=tokenizer_path,
        base_model=base_model,
        allow_pickle=allow_pickle,
    )
    options = {
        "template": template,
        "seeds": seeds,
        "greedy": greedy,
        "metrics": metrics,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "max_length": max_length,
        "prompt_cut": prompt_cut,
        "prompt_special_tokens": prompt_special_tokens,
    }
    _write_eval_args(output_dir, model_path, datasets, data_files, options)
    results: dict[str, dict[str, dict]] = {}
    for name, records in datasets.items():
        result = evaluate_records(model, tokenizer, records, show_progress=show_progress, **options)
        write_predictions(output_dir / predictions_filename(name), result)
        results[name] = result.summary()
        write_text_atomic(output_dir / EVAL_RESULTS_FILENAME, json.dumps(results, indent=2) + "\n")
        print_eval_table(name, result, console)
    return results


def _write_eval_args(
    output_dir: Path,
    model_path: str | Path,
    datasets: dict[str, list[Record]],
    data_files: Sequence[str | Path],
    options: dict,
) -> None:
    # What produced these numbers, next to them: the model, the data and every decoding knob.
    args = {
        "model_path": str(model_path),
        "data_files": dict(zip(datasets, map(str, data_files), strict=True)),
        **{
            key: list(value) if isinstance(value, tuple) else value
            for key, value in options.items()
        },
    }
    if args.get("greedy"):
        args["seeds"] = []  # one greedy pass: no seed is used
    write_text_atomic(output_dir / EVAL_ARGS_FILENAME, json.dumps(args, indent=2) + "\n")


def run_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Curves and a markdown comparison of ``run_dirs`` in ``out_dir``; the report's path."""
    return make_report(run_dirs, out_dir)
