"""``launchers/local.sh`` end to end: two CPU ranks (gloo) through the deepspeed launcher."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import subprocess_env, tiny_run_config

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not on PATH")
def test_local_sh_trains_two_ranks_and_passes_arguments_through(workspace, tmp_path):
    run_dir = tmp_path / "local_sh"
    config = tmp_path / "local_sh.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(workspace, run_dir)))
    # The launcher sets the rank variables itself; the session's world-of-one values must not leak.
    env = subprocess_env()
    env["GPUS"] = "2"
    command = ["bash", str(ROOT / "launchers" / "local.sh"), str(config)]
    command += ["--set", "train.max_steps=2", "--set", "tracking.run_name=via local.sh"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dist_world_size=2" in result.stdout + result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss/total" in row] == [1, 2]  # --set reached train
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["tracking"]["run_name"] == "via local.sh"
    assert (run_dir / "student" / "model.safetensors").is_file()
