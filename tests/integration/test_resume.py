"""Exact resume: a run killed with SIGKILL at a random step and resumed with --resume auto gives
the same per-step losses as an uninterrupted run, and sees every example once per epoch."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import yaml
from support import subprocess_env, tiny_run_config

from cot2align_ds import run_dir as rundir
from cot2align_ds.config import validate_config
from cot2align_ds.data.records import read_records, write_records

NUM_RECORDS, MICRO_BATCH, STEPS = 16, 4, 10  # 4 steps per epoch, 2.5 epochs


def _config(workspace, tmp_path, name):
    train_file = tmp_path / "train16.jsonl"
    write_records(train_file, read_records(workspace["train"])[:NUM_RECORDS])
    config = tiny_run_config(
        workspace,
        tmp_path / name,
        train={
            "max_steps": STEPS,
            "micro_batch_size": MICRO_BATCH,
            "lr": 5e-3,
            "save_every": 1,
            "keep_last": 2,
            "record_example_ids": True,
            "log_every": 1,
        },
    )
    config["data"]["train_file"] = str(train_file)
    return config


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    return torch.tensor([row["loss/total"] for row in rows])


def _cli(*args):
    return [sys.executable, "-m", "cot2align_ds.cli", *args], subprocess_env()


def test_sigkill_then_resume_matches_the_uninterrupted_run(workspace, tmp_path):
    from cot2align_ds.train.loop import run_train

    run_train(validate_config(_config(workspace, tmp_path, "reference")))
    reference = _losses(tmp_path / "reference")

    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(_config(workspace, tmp_path, "killed")))
    kill_after = random.Random(os.getpid()).randint(2, STEPS - 2)
    command, env = _cli("train", "--config", str(path))
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.fail(f"the run ended before it could be killed (exit {process.returncode})")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "student").exists()

    command, env = _cli("train", "--config", str(path), "--resume", "auto")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(_losses(tmp_path / "killed"), reference, rtol=1e-5, atol=1e-6)

    rows = [
        json.loads(line)
        for line in (tmp_path / "killed" / "examples_seen.rank0.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    steps_per_epoch = NUM_RECORDS // MICRO_BATCH
    for start in range(0, STEPS - steps_per_epoch + 1, steps_per_epoch):
        seen = Counter(i for row in rows[start : start + steps_per_epoch] for i in row["ids"])
        assert len(seen) == NUM_RECORDS and set(seen.values()) == {1}
    # Rotation kept the newest two complete checkpoints.
    assert len(rundir.complete_tags(rundir.checkpoint_root(tmp_path / "killed"))) <= 2


def test_resume_without_checkpoint_starts_fresh_and_a_named_tag_must_exist(workspace, tmp_path):
    from cot2align_ds.train.loop import run_train

    config = validate_config(_config(workspace, tmp_path, "fresh"))
    with pytest.raises(rundir.ResumeError, match="no complete checkpoint"):
        run_train(config, resume="step-000003")
    config.train.max_steps = 2
    run_train(config, resume="auto")
    assert (tmp_path / "fresh" / "student" / "model.safetensors").is_file()


def test_an_overwritten_run_starts_its_logs_and_checkpoints_anew(workspace, tmp_path, capsys):
    from cot2align_ds.train.loop import run_train

    raw = _config(workspace, tmp_path, "reused")
    raw["train"].update(max_steps=4, keep_last=10)
    run_train(validate_config(raw))
    run_dir = tmp_path / "reused"
    assert rundir.complete_tags(rundir.checkpoint_root(run_dir))[-1] == "step-000003"
    raw["train"].update(max_steps=3, save_every=2)
    run_train(validate_config(raw), overwrite=True)
    # Only this run's steps, checkpoints and example ids: nothing appended to the first run's,
    # no checkpoint of it left for a later resume to pick.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rundir.complete_tags(rundir.checkpoint_root(run_dir)) == ["step-000002"]
    seen = (run_dir / "examples_seen.rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in seen] == [1, 2, 3]
    assert "removed the previous run's checkpoints, examples_seen.rank0.jsonl, metrics.jsonl" in (
        capsys.readouterr().out
    )


def test_half_written_checkpoint_is_never_picked(tmp_path):
    root = rundir.checkpoint_root(tmp_path)
    (root / "step-000002").mkdir(parents=True)
    rundir.write_marker(root, "step-000002", {"step": 2})
    (root / "step-000004").mkdir()  # killed while writing: no marker
    assert rundir.find_resume_tag(tmp_path, "auto") == "step-000002"
    (root / "step-000006").mkdir()
    rundir.write_marker(root, "step-000006", {"step": 6})
    rundir.rotate(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000006.complete"]


def test_a_refused_resume_touches_nothing_and_a_torn_log_line_is_dropped(workspace, tmp_path):
    from cot2align_ds.train.loop import run_train

    raw = _config(workspace, tmp_path, "run")
    raw["train"]["max_steps"] = 2
    run_train(validate_config(raw))
    run_dir = tmp_path / "run"
    # A kill in the middle of a write: a torn JSON row, then NUL padding from the file system.
    with (run_dir / "metrics.jsonl").open("ab") as handle:
        handle.write(b'{"step": 3, "loss/tot' + b"\x00" * 16)
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    other = {**raw, "train": {**raw["train"], "micro_batch_size": 2, "max_steps": 3}}
    with pytest.raises(rundir.ResumeError, match="micro_batch_size=4, this run has 2"):
        run_train(validate_config(other), resume="auto")
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    raw["train"]["max_steps"] = 3
    run_train(validate_config(raw), resume="auto")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]


def test_a_preemption_notice_checkpoints_at_the_step_boundary_and_asks_for_a_requeue(
    workspace, tmp_path
):
    """SIGUSR1 (SLURM's notice before the time limit) mid-run: the trainer finishes the step,
    writes a complete checkpoint (periodic saving is off here), exits with the requeue status;
    --resume auto then gives the uninterrupted run's per-step losses, each step logged once."""
    from cot2align_ds.errors import REQUEUE_EXIT_CODE
    from cot2align_ds.train.loop import run_train

    raw = _config(workspace, tmp_path, "reference")
    raw["train"].pop("save_every")
    run_train(validate_config(raw))
    reference = _losses(tmp_path / "reference")

    raw = _config(workspace, tmp_path, "preempted")
    raw["train"].pop("save_every")
    path = tmp_path / "preempted.yaml"
    path.write_text(yaml.safe_dump(raw))
    command, env = _cli("train", "--config", str(path))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.fail(f"the run ended before the notice (exit {process.returncode})")
    os.kill(process.pid, signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT_CODE, stderr[-3000:]
    notices = [line for line in stderr.decode().splitlines() if line.startswith("preempted:")]
    assert len(notices) == 1 and "--resume auto" in notices[0]
    tags = rundir.complete_tags(rundir.checkpoint_root(tmp_path / "preempted"))
    assert len(tags) == 1 and not (tmp_path / "preempted" / "student").exists()

    command, env = _cli("train", "--config", str(path), "--resume", "auto")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(_losses(tmp_path / "preempted"), reference, rtol=1e-5, atol=1e-6)


def test_a_restarted_job_without_a_checkpoint_refuses_to_start_over(
    workspace, tmp_path, monkeypatch
):
    from cot2align_ds.train.loop import run_train

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(rundir.ResumeError, match="restart 1 of SLURM job 4242 found no complete"):
        run_train(validate_config(_config(workspace, tmp_path, "restarted")), resume="auto")
    assert not (tmp_path / "restarted").exists()
