"""The final model survives a real SIGKILL at any point of its save: a resumed run is killed
(``save_killer.py``) while writing, between the swap's steps and while cleaning up, with the
filesystem's atomic exchange and with the two-rename fallback."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import subprocess_env, tiny_run_config

from cot2align_ds import run_dir as rundir
from cot2align_ds.config import validate_config

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def finished_run(workspace, tmp_path_factory):
    """A run that trained 2 steps (checkpoint step-000002) and saved its final model."""
    from cot2align_ds.train.loop import run_train

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    config = tiny_run_config(workspace, run_dir, train={"max_steps": 2, "save_every": 1})
    run_train(validate_config(config))
    return run_dir, config


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _resume_config(finished_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished run, configured to train one more step and save again."""
    source, config = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    config = {**config, "output_dir": str(run_dir), "train": {**config["train"], "max_steps": 3}}
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_dir, path


def _kill_at(config_path: Path, point: str, exchange: str) -> None:
    command = [sys.executable, str(HERE / "save_killer.py"), str(config_path), point, exchange]
    result = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=240
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


@pytest.mark.parametrize(("point", "exchange"), [
    ("staging-write", "on"),  # the new model half written
    ("cleanup", "on"),  # swapped in; the previous model half deleted
    ("between-renames", "off"),  # fallback: the previous model moved aside, the new not yet in
])  # fmt: skip
def test_a_kill_during_the_final_save_never_leaves_a_partial_model(
    finished_run, tmp_path, point, exchange
):
    run_dir, config_path = _resume_config(finished_run, tmp_path)
    before = _snapshot(run_dir / "student")
    _kill_at(config_path, point, exchange)

    restored = rundir.recover_final_model(run_dir)  # what the next run does first
    after = _snapshot(run_dir / "student")
    if point == "cleanup":
        # The new model was complete and in place: a full set of files, different weights.
        assert restored == [] and after.keys() == before.keys()
        assert after["model.safetensors"] != before["model.safetensors"]
    else:
        assert after == before  # the previous model, byte for byte
        assert restored == (["student"] if point == "between-renames" else [])


def test_the_next_run_restores_a_model_left_aside(finished_run, tmp_path):
    """Without calling the recovery by hand: ``train --resume auto`` puts the previous model
    back first and says so."""
    run_dir, config_path = _resume_config(finished_run, tmp_path)
    before = _snapshot(run_dir / "student")
    _kill_at(config_path, "between-renames", "off")
    assert not (run_dir / "student").exists()
    assert _snapshot(run_dir / rundir.FINAL_MODEL_STAGING / "student.old") == before
    # The resumed run restores the model, trains its last step again and saves the new one.
    command = [sys.executable, "-m", "cot2align_ds.cli", "train", "--config", str(config_path)]
    result = subprocess.run(
        [*command, "--resume", "auto"], env=subprocess_env(), capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student/: restored the previous final model" in result.stdout
    after = _snapshot(run_dir / "student")
    assert after.keys() == before.keys() and after != before
    assert not (run_dir / rundir.FINAL_MODEL_STAGING).exists()
