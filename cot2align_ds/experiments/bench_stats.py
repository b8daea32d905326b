"""Intervals and paired differences for the reasoning benchmark, from per-problem correctness.

Legend: N seeds (student trainings), P test problems. A cell's result is an (N, P) 0/1 matrix.

Two sources of variation: which problems were drawn (the test set is a sample) and which
student seed trained (a cell is a distribution over trainings). The bootstrap resamples both:
seeds with replacement, then problems with replacement, and takes the grand mean; its 2.5 and
97.5 percentiles are the 95% interval. Where seeds do not really differ, resampling both counts
per-problem noise twice, so the interval errs on the wide side (tested). Two cells trained with the same seeds on the same
problems are compared pairwise: the difference matrix (seed i of A minus seed i of B, problem
by problem) is resampled the same way, so what both cells share (hard problems, a seed's data
order) cancels out.

The smallest difference the design can detect, at 5% two-sided and 80% power, is about
(1.96 + 0.84) times the bootstrap standard error of a paired difference.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BOOTSTRAP_SAMPLES = 4000
_Z_DETECT = 1.96 + 0.84  # 5% two-sided, 80% power


@dataclass(frozen=True)
class Interval:
    """A mean (percent) with its 95% bootstrap interval and standard error."""

    mean: float
    low: float
    high: float
    se: float

    def text(self) -> str:
        return f"{self.mean:.1f} [{self.low:.1f}, {self.high:.1f}]"

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def correctness(predictions_file: Path) -> dict[str, float]:
    """Problem id -> exact match (0 or 100) from a ``predictions_*.jsonl`` (greedy: one each)."""
    rows = [json.loads(line) for line in Path(predictions_file).read_text().splitlines() if line]
    return {row["id"]: float(row["scores"]["exact_match"]) for row in rows}


def score_matrix(files: list[Path]) -> np.ndarray:
    """(N, P) scores of N seeds' prediction files, problems in a common order."""
    per_seed = [correctness(path) for path in files]
    ids = sorted(per_seed[0])
    if any(sorted(seed) != ids for seed in per_seed):
        raise ValueError("the seeds' prediction files cover different problems")
    return np.array([[seed[i] for i in ids] for seed in per_seed], dtype=np.float64)


def _resampled_means(matrix_NP: np.ndarray, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n, p = matrix_NP.shape
    seeds = rng.integers(0, n, size=(samples, n))
    problems = rng.integers(0, p, size=(samples, p))
    # Mean over the resampled seeds of each one's mean over the resampled problems.
    per_seed = matrix_NP[:, problems].mean(axis=2)  # (N, samples)
    return np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1)


def bootstrap_interval(
    matrix_NP: np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> Interval:
    """The grand mean of an (N, P) matrix with its two-level bootstrap 95% interval."""
    means = _resampled_means(matrix_NP, samples, seed)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(matrix_NP.mean()), float(low), float(high), float(means.std(ddof=1)))


def paired_difference(
    a_NP: np.ndarray, b_NP: np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> Interval:
    """Mean of A - B (same seeds in the same order, same problems) with its interval."""
    if a_NP.shape != b_NP.shape:
        raise ValueError(f"paired cells differ in shape: {a_NP.shape} vs {b_NP.shape}")
    return bootstrap_interval(a_NP - b_NP, samples=samples, seed=seed)


def detectable_difference(difference: Interval) -> float:
    """The smallest true difference this design detects with 80% power at 5%."""
    return _Z_DETECT * difference.se
