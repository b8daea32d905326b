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
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _in(path: Path, folder: str) -> bool:
    return path.relative_to(PACKAGE).parts[0] == folder


# Bottom to top. A unit (a folder of the package, or a module at its root) imports only from
# units of strictly lower layers, or from itself. So: ``errors`` imports nothing; ``data``
# nothing from ``eval`` or ``train``; ``eval`` nothing from ``train``; nothing below
# ``experiments`` imports the demos or benchmarks; only ``cli`` imports ``runs``. The planner
# sits below ``train`` (a run picks its student engine from its estimate) and above the teacher
# cache (it reports what one would store).
LAYERS = (
    ("errors", "atomic"),
    ("methods", "run_dir", "tracking"),
    ("alignment", "losses"),
    ("config",),
    ("models", "engine"),
    ("inference",),
    ("data",),
    ("eval",),
    ("teacher_cache",),
    ("planning",),
    ("train",),
    ("launch",),
    ("experiments",),
    ("runs",),
    ("cli",),
)
# Pure tensor/array code: nothing from the package but the bottom layer.
PURE_UNITS = ("losses", "alignment")


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(root: Path) -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports (at any depth of its
    body: an import inside a function still ties the two modules together)."""
    modules = {module_name(root, path): path for path in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # ``from pkg import module`` names a module; ``from module import name`` does not.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(root: Path, layers=LAYERS) -> list[str]:
    rank = {unit: index for index, units in enumerate(layers) for unit in units}
    found = []
    for module, targets in package_imports(root).items():
        source = unit_of(module)
        for target in sorted(targets):
            unit = unit_of(target)
            if unit in ("", source):
                continue
            if source not in rank or unit not in rank or rank[unit] >= rank[source]:
                found.append(f"{module} imports {target}")
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph = package_imports(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_every_unit_has_a_layer():
    rank = {unit for units in LAYERS for unit in units}
    units = {unit_of(module) for module in package_imports(PACKAGE)} - {""}
    assert units <= rank, sorted(units - rank)


def test_units_import_only_from_lower_layers():
    assert layer_violations(PACKAGE) == []


def test_no_import_cycles():
    assert import_cycles(PACKAGE) == []


@pytest.mark.parametrize("folder", PURE_UNITS)
def test_pure_layers_import_only_the_bottom_layer(folder):
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            n
            for n in _imports(path)
            if n.startswith("cot2align_ds")
            and not n.startswith(
                (f"cot2align_ds.{folder}", "cot2align_ds.errors", "cot2align_ds.atomic")
            )
        )
        for path in SOURCES
        if _in(path, folder)
    }
    assert not {k: v for k, v in offenders.items() if v}


def _plant(root: Path, files: dict[str, str]) -> Path:
    package = root / "cot2align_ds"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_the_checks_catch_planted_violations(tmp_path):
    package = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "data/__init__.py": "",
            "data/records.py": "def read():\n    from cot2align_ds.eval import metrics\n",
            "eval/__init__.py": "",
            "eval/metrics.py": "from cot2align_ds.data.records import read\n",
            "eval/a.py": "import cot2align_ds.eval.b\n",
            "eval/b.py": "from cot2align_ds.eval import a\n",
        },
    )
    assert "cot2align_ds.data.records imports cot2align_ds.eval.metrics" in layer_violations(
        package
    )
    assert sorted(import_cycles(package)) == [
        ["cot2align_ds.data.records", "cot2align_ds.eval.metrics"],
        ["cot2align_ds.eval.a", "cot2align_ds.eval.b"],
    ]
    clean = _plant(tmp_path / "clean", {"__init__.py": "", "errors.py": "", "data/x.py": ""})
    assert layer_violations(clean) == [] and import_cycles(clean) == []


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
