"""The paper's results table from the ``eval_results.json`` files under a runs root.

``python -m cot2align_ds.experiments.paper_table runs/paper`` (what ``make paper-table`` runs) finds every
``<root>/<setting>/[<dataset>/]<run>/eval/eval_results.json`` written by ``cot2align eval``
(``{dataset: {metric: {"mean", "std", "per_seed"}}}``) and writes one markdown table, atomically,
to ``<root>/paper_table.md`` (or ``--output``): a row per setting x method, the method with and
without CoT2Align on consecutive rows (a run named ``<method>+cot2align``), a column per dataset,
cells ROUGE-L mean ± std over the evaluation seeds, "–" where a result is missing.

A result's dataset (its column) is its key in ``eval_results.json`` without split words
(``dolly_test`` -> ``dolly``); a key that is only a split word (``test``, what ``cot2align eval``
names a lone ``test.jsonl``) takes the ``<dataset>`` folder of the run, else the folder of the
data file that ``eval_args.json`` names.

``--best-model RUN_DIR`` prints the model a run should be evaluated with: the best dev
checkpoint its training kept (``dev_eval.json``), else its final ``student/`` directory; the
paper selects checkpoints by dev ROUGE-L, and ``mk/paper.mk`` evaluates this one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.errors import UserError
from cot2align_ds.methods import METHODS as REGISTRY
from cot2align_ds.run_dir import best_model_dir

RESULTS_FILENAME = "eval_results.json"
EVAL_ARGS_FILENAME = "eval_args.json"
TABLE_FILENAME = "paper_table.md"
COT_SUFFIX = "+cot2align"
MISSING = "–"
SETTINGS = ("A", "A_same", "B", "B_same", "C")
DATASETS = {"dolly": "Dolly", "alpaca": "Alpaca", "sni": "S-NI", "dialogsum": "DialogSum"}
_DATASET_ALIASES = {
    "s_ni": "sni",
    "natural_instructions": "sni",
    "super_natural_instructions": "sni",
    "dialog_sum": "dialogsum",
}
# Row order and labels: the teacher, then the method registry's order.
METHODS = {"teacher_sft": "Teacher (SFT)"} | {name: m.label for name, m in REGISTRY.items()}
_NO_COT_VARIANT = {"teacher_sft", "sft"}  # CoT2Align needs a teacher and a base KD method
_METRIC_LABELS = {"rouge_l": "ROUGE-L", "exact_match": "Exact match"}
_SPLIT_WORDS = {"test", "dev", "valid", "validation", "eval"}


class PaperTableError(UserError):
    """Results cannot be collected; the message names the file."""


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float
    num_seeds: int
    path: Path

    def text(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


CellKey = tuple[str, str, str]  # (setting, run, dataset)


# ---------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------


def dataset_column(key: str, fallback: str | None) -> str:
    """``dolly_test`` -> ``dolly``; a bare split word (``test``) -> ``fallback``."""
    words = [w for w in re.split(r"[_\-\s]+", key.lower()) if w and w not in _SPLIT_WORDS]
    name = "_".join(words)
    if not name:
        return fallback or key
    return _DATASET_ALIASES.get(name, name)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PaperTableError(f"{path}: unreadable JSON ({error}); rerun the evaluation") from None


def _data_file_folder(eval_dir: Path, key: str) -> str | None:
    """The folder of the data file ``eval_args.json`` lists for ``key`` (data/dolly/test.jsonl)."""
    args_path = eval_dir / EVAL_ARGS_FILENAME
    if not args_path.is_file():
        return None
    data_file = _read_json(args_path).get("data_files", {}).get(key)
    if not data_file:
        return None
    return Path(data_file).parent.name or None


def _cell(path: Path, dataset: str, scores: Any, metric: str) -> Cell | None:
    if not isinstance(scores, dict):
        raise PaperTableError(f"{path}: '{dataset}' is not a mapping of metrics")
    stats = scores.get(metric)
    if stats is None:
        return None
    try:
        return Cell(float(stats["mean"]), float(stats["std"]), len(stats["per_seed"]), path)
    except (KeyError, TypeError, ValueError):
        raise PaperTableError(
            f"{path}: '{dataset}.{metric}' needs numbers 'mean', 'std' and a 'per_seed' list"
        ) from None


def _location(root: Path, path: Path) -> tuple[str, str | None, str] | None:
    """(setting, dataset folder or None, run) from the path; None at an unexpected depth."""
    folders = path.relative_to(root).parts[:-2]  # drop "eval/eval_results.json"
    if len(folders) == 2:
        return folders[0], None, folders[1]
    if len(folders) == 3:
        return folders[0], folders[1], folders[2]
    return None


def collect_results(root: str | Path, metric: str = "rouge_l") -> dict[CellKey, Cell]:
    """Every result under ``root``, keyed by (setting, run, dataset)."""
    root = Path(root)
    if not root.is_dir():
        raise PaperTableError(f"{root}: no such directory; run the paper targets first")
    cells: dict[CellKey, Cell] = {}
    for path in sorted(root.rglob(f"eval/{RESULTS_FILENAME}")):
        location = _location(root, path)
        if location is None:
            print(
                f"warning: {path}: not <setting>/[<dataset>/]<run>/eval/; skipped", file=sys.stderr
            )
            continue
        _add_file(cells, path, location, metric)
    if not cells:
        raise PaperTableError(
            f"{root}: no {RESULTS_FILENAME} with '{metric}' under <setting>/[<dataset>/]<run>/eval/"
        )
    return cells


def _add_file(
    cells: dict[CellKey, Cell], path: Path, location: tuple[str, str | None, str], metric: str
) -> None:
    setting, folder, run = location
    results = _read_json(path)
    if not isinstance(results, dict):
        raise PaperTableError(f"{path}: expected {{dataset: {{metric: ...}}}}")
    for key, scores in results.items():
        cell = _cell(path, key, scores, metric)
        if cell is None:
            continue
        fallback = folder or _data_file_folder(path.parent, key)
        cell_key = (setting, run, dataset_column(key, fallback))
        if cell_key in cells:
            raise PaperTableError(
                f"{path}: {'/'.join(cell_key)} is also in {cells[cell_key].path}; keep one"
            )
        cells[cell_key] = cell


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _ordered(names: set[str], known: Sequence[str]) -> list[str]:
    """Known names in their paper order, then the others alphabetically."""
    return [name for name in known if name in names] + sorted(names - set(known))


def _rows(cells: dict[CellKey, Cell]) -> list[tuple[str, str]]:
    """(setting, run) rows: each KD method next to its +cot2align run, present or not."""
    rows = []
    for setting in _ordered({key[0] for key in cells}, SETTINGS):
        runs = {key[1] for key in cells if key[0] == setting}
        methods = {run.removesuffix(COT_SUFFIX) for run in runs}
        for method in _ordered(methods, list(METHODS)):
            rows.append((setting, method))
            if method not in _NO_COT_VARIANT:
                rows.append((setting, method + COT_SUFFIX))
    return rows


def method_label(run: str) -> str:
    method = run.removesuffix(COT_SUFFIX)
    label = METHODS.get(method, method)
    return f"{label} + CoT2Align" if run.endswith(COT_SUFFIX) else label


def render_table(cells: dict[CellKey, Cell], metric: str = "rouge_l") -> str:
    """The markdown table (with a heading line saying what the cells are)."""
    datasets = _ordered({key[2] for key in cells}, list(DATASETS))
    seeds = sorted({cell.num_seeds for cell in cells.values()})
    header = ["Setting", "Method", *(DATASETS.get(name, name) for name in datasets)]
    lines = [
        f"{_METRIC_LABELS.get(metric, metric)} (x100): mean ± std over {'/'.join(map(str, seeds))} evaluation seeds; "
        f"{MISSING} = no result",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * len(datasets)) + "|",
    ]
    for setting, run in _rows(cells):
        values = [cells.get((setting, run, name)) for name in datasets]
        texts = [MISSING if cell is None else cell.text() for cell in values]
        lines.append("| " + " | ".join([setting, method_label(run), *texts]) + " |")
    return "\n".join(lines) + "\n"


def write_paper_table(
    root: str | Path, output: str | Path | None = None, metric: str = "rouge_l"
) -> tuple[Path, str]:
    """Collect, render and write the table atomically; returns its path and text."""
    text = render_table(collect_results(root, metric), metric)
    path = Path(output) if output is not None else Path(root) / TABLE_FILENAME
    write_text_atomic(path, text)
    return path, text


# ---------------------------------------------------------------------------------------------
# Which model to evaluate
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cot2align_ds.experiments.paper_table", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("root", nargs="?", type=Path, help="runs root, e.g. runs/paper")
    parser.add_argument("--output", type=Path, help=f"default: <root>/{TABLE_FILENAME}")
    parser.add_argument("--metric", default="rouge_l")
    parser.add_argument("--best-model", type=Path, metavar="RUN_DIR", help="print and exit")
    args = parser.parse_args(argv)
    try:
        if args.best_model is not None:
            print(best_model_dir(args.best_model))
            return 0
        if args.root is None:
            parser.error("give a runs root (or --best-model RUN_DIR)")
        path, text = write_paper_table(args.root, args.output, args.metric)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
