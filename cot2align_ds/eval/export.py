"""Publish a run's best model as a plain Hugging Face directory (safetensors + tokenizer).

``export_model`` (``cot2align export``) writes the best (or last) student of a run anywhere, as
a standalone model: ZeRO shards consolidated, a LoRA adapter merged, tied embeddings stored
once, in the run's precision unless asked otherwise.

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

from cot2align_ds.errors import UserError, first_line
from cot2align_ds.inference.loading import load_model_for_eval
from cot2align_ds.run_dir import (
    FINAL_MODEL_DIRNAME,
    RunDirError,
    best_model_dir,
    read_run_config,
)

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


class ExportError(UserError):
    """The export's target cannot be written as asked."""


def run_precision(run_dir: Path) -> str:
    """The precision the run trained in (its ``config.json``)."""
    return (read_run_config(run_dir).get("train") or {}).get("precision", "fp32")


def export_model(
    run_dir: Path, output: Path, *, last: bool = False, dtype: str | None = None,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write the run's best dev checkpoint (``last``: its final ``student/``) to ``output`` as a
    standalone Hugging Face model directory; returns the model it came from.

    Written beside ``output`` and renamed into place, so a failed export leaves nothing that
    looks complete. ``dtype``: fp32, bf16 or fp16 (default: the run's training precision).
    """
    run_dir, output = Path(run_dir), Path(output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())) and not overwrite:
        raise ExportError(f"--output '{output}' exists and is not empty; pass --overwrite")
    source = run_dir / FINAL_MODEL_DIRNAME if last else best_model_dir(run_dir)
    if not source.is_dir():
        raise RunDirError(f"{run_dir}: no final {FINAL_MODEL_DIRNAME}/ model; train it first")
    precision = dtype or run_precision(run_dir)
    if precision not in _SAVE_DTYPE:
        raise ExportError(f"--dtype {precision}: use fp32, bf16 or fp16")
    model, tokenizer = load_model_for_eval(source, dtype=_SAVE_DTYPE[precision])
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    _remove(staging)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    except BaseException:
        _remove(staging)
        raise
    _remove(output)
    os.replace(staging, output)
    return source


def require_hub_online() -> None:
    """Refuse a push under HF_HUB_OFFLINE before anything is exported."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no", "off"):
        raise ExportError("--push-to-hub needs the network; unset HF_HUB_OFFLINE for this command")


def push_to_hub(
    folder: Path, repo_id: str, *, private: bool = True, endpoint: str | None = None,
    commit_message: str = "Upload model exported by cot2align-ds",
) -> str:  # fmt: skip
    """Upload an exported model directory to the Hugging Face Hub (created if missing, private
    unless asked otherwise); the commit's URL.

    The token comes from huggingface_hub's own lookup (``HF_TOKEN`` or ``hf auth login``) and is
    never read or printed here. ``endpoint``: another Hub deployment (default ``HF_ENDPOINT`` or
    huggingface.co).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    require_hub_online()
    api = HfApi(endpoint=endpoint)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message
        )
    except HfHubHTTPError as error:
        # The model is already on disk; only the upload failed.
        raise ExportError(
            f"--push-to-hub {repo_id}: {first_line(error)}; the model is in {folder}"
        ) from None
    return str(getattr(commit, "commit_url", commit))
