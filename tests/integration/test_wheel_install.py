"""A normal (not editable) install into a clean virtual environment: the wheel carries the
recipes, the DeepSpeed JSONs and the launch scripts, so ``show-config`` resolves a recipe's
DeepSpeed config and ``launch --slurm`` renders its batch script from outside any checkout; and
the wheel's declared dependencies are enough to train.

The clean environment gets only the distributions the wheel's ``Requires-Dist`` names (and
theirs, transitively), linked from this environment instead of downloaded: an import of an
undeclared package fails there, and ``pip check`` verifies the declared versions."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from support import subprocess_env, tiny_run_config

ROOT = Path(__file__).resolve().parents[2]


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _declared_closure(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that ``requirements`` need, transitively, without extras."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if key not in found:
            found[key] = importlib.metadata.distribution(requirement.name)
            todo += [Requirement(r) for r in found[key].requires or []]
    return found


def _clean_venv(path: Path, wheel: Path) -> Path:
    """A venv without system site-packages, holding the wheel and its declared dependencies."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    python = path / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     env={}).stdout.strip())  # fmt: skip
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(next(
            n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA")
        )).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]  # fmt: skip
    for dist in _declared_closure(requires).values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "-q",
        "--python",
        str(python),
    ]
    _run([*pip, "install", "--no-index", "--no-deps", str(wheel)])
    _run([*pip, "check"])
    return python


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

    python = _clean_venv(tmp_path / "venv", wheel)
    workdir = tmp_path / "elsewhere"  # no ds_configs/ or launchers/ here
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cli = [str(python), "-m", "cot2align_ds.cli"]
    where = _run([str(python), "-c", "import cot2align_ds; print(cot2align_ds.__file__)"],
                 env=env, cwd=workdir)  # fmt: skip
    assert where.stdout.strip().startswith(str(tmp_path / "venv"))
    # Nothing outside the declared dependencies: the dev tools of this environment are absent.
    absent = subprocess.run([str(python), "-c", "import pytest"], env=env, capture_output=True)
    assert absent.returncode != 0

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
    child_env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    planned = _run([*cli, "plan", "--config", "run.yaml", "--world-size", "2"], env=child_env,
                   cwd=workdir)  # fmt: skip
    assert "GPU" in planned.stdout
    _run([*cli, "train", "--config", "run.yaml"], env=child_env, cwd=workdir)
    assert (workdir / "run" / "student" / "model.safetensors").is_file()
