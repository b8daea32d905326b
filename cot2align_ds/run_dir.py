"""What a training run leaves in its output directory for later steps to read.

The dev evaluation's state (``dev_eval.json``: the kept checkpoints, best first) and the final
model (``student/``). Reporting (``paper_table``) and export (``eval.export``) both resolve a
run's best model here; nothing heavy is imported, so reports run without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from cot2align_ds.errors import UserError

DEV_EVAL_FILENAME = "dev_eval.json"
FINAL_MODEL_DIRNAME = "student"


class RunDirError(UserError):
    """A run directory lacks what a later step needs."""


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
