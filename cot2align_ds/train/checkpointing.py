"""Resumable checkpoints (layout, completeness markers, rotation, picking one to resume,
saving and restoring the training state) and the final model a run leaves behind.

Layout under ``<output_dir>/checkpoints``: one DeepSpeed checkpoint per tag ``step-000120``
(student engine: weights, optimizer, scheduler, projectors), and next to it a marker
``step-000120.complete`` holding the trainer state (step, data position, RNG states). The
marker is written atomically only after every rank has finished writing, so a checkpoint
interrupted half-way is never picked by ``--resume auto``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cot2align_ds.atomic import exchange_paths, write_text_atomic
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.errors import UserError
from cot2align_ds.models.lora import save_lora_student
from cot2align_ds.run_dir import FINAL_MODEL_DIRNAME

_TAG = re.compile(r"^step-(\d{6,})$")


class ResumeError(UserError):
    """No usable checkpoint where the user asked to resume from."""


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


def marker_path(root: Path, tag: str) -> Path:
    return root / f"{tag}.complete"


def complete_tags(root: Path) -> list[str]:
    """Tags with both a checkpoint folder and a completeness marker, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)]
    tags = [tag for tag in tags if marker_path(root, tag).is_file()]
    return sorted(tags, key=lambda tag: int(_TAG.match(tag).group(1)))


def find_resume_tag(output_dir: Path, resume: str) -> str | None:
    """``auto``: newest complete tag or None; a tag name: that one, which must be complete."""
    root = checkpoint_root(output_dir)
    tags = complete_tags(root)
    if resume == "auto":
        return tags[-1] if tags else None
    if resume not in tags:
        raise ResumeError(
            f"--resume {resume}: no complete checkpoint of that name in {root} "
            f"(complete: {', '.join(tags) or 'none'}); use --resume auto"
        )
    return resume


def write_marker(root: Path, tag: str, state: dict[str, Any]) -> None:
    write_text_atomic(marker_path(root, tag), json.dumps(state))


def read_marker(root: Path, tag: str) -> dict[str, Any]:
    return json.loads(marker_path(root, tag).read_text(encoding="utf-8"))


