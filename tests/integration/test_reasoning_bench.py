"""The reasoning benchmark, quick grid: every cell and seed is a real, distinct, evaluated run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cot2align_ds.experiments.reasoning_bench import (
    CELLS,
    FULL,
    QUICK,
    QUICK_SEEDS,
    run_reasoning_bench,
)

KD_TERMS = {
    "sft": set(),
    "uld": {"loss/kd_uld"},
    "mined": {"loss/kd_mined"},
    "dskd_cma": {"loss/kd_t2s_ce", "loss/kd_t2s_kd", "loss/kd_s2t_kd"},
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reasoning_bench")
    # Two runs at once (worker processes); the reruns below go one at a time and must find
    # every run of it kept, so both paths are exercised on the same grid.
    results = run_reasoning_bench(out, quick=True, jobs=2)
    assert results["timings"]["jobs"] == 2
    return out, results


def expected_ot_terms(cell) -> set[str]:
    """The OT loss keys a cell's metrics.jsonl must (and must only) contain."""
    if not cell.cot2align.get("enabled"):
        return set()
    if not cell.cot2align.get("cross_cot", True):
        return {"loss/ot_main"}
    return {"loss/ot_main", "loss/ot_cross_std_cot", "loss/ot_cross_cot_std"}


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _loss_keys(rows: list[dict], prefix: str) -> set[str]:
    return {key for row in rows for key in row if key.startswith(prefix)}


@pytest.mark.parametrize("cell", CELLS, ids=lambda cell: cell.name)
def test_every_cell_is_a_real_run_with_its_method_terms(bench, cell):
    out, _ = bench
    for seed in QUICK_SEEDS:
        run_dir = out / "cells" / cell.name / f"seed{seed}"
        rows = _rows(run_dir)
        assert rows and all(row["loss/ce"] > 0 for row in rows)
        assert _loss_keys(rows, "loss/kd_") == KD_TERMS[cell.method]
        assert _loss_keys(rows, "loss/ot_") == expected_ot_terms(cell)
        config = json.loads((run_dir / "config.json").read_text())
        assert config["train"]["seed"] == seed
        assert config["distill"]["method"] == cell.method
        assert (config["data"]["cot_records"] == "all") == cell.cot_data
        assert ("augment" in config["data"]["train_file"]) == cell.cot_data
        assert (config["teacher"] is None) == (cell.method == "sft")
        scores = json.loads((run_dir / "eval_results.json").read_text())
        assert 0.0 <= scores["exact_match_ood"]["mean"] <= 100.0
        for split in ("id", "ood"):
            predictions = (run_dir / f"predictions_{split}.jsonl").read_text().splitlines()
            assert len(predictions) == QUICK.num_test


@pytest.mark.parametrize("cell", CELLS, ids=lambda cell: cell.name)
def test_seeds_give_different_runs(bench, cell):
    out, _ = bench
    first = [_rows(out / "cells" / cell.name / f"seed{seed}")[0] for seed in QUICK_SEEDS]
    assert len({row["loss/total"] for row in first}) == len(QUICK_SEEDS)


def test_cross_cot_terms_follow_the_switches(bench):
    out, _ = bench

    def last(name: str) -> dict:
        return _rows(out / "cells" / name / f"seed{QUICK_SEEDS[0]}")[-1]

    # Both cross directions carry signal in our mode; reference-compat zeroes one of them.
    assert last("dskd_cma+cot2align")["loss/ot_cross_cot_std"] > 0
    assert last("dskd_cma+cot2align")["loss/ot_cross_std_cot"] > 0
    assert last("dskd_cma+cot2align_refcompat")["loss/ot_cross_cot_std"] == 0
    assert last("dskd_cma+cot2align_refcompat")["loss/ot_cross_std_cot"] > 0


