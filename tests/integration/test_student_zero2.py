"""The ZeRO-2 student engine (``student_config: auto`` picks it where the student fits a GPU):
the same per-step losses as ZeRO-3, a checkpoint and exact resume, a final model, and a resume
that would load a checkpoint into the other stage refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support import tiny_run_config

from cot2align_ds import run_dir as rundir
from cot2align_ds.config import validate_config

STEPS = 4


def _config(workspace, run_dir, student_config, **train):
    config = tiny_run_config(
        workspace,
        run_dir,
        distill={"method": "uld", "kd_rate": 0.5, "temperature": 1.0},
        cot2align={"enabled": True, "num_iters": 20},
        deepspeed={"student_config": student_config, "dist_timeout_s": 120},
        train={"max_steps": STEPS, "micro_batch_size": 4, "lr": 3e-3, "log_every": 1, **train},
    )
    config["data"]["cot_records"] = "all"
    # Saved weights: random init under ZeRO-3's partitioned construction draws differently.
    config["student"] = {"name_or_path": str(workspace["student_student"])}
    return validate_config(config)


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    return torch.tensor([row["loss/total"] for row in rows])


def test_zero2_student_trains_resumes_and_matches_zero3(workspace, tmp_path):
    from cot2align_ds.train.loop import run_train

    run_train(_config(workspace, tmp_path / "zero3", "student_zero3.json"))
    zero2 = run_train(_config(workspace, tmp_path / "zero2", "student_zero2.json", save_every=2))
    torch.testing.assert_close(_losses(tmp_path / "zero2"), _losses(tmp_path / "zero3"),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert (zero2.model_dir / "model.safetensors").is_file()
    # Resume from step 2 with `auto`: the checkpoint's own JSON is kept, and the steps after it
    # repeat the uninterrupted run's losses.
    reference = _losses(tmp_path / "zero2")
    rundir.truncate_jsonl_steps(tmp_path / "zero2" / "metrics.jsonl", 2)
    tags = rundir.complete_tags(rundir.checkpoint_root(tmp_path / "zero2"))
    for tag in tags[1:]:  # keep step 2 only
        shutil.rmtree(rundir.checkpoint_root(tmp_path / "zero2") / tag)
    resumed = _config(workspace, tmp_path / "zero2", "auto", save_every=2)
    run_train(resumed, resume="auto")
    assert resumed.deepspeed.student_config == "student_zero2.json"
    torch.testing.assert_close(_losses(tmp_path / "zero2"), reference, rtol=1e-5, atol=1e-6)


def test_resuming_a_checkpoint_into_the_other_zero_stage_is_refused(workspace, tmp_path):
    from cot2align_ds.train.loop import run_train

    run_train(_config(workspace, tmp_path / "run", "student_zero2.json", save_every=2))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(rundir.ResumeError, match="student_config=student_zero2.json"):
        run_train(_config(workspace, tmp_path / "run", "student_zero3.json"), resume="auto")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