def rotate(root: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints and any stale partial ones."""
    tags = complete_tags(root)
    doomed = tags[:-keep_last] if keep_last > 0 else tags
    newest = int(_TAG.match(tags[-1]).group(1)) if tags else -1
    for path in root.iterdir() if root.is_dir() else []:
        match = _TAG.match(path.name)
        # A partial folder older than the newest complete one is an abandoned write.
        stale = match and int(match.group(1)) < newest
        if stale and path.is_dir() and not marker_path(root, path.name).is_file():
            doomed.append(path.name)
    for tag in doomed:
        marker_path(root, tag).unlink(missing_ok=True)
        shutil.rmtree(root / tag, ignore_errors=True)
    return doomed


def rng_state() -> dict[str, Any]:
    """Host RNG states as JSON-safe values (torch's as a list of byte values)."""
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.random.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    return value


def truncate_jsonl_steps(path: Path, max_step: int) -> int:
    """Drop rows logged after ``max_step`` (they belong to the run's lost tail), and a torn or
    NUL-padded last line that a kill in the middle of a write leaves; returns how many lines
    that were not whole JSON objects were dropped (the caller says so)."""
    if not path.is_file():
        return 0
    kept, torn = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").split("\n"):
        text = line.strip().strip("\x00")
        if not text:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(row, dict) and row.get("step", 0) <= max_step:
            kept.append(json.dumps(row))
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return torn


# What must match between a checkpoint and the run resuming it: the data position counts
# micro-batches of this size on this many ranks.
_RESUME_INVARIANTS = ("world_size", "micro_batch_size", "grad_accum")


def save_resumable(
    engine: Any, output_dir: Path, state: dict[str, Any], ctx: dse.DistContext, *, keep_last: int
) -> None:
    """Every rank writes its shards and RNG state; then rank 0 marks the checkpoint complete
    (``state``: the trainer state, ``state["step"]`` names the tag) and rotates old ones."""
    root, tag = checkpoint_root(output_dir), tag_for(state["step"])
    dse.save_checkpoint(engine, root, tag)
    write_text_atomic(root / tag / f"rng-rank{ctx.rank}.json", json.dumps(rng_state()))
    dse.barrier()  # every rank's files are on disk before the checkpoint counts as complete
    if ctx.is_main:
        write_marker(root, tag, state)
        rotate(root, keep_last)
    dse.barrier()


def check_resumable(output_dir: Path, tag: str, current: dict[str, Any]) -> dict[str, Any]:
    """The saved trainer state of checkpoint ``tag``, refused (one line) when its data layout
    differs from ``current``'s. Runs before the run writes anything."""
    state = read_marker(checkpoint_root(output_dir), tag)
    for key in _RESUME_INVARIANTS:
        if state[key] != current[key]:
            raise ResumeError(
                f"checkpoint {tag} was written with {key}={state[key]}, this run has "
                f"{current[key]}; resume with the same setting"
            )
    return state


def restore(
    engine: Any, output_dir: Path, tag: str, current: dict[str, Any], ctx: dse.DistContext
) -> dict[str, Any]:
    """Load checkpoint ``tag`` into ``engine`` and this rank's RNG state; the saved trainer
    state. Refuses a checkpoint whose data layout differs from ``current``'s."""
    root = checkpoint_root(output_dir)
    state = check_resumable(output_dir, tag, current)
    dse.load_checkpoint(engine, root, tag)
    set_rng_state(json.loads((root / tag / f"rng-rank{ctx.rank}.json").read_text()))
    return state


def save_final_model(
    engine: Any, models: Any, config: Any, output_dir: Path, ctx: dse.DistContext
) -> Path:
    """Gather the student's weights (rank 0 writes): a Hugging Face model directory (LoRA:
    the adapter beside it and the merged model), the projectors, and the resolved DeepSpeed
    configs. ``models``: the run's ``setup.Models``."""
    model_dir = output_dir / FINAL_MODEL_DIRNAME
    state = dse.gathered_state_dict(engine, prefix="student.")
    projectors = dse.gathered_state_dict(engine, prefix="projectors.")
    if ctx.is_main:
        write_text_atomic(output_dir / "ds_student.json", json.dumps(models.student_ds, indent=2))
        if models.teacher_model is not None:
            text = json.dumps(models.teacher_ds, indent=2)
            write_text_atomic(output_dir / "ds_teacher.json", text)
        # Written into a staging folder, then swapped into place: a kill mid-save leaves the
        # previous model (or none), never a directory that looks complete but is not.
        recover_final_model(output_dir)
        staging = output_dir / FINAL_MODEL_STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staged_model, staged_adapter = staging / FINAL_MODEL_DIRNAME, staging / "student_adapter"
        staged_model.mkdir(parents=True)
        student = models.student_module.student
        tokenizer = models.student_tokenizer
        if config.student.lora is not None:
            save_lora_student(student, state, staged_adapter, staged_model)
            tokenizer.save_pretrained(staged_adapter)
        else:
            student.save_pretrained(staged_model, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staged_model)
        for staged in (staged_model, staged_adapter):
            if staged.exists():
                _replace_dir(staged, output_dir / staged.name, staging)
        shutil.rmtree(staging)
        if projectors:
            dse.save_safetensors(projectors, output_dir / "projectors.safetensors")
    dse.barrier()
    return model_dir


FINAL_MODEL_STAGING = ".final-model.partial"
_FINAL_DIRS = (FINAL_MODEL_DIRNAME, "student_adapter")


def recover_final_model(output_dir: Path) -> list[str]:
    """Put back a previous final model that a killed save had moved aside (the two-rename
    fallback's window, on filesystems without an atomic exchange); the names restored."""
    restored = []
    for name in _FINAL_DIRS:
        aside = output_dir / FINAL_MODEL_STAGING / f"{name}.old"
        if aside.is_dir() and not (output_dir / name).exists():
            aside.rename(output_dir / name)
            restored.append(name)
    return restored


def _replace_dir(new: Path, target: Path, scratch: Path) -> None:
    """Put ``new`` at ``target``: one atomic exchange where the filesystem has it, else two
    renames (the old one moves aside into ``scratch`` first; ``recover_final_model`` undoes a
    kill between them)."""
    if target.exists() and exchange_paths(new, target):
        shutil.rmtree(new)  # now the previous model
        return
    old = scratch / f"{target.name}.old"
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
