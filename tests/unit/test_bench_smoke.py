"""The new bench suites run end to end in their tiny configurations and return sane rows."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest

ROW_KEYS = {"section", "case", "ours", "peer", "peer_name", "unit", "target"}


def _check_rows(rows: list[dict], section: str) -> None:
    assert rows, f"{section}: no rows"
    for row in rows:
        assert set(row) >= ROW_KEYS, row
        assert row["section"] == section
        assert isinstance(row["ours"], float) and math.isfinite(row["ours"]), row
        assert isinstance(row["peer"], float) and row["peer"] > 0, row


def test_breakdown_shares_sum_to_one_and_cot2align_has_ot_time():
    from bench import bench_breakdown

    rows = bench_breakdown.run(quick=True, tiny=True)
    _check_rows(rows, "breakdown")
    shares: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row["case"].endswith(" share"):
            case, phase, _ = row["case"].rsplit(" ", 2)
            assert row["ours"] >= 0.0, row  # a negative "other" means phases overlapped
            shares[case][phase] = row["ours"] / row["peer"]
    assert set(shares) == {"uld on CoT data", "uld+cot2align"}
    for case, by_phase in shares.items():
        assert set(by_phase) == set(bench_breakdown.PHASES), case
        assert sum(by_phase.values()) == pytest.approx(1.0, abs=1e-6), case
        # The wrappers saw the forwards and the backward: those dominate any real step.
        for phase in ("teacher_fwd", "student_fwd", "backward_step"):
            assert by_phase[phase] > 0.02, (case, phase, by_phase)
    assert shares["uld on CoT data"]["ot_loss"] == 0.0
    assert shares["uld+cot2align"]["ot_loss"] > 0.0
    targets = [r for r in rows if r["target"] == "<= 2.2x base"]
    assert [r["peer_name"] for r in targets] == ["uld on CoT data"]


def test_ot_calls_rows():
    from bench import bench_ot_calls

    rows = bench_ot_calls.run(quick=True, tiny=True)
    _check_rows(rows, "ot_calls")
    assert rows[0]["ours"] > 0.0
    # The target is on what training runs (one call per view); all-in-one is reported.
    assert [(": per view" in r["case"], r["target"]) for r in rows] == [
        (True, "< 1x"),
        (False, "report"),
    ]


def test_ot_calls_groups_are_ragged_per_view():
    from bench.bench_ot_calls import make_groups

    groups = make_groups(batch=8, hidden=4)
    assert len(groups) == 6
    main, cross_std_cot, cross_cot_std = groups[0], groups[2], groups[4]
    # Student standard answers are shorter than the CoT answers the other views align.
    assert cross_std_cot[0].shape[1] <= 40 < main[0].shape[1]
    assert cross_cot_std[1].shape[1] < main[1].shape[1]
    for student, teacher, student_mask, teacher_mask, _ in groups:
        assert student_mask.shape == student.shape[:2] and teacher_mask.shape == teacher.shape[:2]
        assert student_mask.any(1).all() and teacher_mask.any(1).all()


def test_teacher_rows_cpu():
    from bench import bench_teacher

    rows = bench_teacher.run(quick=True, tiny=True)
    _check_rows(rows, "teacher")
    memory = next(r for r in rows if r["unit"] == "MB")
    assert memory["ours"] > 0.0 and memory["peer"] > 0.0


def test_gpu_mode_dry_run_on_cpu():
    """The --gpu code path end to end at toy sizes (no GPU is lent to the dev machines)."""
    from bench import bench_teacher

    rows = {row["case"].split(": ")[0]: row for row in bench_teacher.gpu_rows(dry_run=True)}
    assert rows["GPU CPU dry run"]["ours"] > 0  # student tokens/s of a CoT2Align step
    assert 0 < rows["OT time per step"]["ours"] < rows["OT time per step"]["peer"]
    teacher = rows["offloaded teacher forward vs PCIe bound"]
    assert teacher["ours"] > 0 and teacher["peer"] > 0
    both = rows["one offloaded-teacher forward for both views vs one per view"]
    assert both["ours"] > 0 and both["peer"] > 0
    cached = rows[
        "both views' teacher states from a teacher cache (read, copy, head) vs the offloaded "
        "teacher's forward"
    ]
    assert cached["ours"] > 0 and cached["peer"] == both["ours"]  # the same forward, timed once
    headless = rows["student cross-view pass, LM head on the last position vs on all"]
    assert headless["ours"] > 0 and headless["peer"] > 0


def test_peak_flops_table():
    from bench.bench_teacher import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Some unknown GPU") is None


def test_run_passes_gpu_only_to_suites_that_take_it(monkeypatch):
    from bench import run as bench_run

    calls = {}

    class _Suite:
        def __init__(self, name: str, takes_gpu: bool) -> None:
            if takes_gpu:
                self.run = lambda quick, gpu=False: calls.setdefault(name, gpu) and []
            else:
                self.run = lambda quick: calls.setdefault(name, None) or []

    suites = {"a": _Suite("a", True), "b": _Suite("b", False)}
    monkeypatch.setattr(bench_run, "SUITES", {"a": "a", "b": "b"})
    monkeypatch.setattr(bench_run.importlib, "import_module", suites.__getitem__)
    bench_run.collect(["a", "b"], quick=True, gpu=True)
    assert calls == {"a": True, "b": None}


_PEAK_RSS_CHILD = """
import json, torch
from bench.memory import PeakRSS, return_big_frees_to_the_os
return_big_frees_to_the_os()
with PeakRSS() as big:
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    del block
with PeakRSS() as small:
    block = torch.ones(4 * 2**20 // 4)  # 4 MB
    del block
print(json.dumps([big.resettable, big.mb, small.mb]))
"""


def test_peak_rss_sees_a_temporary_allocation_and_resets_between_cases():
    # In a fresh process, as the benches run: a long-lived process (this test session) may
    # serve the allocation from pages it already holds.
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_CHILD],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    )
    resettable, big_mb, small_mb = json.loads(done.stdout.strip().splitlines()[-1])
    if not resettable:
        pytest.skip("no /proc/self/clear_refs here: the peak cannot be reset")
    assert 60 <= big_mb < 100
    assert small_mb < 20  # the 64 MB peak before it does not count


def test_the_published_table_is_rendered_from_a_saved_run(tmp_path):
    import json
    import subprocess
    import sys

    payload = {
        "meta": {"commit": "abc", "mode": "quick", "machine": "m", "cpus": "2", "torch": "t"},
        "rows": [
            {"suite": "ot", "case": "a|b", "ours": 1.0, "peer": 4.0, "peer_name": "POT"},
            {"suite": "step", "case": "c", "ours": "n/a", "peer": 0, "unit": "s"},
        ],
        "seconds": {"ot": 3.2, "step": 1.0},
    }
    saved, page = tmp_path / "run.json", tmp_path / "results.md"
    saved.write_text(json.dumps(payload))
    subprocess.run(
        [sys.executable, "-m", "bench.run", "--from-json", str(saved), "--markdown", str(page)],
        check=True,
        capture_output=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines = page.read_text().splitlines()
    assert "| ot | a/b | 1 | 4 (POT) |  | 0.25 |  |" in lines
    assert "| step | c | n/a | 0 () | s | - |  |" in lines
    assert lines[-1] == "Suite wall times: ot 3 s, step 1 s"


def test_a_rerun_suite_replaces_only_its_rows_and_is_named_on_the_page():
    from bench import run as bench_run

    def row(suite: str, case: str, ours: float) -> dict:
        return {"suite": suite, "case": case, "ours": ours, "peer": 1.0, "peer_name": "p"}

    meta = {"mode": "full", "machine": "m", "cpus": "2", "torch": "t"}
    saved = {
        "meta": {**meta, "commit": "old"},
        "rows": [row("ot", "a", 1.0), row("step", "b", 2.0), row("teacher_cache", "c", 3.0)],
        "seconds": {"ot": 1.0, "step": 2.0, "teacher_cache": 3.0},
    }
    fresh = {
        "meta": {**meta, "commit": "new"},
        "rows": [row("step", "b", 5.0), row("step", "d", 6.0)],
        "seconds": {"step": 9.0},
    }
    merged = bench_run.merge_suites(saved, fresh)
    assert [(r["suite"], r["case"], r["ours"]) for r in merged["rows"]] == [
        ("ot", "a", 1.0),
        ("step", "b", 5.0),
        ("step", "d", 6.0),
        ("teacher_cache", "c", 3.0),
    ]
    assert merged["seconds"] == {"ot": 1.0, "step": 9.0, "teacher_cache": 3.0}
    assert merged["meta"]["commit"] == "old" and merged["meta"]["rerun"] == {"step": "new"}
    page = bench_run.markdown_table(merged)
    assert "Rerun since, each replacing its suite's rows: step at commit new." in page
    assert "commit old" in page
