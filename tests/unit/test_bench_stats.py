"""The reasoning benchmark's statistics: the two-level bootstrap covers what it should, paired
differences cancel what two cells share, and the detectable difference follows the noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cot2align_ds.experiments.bench_stats import (
    bootstrap_interval,
    detectable_difference,
    paired_difference,
    score_matrix,
)


def _cell(rng, rate: float, seeds: int = 5, problems: int = 200) -> np.ndarray:
    return (rng.random((seeds, problems)) < rate).astype(float) * 100


def test_the_interval_covers_the_true_rate_at_least_95_percent_of_the_time():
    """Resampling both seeds and problems counts per-problem noise twice when seeds do not
    differ (as here): the interval is conservative, never too narrow."""
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(200):
        interval = bootstrap_interval(_cell(rng, 0.4), samples=400, seed=trial)
        assert interval.low <= interval.mean <= interval.high
        hits += interval.low <= 40.0 <= interval.high
    assert hits / 200 >= 0.93


def test_pairing_cancels_what_two_cells_share():
    rng = np.random.default_rng(1)
    hard = rng.random(200) < 0.5  # problems both cells get right or wrong together
    base = np.where(hard, 0.0, 100.0)[None].repeat(5, 0)
    better = base.copy()
    better[:, :10] = 100.0  # 10 more problems solved (some were already right)
    gain = float((better - base).mean())
    paired = paired_difference(better, base, samples=1000)
    assert paired.mean == pytest.approx(gain) and paired.low > 0
    # Unpaired, the two intervals overlap: the shared problem difficulty hides the gain.
    a, b = bootstrap_interval(better, samples=1000), bootstrap_interval(base, samples=1000)
    assert a.low < b.high
    assert detectable_difference(paired) < detectable_difference(
        paired_difference(_cell(rng, 0.5), _cell(rng, 0.5), samples=1000)
    )


def test_score_matrix_reads_prediction_files_in_a_common_problem_order(tmp_path):
    rows = {"a": [("p2", 100.0), ("p1", 0.0)], "b": [("p1", 100.0), ("p2", 100.0)]}
    files = []
    for name, scores in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(
            json.dumps({"id": i, "scores": {"exact_match": s}}) for i, s in scores
        ))  # fmt: skip
        files.append(path)
    assert score_matrix(files).tolist() == [[0.0, 100.0], [100.0, 100.0]]
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "p3", "scores": {"exact_match": 0}}))
    with pytest.raises(ValueError, match="different problems"):
        score_matrix([files[0], tmp_path / "c.jsonl"])
