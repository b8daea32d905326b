"""What a training run leaves in its output directory, and the bookkeeping around it.

The resumable checkpoints under ``checkpoints/`` (tags ``step-000120``, completeness markers,
rotation, which one ``--resume`` picks and whether its layout fits the run), the logs a resume
trims, the dev evaluation's state (``dev_eval.json``: the kept checkpoints, best first) and the
final model (``student/``, swapped in whole). Nothing heavy is imported: ``launch``, reporting
(``paper_table``) and export (``eval.export``) read run directories without torch or DeepSpeed;
``train.checkpointing`` writes what needs the engines.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from cot2align_ds.atomic import exchange_paths, write_text_atomic
from cot2align_ds.errors import UserError

DEV_EVAL_FILENAME = "dev_eval.json"
FINAL_MODEL_DIRNAME = "student"


class RunDirError(UserError):
    """A run directory lacks what a later step needs."""


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved run config a training run wrote (``config.json``), as a dict."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no config.json; pass a training run's output_dir")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirError(f"{path}: unreadable ({error}); rerun the training") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path}: not a run config; rerun the training")
    return config


def best_model_dir(run_dir: str | Path) -> Path:
    """The best dev checkpoint the run kept, else its final ``student/`` model."""
    run_dir = Path(run_dir)
    state_path = run_dir / DEV_EVAL_FILENAME
    if state_path.is_file():
        try:
            kept = json.loads(state_path.read_text(encoding="utf-8")).get("kept") or []
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise RunDirError(f"{state_path}: unreadable ({error}); rerun the training") from None
        if kept:
            best = Path(kept[0]["path"])
            # Stored relative to where training ran; look inside the run as well.
            for candidate in (best, run_dir / best.parent.name / best.name):
                if candidate.is_dir():
                    return candidate
    final = run_dir / FINAL_MODEL_DIRNAME
    if final.is_dir():
        return final
    raise RunDirError(
        f"{run_dir}: no trained model (no best checkpoint in {DEV_EVAL_FILENAME}, "
        f"no {FINAL_MODEL_DIRNAME}/); train it first"
    )


# What a training run writes about itself as it goes (the final model is replaced whole when it
# is saved). A fresh run in a reused directory removes the previous run's: kept, its metrics
# would be appended to, its checkpoints resumed from and its best checkpoint published.
PER_RUN_NAMES = ("metrics.jsonl", DEV_EVAL_FILENAME, "wandb_run_id", "checkpoints")


def clear_previous_run(output_dir: Path) -> list[str]:
    """Remove the previous run's per-run files from ``output_dir``; the names removed."""
    removed = []
    paths = [*(output_dir / name for name in PER_RUN_NAMES), *output_dir.glob("examples_seen.*")]
    for path in sorted(paths):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    return removed


# -- resumable checkpoints ------------------------------------------------------------------

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
# The student's DeepSpeed JSON too: ZeRO-2 and ZeRO-3 checkpoints do not load into each other.
_RESUME_INVARIANTS = ("world_size", "micro_batch_size", "grad_accum", "student_config")


def check_resumable(output_dir: Path, tag: str, current: dict[str, Any]) -> dict[str, Any]:
    """The saved trainer state of checkpoint ``tag``, refused (one line) when its data layout
    differs from ``current``'s (the keys it has). Runs before the run writes anything."""
    state = read_marker(checkpoint_root(output_dir), tag)
    for key in _RESUME_INVARIANTS:
        if key in current and key in state and state[key] != current[key]:
            raise ResumeError(
                f"checkpoint {tag} was written with {key}={state[key]}, this run has "
                f"{current[key]}; resume with the same setting"
            )
    return state


# -- the final model ---------------------------------------------------------------------------

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


def replace_dir(new: Path, target: Path, scratch: Path) -> None:
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
