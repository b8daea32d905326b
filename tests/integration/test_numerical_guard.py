"""Non-finite loss or gradients: the update is skipped (never applied), counted and logged, and
the run stops with a clear message past ``train.max_skipped_steps``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support import tiny_run_config

from cot2align_ds.config import validate_config


class _PoisonedObjective:
    """Fault injection: the real objective, with its loss turned into NaN on chosen calls."""

    def __init__(self, objective, poisoned_calls: set[int] | None) -> None:
        self._objective, self._poisoned, self.calls = objective, poisoned_calls, 0

    def __getattr__(self, name):
        return getattr(self._objective, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss = self._objective(*args, **kwargs)
        if self._poisoned is None or self.calls in self._poisoned:
            loss = replace(loss, total=loss.total * float("nan"))
        return loss


def _trainer(workspace, tmp_path, **train):
    from cot2align_ds.engine import deepspeed_engines as dse
    from cot2align_ds.train.loop import Trainer

    config = validate_config(
        tiny_run_config(
            workspace, tmp_path / "run", train={"max_steps": 4, "log_every": 1, **train}
        )
    )
    (tmp_path / "run").mkdir()
    return Trainer(config, tmp_path / "run", dse.init_distributed(60), None)


def test_a_nan_step_is_skipped_counted_and_not_applied(workspace, tmp_path):
    from cot2align_ds.engine import deepspeed_engines as dse

    trainer = _trainer(workspace, tmp_path)
    trainer.objective = _PoisonedObjective(trainer.objective, {2})
    snapshots = []
    original_step = trainer.train_step

    def recording_step(window, **kwargs):
        result = original_step(window, **kwargs)
        snapshots.append(
            dse.gathered_state_dict(trainer.student_engine, "student.")["lm_head.weight"]
        )
        return result

    trainer.train_step = recording_step
    trainer.train()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["skipped_steps"] for row in rows] == [0, 1, 1, 1]
    assert "loss/total" not in rows[1] and "loss/total" in rows[2]
    torch.testing.assert_close(snapshots[1], snapshots[0])  # step 2 changed nothing
    assert not torch.equal(snapshots[2], snapshots[1])  # step 3 trained again
    assert all(torch.isfinite(snapshot).all() for snapshot in snapshots)


def test_too_many_non_finite_steps_stop_the_run(workspace, tmp_path):
    from cot2align_ds.train.loop import NonFiniteError

    trainer = _trainer(workspace, tmp_path, max_skipped_steps=2)
    trainer.objective = _PoisonedObjective(trainer.objective, None)
    with pytest.raises(
        NonFiniteError, match=r"step 3: 3 steps had non-finite.*max_skipped_steps=2"
    ):
        trainer.train()


def test_non_finite_weights_are_never_written(workspace, tmp_path):
    """Weights that became non-finite (an overflowing update) are not saved: not as a resumable
    checkpoint over the good ones, not as the final model; one line says so."""
    from cot2align_ds import run_dir as rundir
    from cot2align_ds.errors import UserError

    trainer = _trainer(workspace, tmp_path, save_every=1, keep_last=3)
    trainer.step = 1
    trainer.save_checkpoint()
    good = rundir.complete_tags(rundir.checkpoint_root(tmp_path / "run"))
    assert good == ["step-000001"]
    name, parameter = next(iter(trainer.student_engine.module.student.named_parameters()))
    getattr(parameter, "ds_tensor", parameter.data).fill_(float("inf"))
    trainer.step = 2
    for write in (trainer.save_checkpoint, trainer.save):
        with pytest.raises(UserError, match="non-finite") as info:
            write()
        assert "\n" not in str(info.value) and "lower train.lr" in str(info.value)
    assert rundir.complete_tags(rundir.checkpoint_root(tmp_path / "run")) == good
    assert not (tmp_path / "run" / "checkpoints" / "step-000002").exists()
    assert not (tmp_path / "run" / "student").exists()


def test_a_final_save_that_dies_midway_leaves_the_previous_model(workspace, tmp_path):
    """The final model is written aside and renamed into place: a save killed halfway (here:
    an exception after half the files) leaves the previous ``student/`` as it was."""
    trainer = _trainer(workspace, tmp_path)
    student_dir = trainer.save()
    before = {p.name: p.read_bytes() for p in student_dir.iterdir()}
    student = trainer.models.student_module.student

    def dies_midway(directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("killed")

    student.save_pretrained = dies_midway
    with pytest.raises(RuntimeError, match="killed"):
        trainer.save()
    assert {p.name: p.read_bytes() for p in student_dir.iterdir()} == before
