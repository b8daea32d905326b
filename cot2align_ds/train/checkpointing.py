"""Resumable checkpoints: layout, completeness markers, rotation, and picking one to resume.

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

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.errors import UserError

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


def truncate_jsonl_steps(path: Path, max_step: int) -> None:
    """Drop rows logged after ``max_step`` (they belong to the run's lost tail)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= max_step
    ]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