def test_results_files_aggregate_every_cell(bench):
    out, results = bench
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["timings"]["wall_s"] > 0 and on_disk["quick"] is True
    assert on_disk["timings"]["runs_resumed"] == 0 and not on_disk["timings"]["shared_reused"]
    assert on_disk["timings"]["total_s"] == on_disk["timings"]["wall_s"]
    assert set(on_disk["cells"]) == {cell.name for cell in CELLS}
    table = (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 1000
    for cell in CELLS:
        summary = json.loads((out / "cells" / cell.name / "eval_results.json").read_text())
        per_seed = [
            json.loads((out / "cells" / cell.name / f"seed{s}" / "eval_results.json").read_text())
            for s in QUICK_SEEDS
        ]
        for key in ("exact_match_id", "exact_match_ood"):
            assert summary[key]["per_seed"] == [run[key]["mean"] for run in per_seed]
            assert results["cells"][cell.name][key] == summary[key]
        assert f"(`{cell.name}`)" in table
    report = (out / "report" / "report.md").read_text()  # what `cot2align report` writes
    assert (out / "report" / "eval.png").stat().st_size > 1000
    assert all(f"| {cell.name} |" in report for cell in CELLS)
    stats = on_disk["augment"]
    assert stats["total"] == on_disk["size"]["num_train"] and stats["with_rationale"] > 0
    # The teacher wrote its rationales as the grid scores: no n-gram ban (the recipe's eval).
    manifest = json.loads((out / "augment" / "shards" / "manifest.json").read_text())
    assert manifest["settings"]["no_repeat_ngram_size"] == 0


def test_cells_and_seeds_share_one_teacher_cache_per_layout(bench):
    out, results = bench
    caches = sorted(path for path in (out / "teacher_cache").iterdir() if path.is_dir())
    used = {}
    for cell in CELLS:
        for seed in QUICK_SEEDS:
            config = json.loads(
                (out / "cells" / cell.name / f"seed{seed}" / "config.json").read_text()
            )
            path = config["teacher_cache"]["path"]
            assert (path is None) == (cell.method == "sft"), cell.name
            if path is not None:
                used.setdefault(path, set()).add(cell.name)
    # Fewer caches than teacher cells: cells with the same views and layers share one, and
    # every seed of a cell reads the same cache; each was built once and completely.
    assert sorted(Path(p) for p in used) == caches
    assert len(caches) < sum(cell.method != "sft" for cell in CELLS)
    assert all((cache / "index.json").is_file() for cache in caches)
    assert results["timings"]["teacher_cache_s"] > 0
    builds = [json.loads(cache.with_suffix(".build.json").read_text()) for cache in caches]
    assert sum(build["build_s"] for build in builds) == pytest.approx(
        results["timings"]["teacher_cache_s"]
    )


def test_probes_reuse_the_shared_pipeline_and_apply_their_changes(bench):
    from cot2align_ds.experiments.reasoning_bench import PROBES_BY_NAME, run_probes

    out, _ = bench
    teacher_weights = next((out / "teacher").rglob("model.safetensors"))
    before = teacher_weights.stat().st_mtime_ns
    results = run_probes(out, quick=True, seeds=(5,), probes=["ot_eps1", "sft_cot"])
    assert teacher_weights.stat().st_mtime_ns == before  # teacher reused, not retrained
    assert list(results["probes"]) == ["ot_eps1", "sft_cot"]
    # A second seed of one probe is added to what is there, not written over it.
    results = run_probes(out, quick=True, seeds=(6,), probes=["ot_eps1"])
    assert set(results["probes"]["ot_eps1"]["runs"]) == {"5", "6"}
    assert set(results["probes"]["sft_cot"]["runs"]) == {"5"}
    assert "| 5, 6 |" in (out / "probes.md").read_text()
    ot_dir = out / "probes" / "ot_eps1" / "seed5"
    config = json.loads((ot_dir / "config.json").read_text())
    assert config["cot2align"]["epsilon"] == 1.0 and config["cot2align"]["enabled"]
    assert config["cot2align"]["cross_cot"] is False
    assert _loss_keys(_rows(ot_dir), "loss/ot_") == {"loss/ot_main"}
    sft_cot = json.loads((out / "probes" / "sft_cot" / "seed5" / "config.json").read_text())
    assert sft_cot["teacher"] is None and sft_cot["data"]["cot_records"] == "all"
    for name in ("ot_eps1", "sft_cot"):
        run_dir = out / "probes" / name / "seed5"
        scores = json.loads((run_dir / "eval_results.json").read_text())
        assert set(scores) == {"exact_match_id", "exact_match_ood", "exact_match_id_cot"}
        assert results["probes"][name]["runs"]["5"]["scores"] == scores
        cot_predictions = (run_dir / "predictions_id_cot.jsonl").read_text().splitlines()
        assert len(cot_predictions) == QUICK.num_test
        assert "step by step" in json.loads(cot_predictions[0])["prompt"]
    table = (out / "probes.md").read_text()
    assert PROBES_BY_NAME["ot_eps1"].question in table and "`sft_cot`" in table


def test_probes_pair_reasoning_first_against_answers_only(bench):
    from cot2align_ds.experiments.bench_stats import score_matrix
    from cot2align_ds.experiments.reasoning_bench import run_probes

    out, _ = bench
    results = run_probes(out, quick=True, seeds=(5, 6), probes=["sft_2x", "sft_cot_2x"])
    [entry] = results["comparisons"]
    assert (entry["cell"], entry["view"], entry["peer"], entry["peer_view"]) == (
        "sft_cot_2x", "id_cot", "sft_2x", "id"
    )  # fmt: skip
    assert entry["seeds"] == ["5", "6"]
    assert entry["low"] <= entry["mean"] <= entry["high"]

    def mean(probe: str, split: str) -> float:
        files = [out / "probes" / probe / f"seed{s}" / f"predictions_{split}.jsonl" for s in (5, 6)]
        return score_matrix(files).mean()

    assert entry["mean"] == pytest.approx(mean("sft_cot_2x", "id_cot") - mean("sft_2x", "id"))
    config = json.loads((out / "probes" / "sft_2x" / "seed5" / "config.json").read_text())
    # Twice the full grid's budget, whatever the (quick) grid it was run beside.
    assert config["train"]["max_steps"] == 2 * FULL.student_max_steps
    assert config["train"]["epochs"] == 2 * FULL.student_epochs
    assert "| `sft_cot_2x` id_cot - `sft_2x` id | 5, 6 |" in (out / "probes.md").read_text()


def test_probe_selection_errors_are_one_line_config_errors(tmp_path):
    from cot2align_ds.config import ConfigError
    from cot2align_ds.runs import run_reasoning_bench_command

    with pytest.raises(ConfigError, match="--probe needs --probes"):
        run_reasoning_bench_command(tmp_path / "a", quick=True, probe_names=["sft_cot"])
    with pytest.raises(ConfigError, match=r"probes: unknown \['nope'\]"):
        run_reasoning_bench_command(tmp_path / "b", quick=True, probes=True, probe_names=["nope"])
    assert not (tmp_path / "b" / "shared.json").exists()  # nothing built for a bad name
    with pytest.raises(ConfigError, match="--jobs 0: give the number of student runs"):
        run_reasoning_bench_command(tmp_path / "c", quick=True, jobs=0)
    assert not (tmp_path / "c").exists()


def test_the_grid_reports_intervals_paired_differences_and_the_mechanism(bench):
    from cot2align_ds.experiments.reasoning_bench import COMPARISONS

    out, results = bench
    stats = results["stats"]
    assert set(stats["cells"]) == {cell.name for cell in CELLS}
    for name, cell in stats["cells"].items():
        for split in ("id", "ood"):
            interval = cell[split]
            assert interval["low"] <= interval["mean"] <= interval["high"], (name, split)
            # The bootstrap's mean is the cell's mean over seeds and problems.
            assert interval["mean"] == pytest.approx(
                results["cells"][name][f"exact_match_{split}"]["mean"]
            )
    assert [(c["cell"], c["peer"]) for c in stats["comparisons"]] == list(COMPARISONS)
    for entry in stats["comparisons"]:
        want = (
            stats["cells"][entry["cell"]]["id"]["mean"]
            - stats["cells"][entry["peer"]]["id"]["mean"]
        )
        assert entry["id"]["mean"] == pytest.approx(want, abs=1e-9)
        assert entry["id"]["detectable"] >= 0  # 0 when neither cell varies (quick runs)
        both_cot = {entry["cell"], entry["peer"]} <= {c.name for c in CELLS if c.cot_data}
        assert ("id_cot" in entry) == both_cot, entry
    # Reasoning first vs answers only: the rationale-trained student with CoT prompts against
    # the answers-only student answering directly, on the same problems.
    cells = stats["cells"]
    assert "id_cot" in cells["sft+cot_data"] and "id_cot" not in cells["sft"]
    assert stats["reasoning"]["id"]["mean"] == pytest.approx(
        cells["sft+cot_data"]["id_cot"]["mean"] - cells["sft"]["id"]["mean"], abs=1e-9
    )
    assert cells["sft+cot_data"]["id_cot"]["mean"] == pytest.approx(
        results["cells"]["sft+cot_data"]["exact_match_id_cot"]["mean"]
    )
    # Every OT cell logs the plan's mass on character-aligned pairs, and the uniform share.
    ot_cells = {cell.name for cell in CELLS if cell.cot2align.get("enabled")}
    assert set(stats["mechanism"]) == ot_cells
    for values in stats["mechanism"].values():
        assert 0 < values["ot/aligned_mass_uniform"] < 1
        assert 0 <= values["ot/aligned_mass/layers_-1_-1"] <= 1
    table = (out / "results.md").read_text()
    assert "detectable" in table and "uniform plan's share" in table
    assert "| `sft+cot_data` with CoT prompts - `sft` |" in table


def test_cells_trained_on_cot_data_are_also_scored_with_cot_prompts(bench):
    out, results = bench
    for cell in CELLS:
        assert ("exact_match_id_cot" in results["cells"][cell.name]) == cell.cot_data, cell.name
    run_dir = out / "cells" / "sft+cot_data" / f"seed{QUICK_SEEDS[0]}"
    prompt = json.loads((run_dir / "predictions_id_cot.jsonl").read_text().splitlines()[0])
    assert "step by step" in prompt["prompt"]
    assert "| `sft+cot_data` - `sft` |" in (out / "results.md").read_text()


def test_a_rerun_resumes_every_finished_run_and_reuses_the_teacher(bench):
    out, results = bench
    teacher = next((out / "teacher").rglob("model.safetensors")).stat().st_mtime_ns
    student = next((out / "cells" / "uld" / f"seed{QUICK_SEEDS[0]}").rglob("model.safetensors"))
    before = student.stat().st_mtime_ns
    again = run_reasoning_bench(out, quick=True)
    assert again["timings"]["runs_resumed"] == len(CELLS) * len(QUICK_SEEDS)
    assert again["timings"]["shared_reused"]
    assert again["timings"]["total_s"] > again["timings"]["wall_s"]  # the teacher's build added
    assert student.stat().st_mtime_ns == before
    # The caches were found built; their build time still counts.
    assert again["timings"]["teacher_cache_s"] == results["timings"]["teacher_cache_s"]
    assert next((out / "teacher").rglob("model.safetensors")).stat().st_mtime_ns == teacher
    for name, cell in results["cells"].items():
        for key in ("exact_match_id", "exact_match_ood"):
            assert again["cells"][name][key] == cell[key], name
    # A run left by a grid with another config is redone, not reused; the others are kept.
    stale = out / "cells" / "uld" / f"seed{QUICK_SEEDS[0]}" / "bench_run.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "config_digest": "other"}))
    other = next((out / "cells" / "uld" / f"seed{QUICK_SEEDS[1]}").rglob("model.safetensors"))
    kept = other.stat().st_mtime_ns
    rerun = run_reasoning_bench(out, quick=True)
    assert rerun["timings"]["runs_resumed"] == len(CELLS) * len(QUICK_SEEDS) - 1
    assert student.stat().st_mtime_ns != before
    assert other.stat().st_mtime_ns == kept


def test_teacher_time_is_measured_per_cache_layout(bench, tmp_path):
    from cot2align_ds.config import ConfigError
    from cot2align_ds.experiments.reasoning_bench import measure_teacher_time

    with pytest.raises(ConfigError, match="run the grid there first"):
        measure_teacher_time(tmp_path, quick=True, steps=4)
    out, results = bench
    result = measure_teacher_time(out, quick=True, steps=4)
    layouts = result["layouts"]
    teacher_cells = [cell.name for cell in CELLS if cell.method != "sft"]
    assert sorted(c for row in layouts for c in row["cells"]) == sorted(teacher_cells)
    # One group per cache the grid built: cells that share a cache share a layout.
    grid_caches = [path for path in (out / "teacher_cache").iterdir() if path.is_dir()]
    assert len(layouts) == len(grid_caches)
    for row in layouts:
        assert row["build_s"] > 0 and row["step_s_live"] > 0 and row["step_s_cached"] > 0
        assert row["runs"] == len(row["cells"]) * len(QUICK_SEEDS)
        live = json.loads((out / "teacher_time" / f"{row['measured_on']}-live" / "config.json")
                          .read_text())  # fmt: skip
        cached = json.loads(
            (out / "teacher_time" / f"{row['measured_on']}-cached" / "config.json").read_text()
        )
        assert live["teacher_cache"]["path"] is None
        assert cached["teacher_cache"]["path"] == str(
            out / "teacher_time" / f"cache-{row['layout']}"
        )
        assert live["train"]["max_steps"] == cached["train"]["max_steps"] == 4
    assert result["grid_teacher_s_cached"] == pytest.approx(sum(r["build_s"] for r in layouts))
    assert json.loads((out / "teacher_time.json").read_text()) == result
    # The same numbers as `make bench` rows: one per layout, the target on CoT2Align's.
    from bench.bench_grid_teacher import rows_from_teacher_time

    rows = rows_from_teacher_time(result, "quick grid")
    assert [row["ours"] for row in rows] == [
        *(row["step_s_cached"] for row in layouts),
        result["grid_teacher_s_cached"],
    ]
    assert [row["peer"] for row in rows[:-1]] == [row["step_s_live"] for row in layouts]
    assert sum(row["target"] == "<= 0.6x live" for row in rows) == sum(
        any("+cot2align" in cell for cell in row["cells"]) for row in layouts
    )


def test_publish_writes_the_grid_between_the_page_markers_and_nothing_else(bench, tmp_path):
    from cot2align_ds.config import ConfigError
    from cot2align_ds.experiments.reasoning_bench import measure_teacher_time
    from cot2align_ds.runs import run_reasoning_bench_command

    out, results = bench
    if not (out / "teacher_time.json").is_file():  # when this test runs alone
        measure_teacher_time(out, quick=True, steps=2)
    page = tmp_path / "bench.md"
    prose = ["# Title\n\nIntro.\n\n", "\n\nBetween.\n\n", "\n\nEnd.\n"]
    page.write_text(
        prose[0] + "<!-- generated: results -->\nold table\n<!-- end generated: results -->"
        + prose[1] + "<!-- generated: teacher-time -->\n<!-- end generated: teacher-time -->"
        + prose[2]
    )  # fmt: skip
    done = run_reasoning_bench_command(out, quick=True, publish=page)
    assert done == {"published": ["results", "teacher-time"]}
    text = page.read_text()
    assert "old table" not in text and all(part in text for part in prose)
    # Every table row of the grid's results.md, in order, and its cost and plot.
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    published = [line for line in text.splitlines() if line.startswith("| ")]
    assert published[: len(rows)] == rows
    runs = len(CELLS) * len(QUICK_SEEDS)
    assert f"{runs} student runs" in text and "![reasoning benchmark](bench.png)" in text
    assert (tmp_path / "bench.png").read_bytes() == (out / "results.png").read_bytes()
    assert "The grid's teacher time:" in text
    # Publishing again changes nothing: the markers are kept.
    run_reasoning_bench_command(out, quick=True, publish=page)
    assert page.read_text() == text
    # A page without the markers is refused and left as it was.
    bare = tmp_path / "bare.md"
    bare.write_text("# nothing to replace\n")
    with pytest.raises(ConfigError, match=r"bare.md: needs one '<!-- generated: results -->'"):
        run_reasoning_bench_command(out, quick=True, publish=bare)
    assert bare.read_text() == "# nothing to replace\n" and not (tmp_path / "bare.png").exists()
    with pytest.raises(ConfigError, match="has no results.md: run the grid first"):
        run_reasoning_bench_command(tmp_path / "empty", quick=True, publish=page)
    with pytest.raises(ConfigError, match="separate runs; give one"):
        run_reasoning_bench_command(out, quick=True, teacher_time=True, publish=page)


def test_the_shared_stages_run_on_one_thread_and_give_the_threads_back():
    import torch

    from cot2align_ds.experiments.reasoning_bench import _torch_threads

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), _torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("a failed stage")
    assert torch.get_num_threads() == before


def test_runs_at_once_bench_times_the_same_runs_both_ways(bench, tmp_path, monkeypatch):
    import bench.bench_grid_jobs as grid_jobs
    from cot2align_ds.experiments.reasoning_bench import RUN_FILE, load_shared

    out, _ = bench
    monkeypatch.setattr(grid_jobs, "RUNS", 2)
    result = grid_jobs.measure(load_shared(out, QUICK), tmp_path)
    assert result["jobs2_s"] > 0 and result["jobs1_s"] > 0
    # Every run of both modes trained and was scored (none kept from the other mode).
    seeds = sorted(path.name for path in (tmp_path / "cells" / grid_jobs.CELL).iterdir())
    assert seeds == ["seed100", "seed101", "seed200", "seed201"]
    for seed in seeds:
        run_dir = tmp_path / "cells" / grid_jobs.CELL / seed
        assert _rows(run_dir) and (run_dir / RUN_FILE).is_file()
    (row,) = grid_jobs.rows(result, "quick grid", QUICK.student_max_steps)
    assert (row["ours"], row["peer"]) == (result["jobs2_s"], result["jobs1_s"])
