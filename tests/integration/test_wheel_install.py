"""A normal (not editable) install: the wheel carries the recipes, the DeepSpeed JSONs and the
launch scripts, so ``show-config`` resolves a recipe's DeepSpeed config and ``launch --slurm``
renders its batch script from outside any checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml
from support import subprocess_env, tiny_run_config

ROOT = Path(__file__).resolve().parents[2]


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_an_installed_wheel_trains_from_its_own_files(workspace, tmp_path):
    # Built from a copy: an in-tree build would leave build/ and egg-info in the checkout.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "cot2align_ds", source / "cot2align_ds", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)])
    [wheel] = tmp_path.glob("cot2align_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("ds_configs/student_zero3.json", "ds_configs/teacher_zero3_offload_cpu.json",
                    "launchers/slurm.sbatch", "launchers/local.sh", "configs/paper_A.yaml"):  # fmt: skip
        assert f"cot2align_ds/{shipped}" in names

    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)])
    workdir = tmp_path / "elsewhere"  # no ds_configs/ or launchers/ here
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    cli = [sys.executable, "-m", "cot2align_ds.cli"]
    where = _run([sys.executable, "-c", "import cot2align_ds; print(cot2align_ds.__file__)"],
                 env=env, cwd=workdir)  # fmt: skip
    assert where.stdout.strip().startswith(str(site))

    shown = _run([*cli, "show-config", "--config", "paper_A"], env=env, cwd=workdir)
    assert "student_zero3.json" in shown.stdout and "stage" in shown.stdout
    script = _run(
        [*cli, "launch", "--config", "paper_A", "--slurm", "--nodes", "2", "--dry-run"],
        env=env,
        cwd=workdir,
    )
    assert "#SBATCH --nodes=2" in script.stdout and "scontrol requeue" in script.stdout

    # A tiny run with the shipped DeepSpeed JSONs (the config names them, not paths).
    config = tiny_run_config(workspace, workdir / "run", train={"max_steps": 1})
    (workdir / "run.yaml").write_text(yaml.safe_dump(config))
    child_env = {**subprocess_env(), "PYTHONPATH": str(site)}
    planned = _run([*cli, "plan", "--config", "run.yaml", "--world-size", "2"], env=child_env,
                   cwd=workdir)  # fmt: skip
    assert "GPU" in planned.stdout
    _run([*cli, "train", "--config", "run.yaml"], env=child_env, cwd=workdir)
    assert (workdir / "run" / "student" / "model.safetensors").is_file()
