"""Module-boundary and safety rules from DESIGN.md, checked on the source (AST)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cot2align_ds"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _in(path: Path, folder: str) -> bool:
    return path.relative_to(PACKAGE).parts[0] == folder


@pytest.mark.parametrize("folder", ["losses", "alignment"])
def test_pure_layers_import_nothing_from_the_package(folder):
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            n
            for n in _imports(path)
            if n.startswith("cot2align_ds") and not n.startswith(f"cot2align_ds.{folder}")
        )
        for path in SOURCES
        if _in(path, folder)
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_only_engine_imports_deepspeed():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in SOURCES
        if not _in(path, "engine")
        and any(
            n == "deepspeed" or n.startswith("deepspeed.") or n.endswith(".deepspeed")
            for n in _imports(path)
        )
    ]
    assert offenders == []


def test_engine_knows_nothing_of_losses_data_or_training():
    forbidden = (
        "cot2align_ds.losses",
        "cot2align_ds.data",
        "cot2align_ds.train",
        "cot2align_ds.alignment",
    )
    for path in SOURCES:
        if _in(path, "engine"):
            assert not [n for n in _imports(path) if n.startswith(forbidden)], path


def test_cli_only_reaches_run_functions():
    allowed = ("cot2align_ds.runs", "cot2align_ds.errors")
    imported = [n for n in _imports(PACKAGE / "cli.py") if n.startswith("cot2align_ds")]
    assert imported and all(n.startswith(allowed) for n in imported)


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            yield node


def test_no_remote_code_or_unsafe_pickles_by_default():
    for path in SOURCES:
        for call in _calls(path):
            for keyword in call.keywords:
                if keyword.arg == "trust_remote_code":
                    assert not (isinstance(keyword.value, ast.Constant) and keyword.value.value), (
                        path
                    )
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr == "load":
                owner = func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    flags = {k.arg: k.value for k in call.keywords}
                    weights_only = flags.get("weights_only")
                    assert isinstance(weights_only, ast.Constant) and weights_only.value is True, (
                        path
                    )
