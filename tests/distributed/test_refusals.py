"""Refusals in a launched job: every rank hits the same bad input; the user reads one line, and
the run directory is left as it was."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from support import subprocess_env, tiny_run_config
from test_world_size_2 import DEEPSPEED, _port

pytestmark = pytest.mark.distributed
REFUSAL = (
    r"error: checkpoint step-\d+ was written with world_size=1, this run has 2; resume with "
    r"the same setting"
)


@pytest.fixture(scope="module")
def checkpointed_run(workspace, tmp_path_factory):
    """A finished one-rank run with a checkpoint, and its config file."""
    from cot2align_ds.config import validate_config
    from cot2align_ds.train.loop import run_train

    root = tmp_path_factory.mktemp("refusals")
    config = tiny_run_config(workspace, root / "run", train={"max_steps": 2, "save_every": 1})
    run_train(validate_config(config))
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return root / "run", path


def _files(run_dir):
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _error_lines(result):
    return [line for line in (result.stdout + result.stderr).splitlines() if "error:" in line]


def test_a_resume_refused_under_torchrun_prints_one_line(checkpointed_run):
    run_dir, path = checkpointed_run
    before = _files(run_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_port()}", "-m", "cot2align_ds.cli", "train", "--config",
               str(path), "--resume", "auto"]  # fmt: skip
    result = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=240
    )
    assert result.returncode != 0
    [line] = _error_lines(result)
    assert re.fullmatch(REFUSAL, line), line
    # torchrun itself then reports the failed ranks (its ChildFailedError summary): that report
    # is torchrun's, printed by its own process; `cot2align launch` refuses before any rank
    # starts instead (next test).
    assert _files(run_dir) == before


@pytest.mark.skipif(not DEEPSPEED.is_file(), reason="deepspeed launcher not installed")
def test_cot2align_launch_refuses_the_resume_before_starting_any_rank(checkpointed_run):
    run_dir, path = checkpointed_run
    before = _files(run_dir)
    env = subprocess_env()
    env["PATH"] = os.pathsep.join([str(DEEPSPEED.parent), env.get("PATH", "")])
    command = [sys.executable, "-m", "cot2align_ds.cli", "launch", "--config", str(path),
               "--gpus-per-node", "2", "--resume", "auto"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(REFUSAL, line), line
    assert "deepspeed" not in result.stdout  # no launcher command was started
    assert _files(run_dir) == before
