"""Saving and restoring the training state, and saving the final model a run leaves behind
(the directory bookkeeping, which needs no engine, is in ``run_dir``).

Layout under ``<output_dir>/checkpoints``: one DeepSpeed checkpoint per tag ``step-000120``
(student engine: weights, optimizer, scheduler, projectors), and next to it a marker
``step-000120.complete`` holding the trainer state (step, data position, RNG states). The
marker is written atomically only after every rank has finished writing, so a checkpoint
interrupted half-way is never picked by ``--resume auto``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.models.lora import save_lora_student
from cot2align_ds.run_dir import (
    FINAL_MODEL_DIRNAME,
    FINAL_MODEL_STAGING,
    check_resumable,
    checkpoint_root,
    recover_final_model,
    replace_dir,
    rotate,
    tag_for,
    write_marker,
)


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
            # The gathered tensors are separate copies, so transformers cannot see that the
            # output embedding is the input one: drop the duplicate names (the saved config's
            # tie_word_embeddings restores the tie on load).
            for name in tied_duplicates(student):
                state.pop(name, None)
            student.save_pretrained(staged_model, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staged_model)
        for staged in (staged_model, staged_adapter):
            if staged.exists():
                replace_dir(staged, output_dir / staged.name, staging)
        shutil.rmtree(staging)
        if projectors:
            dse.save_safetensors(projectors, output_dir / "projectors.safetensors")
    dse.barrier()
    return model_dir


def tied_duplicates(module: torch.nn.Module) -> list[str]:
    """Names of parameters that are the same tensor as an earlier-named one (tied weights)."""
    seen: set[int] = set()
    duplicates = []
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            duplicates.append(name)
        seen.add(id(parameter))
    return duplicates
