"""The small reasoning benchmark: does CoT augmentation + Cross-CoT OT improve
reasoning transfer over the base cross-tokenizer methods?

One shared pipeline (data, tokenizers, teacher SFT on gold standard + CoT views, CoT
augmentation by that teacher), then every cell of ``CELLS`` distils a fresh student for each
seed. The seed varies the student's initialisation and data order only: data, tokenizers,
teacher and rationales are shared, so differences between cells come from the method. Students
are evaluated with standard prompts, greedy decoding, exact match, on a held-out split of the
training distribution (ID) and on a split with one step more than training (OOD).

Task, student and budget come from pilots (docs/reasoning_bench.md): three-step problems with
small operands, so each step is an easy fact while the direct answer needs all three; a student
with rotary positions (one with GPT-2's learnt positions does not learn to copy numbers in this
budget, so rationales cannot help it); 400 steps of 32 examples, where SFT alone reaches about
57% and the same student trained on rationales 89% when it reasons first. Rationales are written
and scored without the reference's n-gram ban (the recipe's ``eval.no_repeat_ngram_size``): they
repeat equations, and the ban forbids the right number there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.config import ConfigError, load_config, validate_config
from cot2align_ds.data.records import read_records
from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
from cot2align_ds.eval.metrics import aggregate_seeds
from cot2align_ds.eval.report import make_report
from cot2align_ds.experiments.pipeline import (
    TEACHER_ARCHITECTURE,
    augment_stage,
    exact_match_stage,
    make_tokenizers,
    run_stage,
    stage_config,
    teacher_sft_stage,
    write_splits,
)

RECIPE = "reasoning_bench"
DATA_SEED = 1234  # data and teacher are fixed across student seeds (see module docstring)
TEACHER_SEED = 7
FULL_SEEDS = (11, 22, 33, 44, 55)
QUICK_SEEDS = (11, 22)
# Three steps of small operands: each step is an easy fact for the student, the direct answer
# needs all three at once; out of distribution, one step more (pilots in docs/reasoning_bench.md).
# A one-word instruction: the prompt is in every training view, and the student's cost grows
# with its length.
INSTRUCTION = "Solve."
ID_TASK = ArithmeticTaskSpec(num_steps=3, max_start=9, max_operand=2, instruction=INSTRUCTION)
OOD_TASK = ArithmeticTaskSpec(num_steps=4, max_start=9, max_operand=2, instruction=INSTRUCTION)


@dataclass(frozen=True)
class BenchSize:
    num_train: int
    num_test: int
    teacher_epochs: int
    student_epochs: int
    teacher_max_steps: int | None
    student_max_steps: int | None


# Students: 400 optimizer steps of 32 examples in every cell (10.7 epochs of the standard data,
# 5.3 of standard + CoT data), where SFT alone reaches ~57% (pilots in docs/reasoning_bench.md).
FULL = BenchSize(1200, 200, 36, 11, None, 400)
QUICK = BenchSize(96, 16, 1, 1, 2, 2)


@dataclass(frozen=True)
class Cell:
    """One grid cell: a base method plus what CoT2Align adds (``cot2align`` = config keys)."""

    name: str
    method: str
    cot_data: bool = False  # train on the teacher's rationales (data.cot_records=all)
    cot2align: dict[str, Any] = field(default_factory=dict)
    label: str = ""


_C2A = {"enabled": True}
CELLS: tuple[Cell, ...] = (
    Cell("sft", "sft", label="SFT only (no teacher)"),
    # Rationales against answers only, with no teacher in the loss: does step-by-step help here?
    Cell("sft+cot_data", "sft", True, label="SFT on standard + CoT data (no teacher)"),
    Cell("uld", "uld", label="ULD"),
    Cell("mined", "mined", label="MinED"),
    Cell("dskd_cma", "dskd_cma", label="DSKD-CMA"),
    Cell("uld+cot2align", "uld", True, _C2A, "ULD + CoT2Align"),
    Cell("mined+cot2align", "mined", True, _C2A, "MinED + CoT2Align"),
    Cell("dskd_cma+cot2align", "dskd_cma", True, _C2A, "DSKD-CMA + CoT2Align"),
    Cell("dskd_cma+cot_no_ot", "dskd_cma", True, {}, "DSKD-CMA + CoT data, no OT"),
    Cell(
        "dskd_cma+ot_no_cot",
        "dskd_cma",
        False,
        {"enabled": True, "cross_cot": False},
        "DSKD-CMA + OT, no CoT data",
    ),
    Cell(
        "dskd_cma+cot2align_no_cross",
        "dskd_cma",
        True,
        {"enabled": True, "cross_cot": False},
        "DSKD-CMA + CoT2Align without Cross-CoT",
    ),
    Cell(
        "dskd_cma+cot2align_refcompat",
        "dskd_cma",
        True,
        {"enabled": True, "reference_compat": True},
        "DSKD-CMA + CoT2Align (reference-compat)",
    ),
    # The epsilon sweep: the reference's 10 (the cell above) down to sharp plans.
    Cell(
        "dskd_cma+cot2align_eps1",
        "dskd_cma",
        True,
        {"enabled": True, "epsilon": 1.0},
        "DSKD-CMA + CoT2Align, epsilon 1",
    ),
    Cell(
        "dskd_cma+cot2align_eps0.1",
        "dskd_cma",
        True,
        {"enabled": True, "epsilon": 0.1},
        "DSKD-CMA + CoT2Align, epsilon 0.1",
    ),
)
# (cell, its peer): each "+ CoT2Align" against its base, each ablation and epsilon against the
# full DSKD-CMA + CoT2Align cell (epsilon 10).
COMPARISONS = (
    ("sft+cot_data", "sft"),
    ("uld+cot2align", "uld"),
    ("mined+cot2align", "mined"),
    ("dskd_cma+cot2align", "dskd_cma"),
    ("dskd_cma+cot_no_ot", "dskd_cma+cot2align"),
    ("dskd_cma+ot_no_cot", "dskd_cma"),
    ("dskd_cma+cot2align_no_cross", "dskd_cma+cot2align"),
    ("dskd_cma+cot2align_refcompat", "dskd_cma+cot2align"),
    ("dskd_cma+cot2align_eps1", "dskd_cma+cot2align"),
    ("dskd_cma+cot2align_eps0.1", "dskd_cma+cot2align"),
)
# The rationale question: the student trained on rationales, prompted to reason first, against
# the same student trained on answers only (``grid_statistics``).
REASONING_COMPARISON = ("sft+cot_data", "sft")
MECHANISM_KEYS = (
    "ot/aligned_mass/layers_0_0",
    "ot/aligned_mass/layers_-1_-1",
    "ot/aligned_mass_uniform",
)
CELLS_BY_NAME = {cell.name: cell for cell in CELLS}


def make_bench_data(out: Path, size: BenchSize) -> dict[str, Path]:
    """Train/dev/test in distribution, and an OOD test with more steps than training."""
    splits = {
        "train": make_split(size.num_train, ID_TASK, DATA_SEED, "train"),
        "dev": make_split(max(size.num_test // 2, 8), ID_TASK, DATA_SEED + 1, "dev"),
        "test_id": make_split(size.num_test, ID_TASK, DATA_SEED + 2, "test-id"),
        "test_ood": make_split(size.num_test, OOD_TASK, DATA_SEED + 3, "test-ood"),
    }
    return write_splits(out, splits)


@dataclass
class Shared:
    """What every cell builds on: base config, data, teacher and its rationales."""

    base: dict[str, Any]
    data: dict[str, Path]
    tokenizers: dict[str, Path]
    teacher_dir: Path
    cot_file: Path
    size: BenchSize
    timings: dict[str, float] = field(default_factory=dict)
    augment_stats: dict[str, Any] = field(default_factory=dict)


def _train_teacher(
    out: Path, base: dict, data: dict, tokenizers: dict, size: BenchSize
) -> tuple[Path, float]:
    # The teacher learns standard and CoT views from the gold rationales (cot_records=all).
    raw = teacher_sft_stage(
        base,
        {"architecture": TEACHER_ARCHITECTURE, "tokenizer": str(tokenizers["teacher"])},
        output_dir=str(out / "teacher"),
        data__cot_records="all",
        data__train_file=str(data["train"]),
        data__dev_file=str(data["dev"]),
        train__epochs=size.teacher_epochs,
        train__max_steps=size.teacher_max_steps,
        train__seed=TEACHER_SEED,
        # One CPU process: ZeRO-3 partitions nothing there (as for the students, cell_config).
        deepspeed__student_config="student_zero2.json",
    )
    return run_stage(raw, "reasoning-bench teacher")


def build_shared(out: Path, size: BenchSize) -> Shared:
    base = load_config(RECIPE).model_dump(mode="json")
    data = make_bench_data(out, size)
    tokenizers = make_tokenizers(out, data["train"], base["data"]["template"])
    # One thread, on any machine: the order of float sums follows the thread count, and the
    # teacher and its rationales are what every cell shares (the published ones were built so).
    with _torch_threads(1):
        teacher_dir, teacher_s = _train_teacher(out, base, data, tokenizers, size)
        started = time.perf_counter()
        augment = augment_stage(
            teacher_dir, data["train"], out / "augment", base, seed=TEACHER_SEED
        )
    shared = Shared(base, data, tokenizers, teacher_dir, augment.output_file, size)
    shared.timings = {"teacher_train_s": teacher_s, "augment_s": time.perf_counter() - started}
    shared.augment_stats = asdict(augment.stats)
    return shared


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SHARED_FILE = "shared.json"


def save_shared(out: Path, shared: Shared) -> None:
    """Record what ``build_shared`` made, so that probes can reuse it (``load_shared``)."""
    payload = {
        "data": {k: str(v) for k, v in shared.data.items()},
        "tokenizers": {k: str(v) for k, v in shared.tokenizers.items()},
        "teacher_dir": str(shared.teacher_dir),
        "cot_file": str(shared.cot_file),
        "size": asdict(shared.size),
        "timings": shared.timings,
        "augment_stats": shared.augment_stats,
    }
    _write_json(out / SHARED_FILE, payload)


def _shared_part(size: dict[str, Any]) -> dict[str, Any]:
    # What the shared pipeline depends on: the student budget does not change data or teacher.
    return {key: value for key, value in size.items() if not key.startswith("student_")}


def load_shared(out: Path, size: BenchSize) -> Shared | None:
    """The shared pipeline an earlier run left in ``out`` for this data and teacher budget
    (the student budget may differ); None if absent or partial."""
    path = out / SHARED_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    paths = [*saved["data"].values(), *saved["tokenizers"].values()]
    paths += [saved["teacher_dir"], saved["cot_file"]]
    if _shared_part(saved["size"]) != _shared_part(asdict(size)):
        return None
    if not all(Path(p).exists() for p in paths):
        return None
    base = load_config(RECIPE).model_dump(mode="json")
    shared = Shared(
        base,
        {k: Path(v) for k, v in saved["data"].items()},
        {k: Path(v) for k, v in saved["tokenizers"].items()},
        Path(saved["teacher_dir"]),
        Path(saved["cot_file"]),
        size,
    )
    shared.timings, shared.augment_stats = saved["timings"], saved["augment_stats"]
    return shared


def cell_config(shared: Shared, cell: Cell, seed: int, run_dir: Path) -> dict[str, Any]:
    """The run config of one (cell, seed): the recipe plus what the cell changes."""
    teacher = None if cell.method == "sft" else {"name_or_path": str(shared.teacher_dir)}
    train_file = shared.cot_file if cell.cot_data else shared.data["train"]
    return stage_config(
        shared.base,
        output_dir=str(run_dir),
        student__tokenizer=str(shared.tokenizers["student"]),
        teacher=teacher,
        distill__method=cell.method,
        data__train_file=str(train_file),
        data__dev_file=str(shared.data["dev"]),
        data__cot_records="all" if cell.cot_data else "none",
        cot2align={**shared.base["cot2align"], "enabled": False, **cell.cot2align},
        train__epochs=shared.size.student_epochs,
        train__max_steps=shared.size.student_max_steps,
        train__seed=seed,
        # One CPU process: ZeRO-3 partitions nothing there and its hooks only add time
        # (the engine pilots in docs/reasoning_bench.md).
        deepspeed__student_config="student_zero2.json",
        tracking__run_name=f"reasoning_bench_{cell.name}_seed{seed}",
    )


# Generation budgets: a direct answer is a number; a CoT answer at 2-3 steps is ~40 tokens.
STANDARD_NEW_TOKENS = 8
COT_NEW_TOKENS = 96


def evaluate_model(
    model_dir: Path, shared: Shared, out_dir: Path, *, cot_prompts: bool = False
) -> dict[str, float]:
    """Exact match (%) on the ID and OOD tests: standard prompts, greedy decoding; the
    predictions are kept (``predictions_{id,ood}.jsonl``) to see what a score is made of.

    ``cot_prompts`` adds ``exact_match_id_cot``: the ID test prompted with the CoT template and
    the answer read after "the answer is" (a diagnostic of what the student learnt from the
    rationales; the benchmark's protocol is standard prompts)."""
    views = [("id", "standard"), ("ood", "standard")] + ([("id", "cot")] if cot_prompts else [])
    scores = {}
    for split, view in views:
        suffix = "_cot" if view == "cot" else ""
        scores[f"exact_match_{split}{suffix}"] = exact_match_stage(
            model_dir,
            read_records(shared.data[f"test_{split}"]),
            shared.base,
            out_dir / f"predictions_{split}{suffix}.jsonl",
            max_new_tokens=COT_NEW_TOKENS if view == "cot" else STANDARD_NEW_TOKENS,
            prompt_view=view,
        )
    return scores


def _write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def _summarise(per_seed: list[dict[str, float]]) -> dict[str, dict]:
    keys = ("exact_match_id", "exact_match_ood", "exact_match_id_cot")
    return {
        key: aggregate_seeds([run[key] for run in per_seed]).to_dict()
        for key in keys
        if all(key in run for run in per_seed)
    }


def with_teacher_cache(raw: dict[str, Any], root: Path) -> dict:
    """``raw`` reading the teacher from a cache under ``root``: one cache per distinct teacher
    layout (training file, views, layers; ``teacher_cache.build.layout_digest``), built on first
    use and shared by every cell and seed that reads the same states. SFT cells are unchanged."""
    from cot2align_ds.teacher_cache.build import build_teacher_cache, layout_digest
    from cot2align_ds.teacher_cache.store import INDEX_FILENAME

    if raw.get("teacher") is None:
        return raw
    path = root / layout_digest(validate_config(raw, "reasoning-bench cache"))
    raw = {**raw, "teacher_cache": {**raw.get("teacher_cache", {}), "path": str(path)}}
    if not (path / INDEX_FILENAME).is_file():
        started = time.perf_counter()
        build_teacher_cache(validate_config(raw, "reasoning-bench cache"), log=lambda _: None)
        # Kept beside the cache: a resumed grid that finds it built still counts its cost.
        _write_json(path.with_suffix(BUILD_TIME_SUFFIX), {"build_s": time.perf_counter() - started})
    return raw


BUILD_TIME_SUFFIX = ".build.json"


def cache_build_seconds(root: Path) -> float:
    """The build time of every teacher cache under ``root`` (``with_teacher_cache``)."""
    files = Path(root).glob(f"*{BUILD_TIME_SUFFIX}")
    return sum(json.loads(path.read_text())["build_s"] for path in files)


RUN_FILE = "bench_run.json"  # one (cell, seed): its scores and train time, written last


def run_one(shared: Shared, cell: Cell, seed: int, cell_dir: Path) -> dict[str, float]:
    """Train + evaluate one (cell, seed) into ``cell_dir/seed<N>``; a run whose scores are
    already there is kept (``RUN_FILE`` is written last, atomically), so a stopped
    grid resumes. The teacher's states come from a cache shared across cells and seeds
    (``with_teacher_cache``). Cells trained on CoT data are also scored with CoT prompts."""
    run_dir = cell_dir / f"seed{seed}"
    raw = cell_config(shared, cell, seed, run_dir)
    digest = _config_digest(raw)
    kept = _kept_scores(run_dir, digest)
    if kept is not None:
        return kept
    cache_root = cell_dir.parent.parent / "teacher_cache"
    raw = with_teacher_cache(raw, cache_root)
    model_dir, seconds = run_stage(raw, f"reasoning-bench {cell.name} seed {seed}")
    scores = evaluate_model(model_dir, shared, run_dir, cot_prompts=cell.cot_data)
    _write_json(run_dir / "eval_results.json", _summarise([scores]))
    scores["train_s"] = seconds
    _write_json(run_dir / RUN_FILE, {**scores, "config_digest": digest})
    return scores


def _config_digest(raw: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(raw, sort_keys=True).encode(), digest_size=16).hexdigest()


def _kept_scores(run_dir: Path, digest: str) -> dict[str, float] | None:
    """The scores of a finished run in ``run_dir`` when it ran the config with ``digest``; a
    run left by a grid with another config (budget, cell definition) is redone, not reused."""
    done = run_dir / RUN_FILE
    if not done.is_file():
        return None
    saved = json.loads(done.read_text())
    return saved if saved.pop("config_digest", None) == digest else None


def grid_statistics(output_dir: Path, cells: Sequence[Cell], seeds: Sequence[int]) -> dict:
    """Per cell, the 95% intervals of ID and OOD exact match (bootstrap over problems and
    seeds); per comparison (``COMPARISONS``), the paired difference, its interval and the
    smallest difference the design detects; per OT cell, the plans' mass on character-aligned
    pairs at the last logged step (mean over seeds) against the uniform plan's share."""
    from cot2align_ds.experiments.bench_stats import bootstrap_interval, score_matrix

    root = Path(output_dir) / "cells"
    matrices = {
        (cell.name, split): score_matrix(
            [root / cell.name / f"seed{seed}" / f"predictions_{split}.jsonl" for seed in seeds]
        )
        for cell in cells
        for split in _splits(cell)
    }
    stats: dict[str, Any] = {"cells": {}, "comparisons": [], "mechanism": {}}
    for cell in cells:
        stats["cells"][cell.name] = {
            split: bootstrap_interval(matrices[cell.name, split]).to_dict()
            for split in _splits(cell)
        }
        rows = [_last_row(root / cell.name / f"seed{seed}") for seed in seeds]
        if all(MECHANISM_KEYS[-1] in row for row in rows):
            stats["mechanism"][cell.name] = {
                key: sum(row[key] for row in rows) / len(rows)
                for key in MECHANISM_KEYS
                if all(key in row for row in rows)
            }

    def difference(cell_key: tuple[str, str], peer_key: tuple[str, str]) -> dict[str, float]:
        return _paired(matrices[cell_key], matrices[peer_key])

    names = {cell.name for cell in cells}
    for name, peer in COMPARISONS:
        if name in names and peer in names:
            entry = {"cell": name, "peer": peer}
            # Both trained on rationales: also compare them reasoning first (CoT prompts).
            for split in ("id", "ood", "id_cot"):
                if (name, split) in matrices and (peer, split) in matrices:
                    entry[split] = difference((name, split), (peer, split))
            stats["comparisons"].append(entry)
    name, peer = REASONING_COMPARISON
    if name in names and peer in names:
        # Does reasoning first help? The student trained on rationales, prompted to reason,
        # against the same student trained on answers only, answering directly; same problems.
        stats["reasoning"] = {
            "cell": name,
            "peer": peer,
            "id": difference((name, "id_cot"), (peer, "id")),
        }
    return stats


def _paired(a_NP, b_NP) -> dict[str, float]:
    """A - B over the same seeds and problems: its interval and the smallest difference the
    design detects."""
    from cot2align_ds.experiments.bench_stats import detectable_difference, paired_difference

    diff = paired_difference(a_NP, b_NP)
    return {**diff.to_dict(), "detectable": detectable_difference(diff)}


def _splits(cell: Cell) -> tuple[str, ...]:
    """The scored test views of a cell: cells trained on rationales are also scored reasoning
    first (``evaluate_model(cot_prompts=True)``)."""
    return ("id", "ood", "id_cot") if cell.cot_data else ("id", "ood")


def _last_row(run_dir: Path) -> dict[str, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return next((row for row in reversed(rows) if "loss/total" in row), {})


def statistics_tables(stats: dict) -> str:
    """Markdown: intervals per cell, paired differences, the mechanism diagnostic."""

    def interval(entry: dict) -> str:
        return f"{entry['mean']:.1f} [{entry['low']:.1f}, {entry['high']:.1f}]"

    def optional(entry: dict, split: str, detectable: bool = False) -> str:
        if split not in entry:
            return "- | -" if detectable else "-"
        text = interval(entry[split])
        return f"{text} | {entry[split]['detectable']:.1f}" if detectable else text

    lines = [
        "| cell | ID, mean [95% CI] | OOD, mean [95% CI] | ID, CoT prompts, mean [95% CI] |",
        "|---|---|---|---|",
    ]
    for name, cell in stats["cells"].items():
        lines.append(
            f"| `{name}` | {interval(cell['id'])} | {interval(cell['ood'])} "
            f"| {optional(cell, 'id_cot')} |"
        )
    lines += ["", "| comparison (cell - peer) | ID difference [95% CI] | detectable | "
              "OOD difference [95% CI] | detectable | ID, CoT prompts, difference [95% CI] | "
              "detectable |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for entry in stats["comparisons"]:
        lines.append(
            f"| `{entry['cell']}` - `{entry['peer']}` | {optional(entry, 'id', True)} | "
            f"{optional(entry, 'ood', True)} | {optional(entry, 'id_cot', True)} |"
        )
    if "reasoning" in stats:
        entry = stats["reasoning"]
        lines += ["", "| reasoning first vs answers only | ID difference [95% CI] | detectable |",
                  "|---|---|---|",  # fmt: skip
                  f"| `{entry['cell']}` with CoT prompts - `{entry['peer']}` | "
                  f"{optional(entry, 'id', True)} |"]  # fmt: skip
    if stats["mechanism"]:
        lines += ["", "| OT cell | plan mass on aligned pairs, layers 0/0 | layers -1/-1 | "
                  "uniform plan's share |", "|---|---|---|---|"]  # fmt: skip
        for name, values in stats["mechanism"].items():
            cells = [f"{values[key]:.3f}" if key in values else "-" for key in MECHANISM_KEYS]
            lines.append(f"| `{name}` | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _fmt(stats: dict) -> str:
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def results_table(results: dict) -> str:
    """Markdown: one row per cell, mean ± std over seeds of ID and OOD exact match (and, for
    cells trained on CoT data, ID exact match under CoT prompts)."""
    teacher = results["teacher"]
    lines = [
        "| cell | exact match ID (%) | exact match OOD (%) | ID, CoT prompts (%) "
        "| train s / seed |",
        "|---|---|---|---|---|",
        f"| teacher (reference, seed {TEACHER_SEED}) | {teacher['exact_match_id']:.1f} "
        f"| {teacher['exact_match_ood']:.1f} | {teacher.get('exact_match_id_cot', 0.0):.1f} "
        f"| {results['timings']['teacher_train_s']:.0f} |",
    ]
    for name, cell in results["cells"].items():
        mean_s = sum(cell["train_s_per_seed"]) / len(cell["train_s_per_seed"])
        cot = _fmt(cell["exact_match_id_cot"]) if "exact_match_id_cot" in cell else "-"
        lines.append(
            f"| {cell['label']} (`{name}`) | {_fmt(cell['exact_match_id'])} "
            f"| {_fmt(cell['exact_match_ood'])} | {cot} | {mean_s:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Grouped bars (ID, OOD, and ID with CoT prompts for the cells trained on rationales): the
    mean over seeds and problems with its 95% interval (``grid_statistics``); the teacher's
    scores as dashed lines."""
    names = list(results["cells"])
    figure = Figure(figsize=(max(6.0, 0.8 * len(names)), 4.8))
    axes = figure.subplots()
    series = (
        (-0.27, "id", "tab:blue", "ID"),
        (0.0, "ood", "tab:orange", "OOD"),
        (0.27, "id_cot", "tab:green", "ID, CoT prompts"),
    )
    for offset, split, colour, label in series:
        shown = [n for n in names if split in results["stats"]["cells"][n]]
        cells = [results["stats"]["cells"][name][split] for name in shown]
        means = [cell["mean"] for cell in cells]
        errors = [
            [cell["mean"] - cell["low"] for cell in cells],
            [cell["high"] - cell["mean"] for cell in cells],
        ]
        positions = [names.index(name) + offset for name in shown]
        axes.bar(positions, means, 0.27, yerr=errors, capsize=2, color=colour, label=label)
        if split != "id_cot":
            axes.axhline(
                results["teacher"][f"exact_match_{split}"],
                color=colour,
                linestyle="--",
                linewidth=1,
                label=f"teacher, {label}",
            )
    axes.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
    axes.set_ylabel("exact match (%), 95% interval")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)


def _pick(kind: str, names: Sequence[str] | None, by_name: dict[str, Any]) -> list[Any]:
    """The named entries of ``by_name`` (all of them for None); unknown names are one error."""
    if names is None:
        return list(by_name.values())
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ConfigError(f"{kind}: unknown {unknown}; choose from {', '.join(by_name)}")
    return [by_name[name] for name in names]


def _header(quick: bool, seeds: Sequence[int], size: BenchSize) -> str:
    return (
        f"# Reasoning benchmark ({'quick' if quick else 'full'})\n\n"
        f"Exact match on {size.num_test} held-out problems: ID = {ID_TASK.num_steps} steps, "
        f"numbers as in training (start <= {ID_TASK.max_start}, steps <= {ID_TASK.max_operand}); "
        f"OOD = {OOD_TASK.num_steps} steps, start <= {OOD_TASK.max_start}, "
        f"steps <= {OOD_TASK.max_operand}. Standard prompts, "
        "greedy decoding; "
        f"mean ± sample std over student seeds {list(seeds)} (data, teacher and rationales "
        "shared across seeds).\n\n"
    )


def run_reasoning_bench(
    output_dir: Path,
    *,
    quick: bool,
    seeds: Sequence[int] | None = None,
    cells: Sequence[str] | None = None,
    jobs: int = 1,
) -> dict:
    """Run the grid; write per-cell runs, ``results.json``, ``results.md`` and ``results.png``.
    ``jobs``: student runs at once (``run_cells``)."""
    started = time.perf_counter()
    chosen, size = _pick("cells", cells, CELLS_BY_NAME), QUICK if quick else FULL
    seeds = tuple(seeds or (QUICK_SEEDS if quick else FULL_SEEDS))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shared = load_shared(output_dir, size)
    reused = shared is not None
    if shared is None:
        shared = build_shared(output_dir, size)
        save_shared(output_dir, shared)
    results: dict[str, Any] = {"quick": quick, "size": asdict(size), "seeds": list(seeds)}
    results["teacher"] = evaluate_model(
        shared.teacher_dir, shared, output_dir / "teacher", cot_prompts=True
    )
    results["augment"] = shared.augment_stats
    resumed = 0
    for cell in chosen:
        for seed in seeds:
            run_dir = output_dir / "cells" / cell.name / f"seed{seed}"
            digest = _config_digest(cell_config(shared, cell, seed, run_dir))
            resumed += _kept_scores(run_dir, digest) is not None
    per_seed = run_cells(shared, chosen, seeds, output_dir, jobs)
    results["cells"] = {}
    for cell in chosen:
        summary = _summarise(per_seed[cell.name])
        _write_json(output_dir / "cells" / cell.name / "eval_results.json", summary)
        train_s = [run["train_s"] for run in per_seed[cell.name]]
        results["cells"][cell.name] = {
            **summary,
            "label": cell.label,
            "seeds": list(seeds),
            "train_s_per_seed": train_s,
        }
    results["stats"] = grid_statistics(output_dir, chosen, seeds)
    wall_s = time.perf_counter() - started
    # A reused teacher still belongs to the grid's cost: the total adds its build back.
    shared_s = shared.timings["teacher_train_s"] + shared.timings["augment_s"] if reused else 0.0
    results["timings"] = {
        **shared.timings,
        "teacher_cache_s": cache_build_seconds(output_dir / "teacher_cache"),
        "wall_s": wall_s,
        "shared_reused": reused,
        "runs_resumed": resumed,  # (cell, seed) runs an earlier, stopped grid left
        "jobs": jobs,
        "total_s": wall_s + shared_s,
    }
    _write_json(output_dir / "results.json", results)
    # The same table and plot as `cot2align report <cells...>` gives for these runs.
    make_report([output_dir / "cells" / cell.name for cell in chosen], output_dir / "report")
    plot_results(results, output_dir / "results.png")
    table = _header(quick, seeds, size) + results_table(results)
    table += "\n" + statistics_tables(results["stats"])
    write_text_atomic(output_dir / "results.md", table + "\n![results](results.png)\n")
    return results


def run_cells(
    shared: Shared, cells: Sequence[Cell], seeds: Sequence[int], output_dir: Path, jobs: int = 1
) -> dict[str, list[dict[str, float]]]:
    """Per cell, the scores of each seed's run (``run_one``), in seed order.

    Runs are started seed-major, so a grid stopped part-way holds whole seeds and a rerun
    resumes. With ``jobs`` > 1, that many runs train at once in worker processes, each on its
    share of this process's torch threads (these small models use a second thread poorly:
    docs/reasoning_bench.md measures both ways), and within a seed the OT cells start first,
    so that the grid does not end on one long run while the other workers idle. The teacher
    caches are built here first, so no two workers build the same one."""
    tasks = [(cell, seed) for seed in seeds for cell in cells]
    if jobs > 1:
        tasks.sort(key=lambda task: (seeds.index(task[1]), -_relative_cost(task[0])))
    root = Path(output_dir) / "cells"
    if jobs <= 1:
        scores = [run_one(shared, cell, seed, root / cell.name) for cell, seed in tasks]
    else:
        _build_caches(shared, tasks, Path(output_dir))
        scores = _run_in_workers(shared, tasks, root, jobs)
    per_cell: dict[str, list[dict[str, float]]] = {cell.name: [] for cell in cells}
    for (cell, _), result in zip(tasks, scores, strict=True):
        per_cell[cell.name].append(result)
    return per_cell


def _relative_cost(cell: Cell) -> int:
    """Rank of a run's length (the grid's cost line: OT cells 2-3x the others, CoT data the
    longer rows)."""
    return 2 * bool(cell.cot2align.get("enabled")) + cell.cot_data


def _build_caches(shared: Shared, tasks: list[tuple[Cell, int]], output_dir: Path) -> None:
    seen: set[str] = set()
    for cell, seed in tasks:
        run_dir = output_dir / "cells" / cell.name / f"seed{seed}"
        raw = cell_config(shared, cell, seed, run_dir)
        if cell.name in seen or _kept_scores(run_dir, _config_digest(raw)) is not None:
            continue
        seen.add(cell.name)  # the cache does not depend on the seed
        with_teacher_cache(raw, output_dir / "teacher_cache")


def _run_in_workers(
    shared: Shared, tasks: list[tuple[Cell, int]], root: Path, jobs: int
) -> list[dict[str, float]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    # Spawned, not forked: this process may hold a process group and thread pools. A spawned
    # process inherits "spawn" as its default start method, so the worker puts back this
    # process's: with "spawn" every run's DataLoader worker would import the package afresh
    # (measured: 10 s of a 2-step run).
    pool = ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(threads, multiprocessing.get_start_method()),
    )
    try:
        futures = [
            pool.submit(run_one, shared, cell, seed, root / cell.name) for cell, seed in tasks
        ]
        return [future.result() for future in futures]
    finally:
        # On a failure: the runs not started yet are dropped, the running ones finish.
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(threads: int, start_method: str) -> None:
    import multiprocessing
    import os

    import torch

    from cot2align_ds.engine.deepspeed_engines import RENDEZVOUS_VARS

    for name in RENDEZVOUS_VARS:  # each worker forms its own one-rank group
        os.environ.pop(name, None)
    multiprocessing.set_start_method(start_method, force=True)
    torch.set_num_threads(threads)


# -- The grid's teacher time with and without the teacher cache -----------------------------------

TEACHER_TIME_FILE = "teacher_time.json"


def _steady_step_s(run_dir: Path) -> float:
    """Seconds per optimizer step between the first and the last logged step (start-up and
    the final save excluded)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [row for row in map(json.loads, lines) if "loss/total" in row]
    first, last = rows[0], rows[-1]
    return (last["time"] - first["time"]) / max(last["step"] - first["step"], 1)


def measure_teacher_time(output_dir: Path, *, quick: bool, steps: int) -> dict:
    """What the teacher costs the grid of ``output_dir`` with and without the teacher cache.

    The grid's teacher cells fall into one group per cache layout (the views and layers they
    read). For each group, back to back: its cache is built afresh (timed), then ``steps``
    steps of one of its cells (seed ``FULL_SEEDS[0]``) are trained with the live teacher and
    from that cache. The difference of the two steady-state step times is the live teacher's
    time per step for every run of the layout (its batches do not depend on the student's
    method). Without the cache the grid pays it at every step of every run; with the cache it
    pays the builds. Writes ``teacher_time.json``."""
    import shutil

    from cot2align_ds.teacher_cache.build import build_teacher_cache, layout_digest

    output_dir = Path(output_dir)
    size = QUICK if quick else FULL
    shared = load_shared(output_dir, size)
    done = output_dir / "results.json"
    if shared is None or not done.is_file():
        raise ConfigError(f"--output-dir '{output_dir}': run the grid there first")
    grid = json.loads(done.read_text())
    seed = (QUICK_SEEDS if quick else FULL_SEEDS)[0]
    root = output_dir / "teacher_time"
    groups: dict[str, list[Cell]] = {}
    for name in grid["cells"]:
        cell = CELLS_BY_NAME[name]
        if cell.method != "sft":
            raw = cell_config(shared, cell, seed, root / "unused")
            groups.setdefault(layout_digest(validate_config(raw, "teacher time")), []).append(cell)
    rows = []
    for digest, cells in groups.items():
        cell, cache = cells[0], root / f"cache-{digest}"
        shutil.rmtree(cache, ignore_errors=True)
        step_s = {}
        for mode in ("build", "live", "cached"):
            run_dir = root / f"{cell.name}-{mode}"
            raw = stage_config(
                cell_config(shared, cell, seed, run_dir),
                train__max_steps=steps,
                train__log_every=max(steps // 10, 1),
            )
            if mode != "live":
                raw = {**raw, "teacher_cache": {**raw["teacher_cache"], "path": str(cache)}}
            started = time.perf_counter()
            if mode == "build":
                build_teacher_cache(validate_config(raw, "teacher time"), log=lambda _: None)
                build_s = time.perf_counter() - started
                continue
            run_stage(raw, f"reasoning-bench teacher time {cell.name} {mode}")
            step_s[mode] = _steady_step_s(run_dir)
        runs = len(cells) * len(grid["seeds"])
        teacher_step_s = step_s["live"] - step_s["cached"]
        rows.append({
            "layout": digest,
            "cells": [c.name for c in cells],
            "measured_on": cell.name,
            "build_s": build_s,
            "step_s_live": step_s["live"],
            "step_s_cached": step_s["cached"],
            "runs": runs,
            "grid_teacher_s_live": teacher_step_s * runs * grid["size"]["student_max_steps"],
        })  # fmt: skip
    result = {
        "steps": steps,
        "seed": seed,
        "grid_seeds": grid["seeds"],
        "layouts": rows,
        "grid_teacher_s_live": sum(row["grid_teacher_s_live"] for row in rows),
        "grid_teacher_s_cached": sum(row["build_s"] for row in rows),
    }
    _write_json(output_dir / TEACHER_TIME_FILE, result)
    return result


def teacher_time_table(result: dict) -> str:
    lines = [
        "| cells (one cache layout) | cache build s | step s, live teacher "
        "| step s, from the cache | runs in the grid | grid teacher s without the cache |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["layouts"]:
        lines.append(
            f"| {', '.join(f'`{c}`' for c in row['cells'])} | {row['build_s']:.1f} "
            f"| {row['step_s_live']:.3f} | {row['step_s_cached']:.3f} | {row['runs']} "
            f"| {row['grid_teacher_s_live']:.0f} |"
        )
    lines.append(
        f"\nThe grid's teacher time: {result['grid_teacher_s_live']:.0f} s with the live "
        f"teacher (each step's difference, times every step of every run), "
        f"{result['grid_teacher_s_cached']:.0f} s with the caches (their builds)."
    )
    return "\n".join(lines) + "\n"


# -- Probes: single-seed diagnostics of why a cell scores what it scores ---------------------------


@dataclass(frozen=True)
class Probe:
    """One diagnostic run on the shared pipeline: a cell plus run-config changes.

    ``changes`` maps dotted run-config keys (``"cot2align.epsilon"``) to values, applied on top of
    the cell's own config. ``question`` is what the probe asks (the table's first column).
    """

    name: str
    cell: Cell
    changes: dict[str, Any]
    question: str


BIGGER_STUDENT = {  # the teacher's width and depth, the grid student's architecture
    "model_type": "gpt_neox",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 256,
    "rotary_pct": 1.0,
    "use_parallel_residual": False,
    "tie_word_embeddings": False,
}
# The grid student's size with GPT-2's learnt absolute positions instead of rotary ones.
GPT2_STUDENT = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}
_SFT_COT = CELLS_BY_NAME["sft+cot_data"]
_OT_ONLY = CELLS_BY_NAME["dskd_cma+ot_no_cot"]
_C2A_CELL = CELLS_BY_NAME["dskd_cma+cot2align"]


def _times_the_steps(factor: int) -> dict[str, int]:
    # The grid's epochs already cover its steps on either data, so factor x both covers factor x.
    return {
        "train.epochs": FULL.student_epochs * factor,
        "train.max_steps": FULL.student_max_steps * factor,
    }


_TWICE = _times_the_steps(2)
PROBES: tuple[Probe, ...] = (
    Probe(
        "sft_3x",
        CELLS_BY_NAME["sft"],
        _times_the_steps(3),
        "SFT, 3x the steps",
    ),
    Probe(
        "sft_gpt2",
        CELLS_BY_NAME["sft"],
        {"student.architecture": GPT2_STUDENT},
        "SFT, GPT-2 student (learnt positions)",
    ),
    Probe(
        "sft_cot_gpt2",
        _SFT_COT,
        {"student.architecture": GPT2_STUDENT},
        "SFT on standard + CoT data, GPT-2 student (learnt positions)",
    ),
    Probe(
        "sft_wide",
        CELLS_BY_NAME["sft"],
        {"student.architecture": BIGGER_STUDENT},
        "SFT, teacher-sized student",
    ),
    Probe("sft_cot", _SFT_COT, {}, "SFT on standard + CoT data"),
    # The rationale question at twice the grid's steps, where the student has learnt to follow
    # its rationales (pilots in docs/reasoning_bench.md); PROBE_COMPARISONS pairs them.
    Probe("sft_2x", CELLS_BY_NAME["sft"], _TWICE, "SFT, 2x the steps"),
    Probe(
        "sft_cot_2x",
        _SFT_COT,
        _TWICE,
        "SFT on standard + CoT data, 2x the steps",
    ),
    Probe(
        "sft_cot_wide",
        _SFT_COT,
        {"student.architecture": BIGGER_STUDENT},
        "SFT on standard + CoT data, teacher-sized student",
    ),
    Probe("uld_kd0.2", CELLS_BY_NAME["uld"], {"distill.kd_rate": 0.2}, "ULD, kd_rate 0.2"),
    Probe(
        "dskd_kd0.2", CELLS_BY_NAME["dskd_cma"], {"distill.kd_rate": 0.2}, "DSKD-CMA, kd_rate 0.2"
    ),
    Probe("ot_eps1", _OT_ONLY, {"cot2align.epsilon": 1.0}, "OT only: epsilon 1 (sharper plan)"),
    Probe("ot_eps0.1", _OT_ONLY, {"cot2align.epsilon": 0.1}, "OT only: epsilon 0.1"),
    Probe("ot_w0.05", _OT_ONLY, {"cot2align.ot_weight": 0.05}, "OT only: OT weight 0.05"),
    Probe("ot_w1", _OT_ONLY, {"cot2align.ot_weight": 1.0}, "OT only: OT weight 1.0"),
    Probe(
        "ot_last_layer",
        _OT_ONLY,
        {"cot2align.layer_pairs": [{"student": -1, "teacher": -1}]},
        "OT only: last layer only",
    ),
    Probe(
        "ot_all_layers",
        _OT_ONLY,
        {
            "cot2align.layer_pairs": [
                {"student": 0, "teacher": 0},
                {"student": 1, "teacher": 2},
                {"student": -1, "teacher": -1},
            ]
        },
        "OT only: embedding, middle and last layers",
    ),
    Probe("c2a_iters100", _C2A_CELL, {"cot2align.num_iters": 100}, "CoT2Align: 100 iterations"),
    Probe("c2a_eps1", _C2A_CELL, {"cot2align.epsilon": 1.0}, "CoT2Align: epsilon 1"),
    Probe("c2a_w0.05", _C2A_CELL, {"cot2align.ot_weight": 0.05}, "CoT2Align: OT weight 0.05"),
    Probe("c2a_kd0.9", _C2A_CELL, {"distill.kd_rate": 0.9}, "CoT2Align: kd_rate 0.9"),
)
PROBES_BY_NAME = {probe.name: probe for probe in PROBES}
# (probe, its test view, peer probe, its view): reasoning first against answers only.
PROBE_COMPARISONS = (("sft_cot_2x", "id_cot", "sft_2x", "id"),)


def probe_config(shared: Shared, probe: Probe, seed: int, run_dir: Path) -> dict[str, Any]:
    changes = {dotted.replace(".", "__"): value for dotted, value in probe.changes.items()}
    return stage_config(
        cell_config(shared, probe.cell, seed, run_dir),
        **changes,
        tracking__run_name=f"reasoning_probe_{probe.name}_seed{seed}",
    )


def run_probes(
    output_dir: Path,
    *,
    quick: bool,
    seeds: Sequence[int] = (FULL_SEEDS[0],),
    probes: Sequence[str] | None = None,
) -> dict:
    """Run the probes on the shared pipeline of ``output_dir`` (built first if absent).

    Writes ``probes/<name>/seed<N>/`` runs and adds them to ``probes.json`` (runs of other
    probes and seeds already there are kept, a rerun replaces its own), then rewrites
    ``probes.md`` from all of it; every probe is also scored with CoT prompts
    (``exact_match_id_cot``)."""
    started = time.perf_counter()
    chosen, size = _pick("probes", probes, PROBES_BY_NAME), QUICK if quick else FULL
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shared = load_shared(output_dir, size)
    if shared is None:
        shared = build_shared(output_dir, size)
        save_shared(output_dir, shared)
    results = _load_probe_results(output_dir / "probes.json", quick)
    for probe in chosen:
        entry = results["probes"].setdefault(probe.name, {"runs": {}})
        entry.update(question=probe.question, cell=probe.cell.name, changes=probe.changes)
        for seed in seeds:
            run_dir = output_dir / "probes" / probe.name / f"seed{seed}"
            raw = probe_config(shared, probe, seed, run_dir)
            model_dir, seconds = run_stage(raw, f"reasoning-bench probe {probe.name}")
            scores = evaluate_model(model_dir, shared, run_dir, cot_prompts=True)
            _write_json(run_dir / "eval_results.json", scores)
            entry["runs"][str(seed)] = {"scores": scores, "train_s": seconds}
            _write_json(output_dir / "probes.json", results)  # each finished run is kept
    results["comparisons"] = probe_comparisons(output_dir, results)
    results["last_wall_s"] = time.perf_counter() - started
    _write_json(output_dir / "probes.json", results)
    write_text_atomic(output_dir / "probes.md", probes_table(results))
    return results


def probe_comparisons(output_dir: Path, results: dict) -> list[dict[str, Any]]:
    """Each of ``PROBE_COMPARISONS`` whose two probes ran on the same seeds (two or more): the
    paired difference over those seeds and the problems, its interval and what it can detect."""
    from cot2align_ds.experiments.bench_stats import score_matrix

    found = []
    for name, view, peer, peer_view in PROBE_COMPARISONS:
        runs = [set(results["probes"].get(probe, {}).get("runs", {})) for probe in (name, peer)]
        seeds = sorted(runs[0] & runs[1], key=int)
        if len(seeds) < 2:
            continue
        matrices = [
            score_matrix(
                [
                    output_dir / "probes" / probe / f"seed{seed}" / f"predictions_{split}.jsonl"
                    for seed in seeds
                ]
            )
            for probe, split in ((name, view), (peer, peer_view))
        ]
        entry = {"cell": name, "view": view, "peer": peer, "peer_view": peer_view, "seeds": seeds}
        found.append({**entry, **_paired(*matrices)})
    return found


def _load_probe_results(path: Path, quick: bool) -> dict[str, Any]:
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("quick") == quick and isinstance(saved.get("probes"), dict):
            return saved
    return {"quick": quick, "probes": {}}


def probes_table(results: dict) -> str:
    """Markdown: one row per probe, in ``PROBES`` order; scores are mean (± std) over its seeds."""
    lines = [
        "| probe | cell | changes | seeds | ID (%) | OOD (%) | ID, CoT prompt (%) | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {name: index for index, name in enumerate(PROBES_BY_NAME)}
    for name in sorted(results["probes"], key=lambda n: order.get(n, len(order))):
        probe = results["probes"][name]
        seeds = sorted(probe["runs"], key=int)
        runs = [probe["runs"][seed] for seed in seeds]
        if not runs:
            continue
        cells = []
        for key in ("exact_match_id", "exact_match_ood", "exact_match_id_cot"):
            stats = aggregate_seeds([run["scores"][key] for run in runs])
            cells.append(_fmt(stats.to_dict()) if len(runs) > 1 else f"{stats.mean:.1f}")
        changes = ", ".join(f"{k}={_short(v)}" for k, v in probe["changes"].items()) or "-"
        seconds = sum(run["train_s"] for run in runs) / len(runs)
        lines.append(
            f"| {probe['question']} (`{name}`) | `{probe['cell']}` | {changes} | {', '.join(seeds)} "
            f"| {' | '.join(cells)} | {seconds:.0f} |"
        )
    if results.get("comparisons"):
        lines += ["", "| comparison (probe, view - probe, view) | seeds | ID difference [95% CI] "
                  "| detectable |", "|---|---|---|---|"]  # fmt: skip
        for entry in results["comparisons"]:
            lines.append(
                f"| `{entry['cell']}` {entry['view']} - `{entry['peer']}` {entry['peer_view']} "
                f"| {', '.join(entry['seeds'])} | {entry['mean']:.1f} "
                f"[{entry['low']:.1f}, {entry['high']:.1f}] | {entry['detectable']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items() if k != "model_type") + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)
