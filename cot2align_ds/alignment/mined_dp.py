"""MinED sequence alignment: dynamic programming over token strings with edit-distance costs.

The two token sequences are aligned by dynamic time warping: the cost of pairing student token
i with teacher token j is the Levenshtein distance between their strings with the space markers
("Ġ", "▁", and the space that :func:`~cot2align_ds.alignment.vocab_map.normalize_token` turns
them into) removed; a path runs monotonically from (0, 0) to (S-1, T-1) with diagonal, down and
right steps, and the optimal path minimises the summed cost. A path cell whose student and
teacher positions each occur in no other cell is a one-to-one pair; every other student position
(part of a many-to-one run) gets -1.

Ties between equally cheap predecessors go diagonal first, then (i-1, j), then (i, j-1), so the
result is deterministic. Speed: the cost matrix is computed once per pair of *distinct* strings
(vectorised), and each DP row is a prefix minimum (numpy), a few ms for 300 x 300 tokens; the
pure-Python reference in the tests is the definition. Meant for data-loader workers.

Shape legend: S student positions, T teacher positions, P path cells, U distinct strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cot2align_ds.alignment.vocab_map import distance_matrix

_STRIP = str.maketrans("", "", "Ġ▁ ")


@dataclass(frozen=True)
class DPAlignment:
    """Optimal monotone alignment of two token sequences."""

    path_P2: np.ndarray  # int64 (student pos, teacher pos) cells of the path, in order
    aligned_teacher_pos_S: np.ndarray  # int64 teacher position of one-to-one pairs, else -1
    total_cost: int  # summed edit distance along the path
    one_to_one_share: float  # share of student positions aligned one-to-one (0 when S == 0)


def strip_markers(token: str) -> str:
    """Token string without space markers ("Ġ", "▁", " ")."""
    return token.translate(_STRIP)


def token_cost_matrix(
    student_tokens: Sequence[str], teacher_tokens: Sequence[str], backend: str = "auto"
) -> np.ndarray:
    """cost_ST (int64): edit distance between marker-stripped token strings.

    Computed over distinct strings only (responses repeat tokens heavily), then expanded.
    """
    student_u, student_inv_S = _distinct([strip_markers(token) for token in student_tokens])
    teacher_u, teacher_inv_T = _distinct([strip_markers(token) for token in teacher_tokens])
    cost_UU = distance_matrix(student_u, teacher_u, backend)
    return cost_UU[student_inv_S[:, None], teacher_inv_T[None, :]]


def _distinct(strings: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct strings in first-seen order, and each input's index among them."""
    index_of: dict[str, int] = {}
    inverse = [index_of.setdefault(string, len(index_of)) for string in strings]
    return list(index_of), np.asarray(inverse, dtype=np.int64)


def dtw_cumulative(cost_ST: np.ndarray) -> np.ndarray:
    """acc_ST: cheapest path cost from (0, 0) to each cell (DTW with diagonal/down/right steps).

    Row i: acc[i, j] = c[i, j] + min(a[j], acc[i, j-1]) with a[j] = min(acc[i-1, j-1],
    acc[i-1, j]); unrolled, acc[i, j] = C[j] + min_{k<=j}(a[k] - C[k-1]) where C is the running
    sum of row i's costs: a prefix minimum, one numpy call. The recurrence is symmetric, so the
    loop runs over the shorter side.
    """
    if cost_ST.shape[0] > cost_ST.shape[1]:
        return dtw_cumulative(np.ascontiguousarray(cost_ST.T)).T
    num_s, num_t = cost_ST.shape
    acc_ST = np.empty((num_s, num_t), dtype=np.int64)
    if num_s == 0 or num_t == 0:
        return acc_ST
    running_ST = np.cumsum(cost_ST, axis=1, dtype=np.int64)
    running_before_ST = running_ST - cost_ST
    acc_ST[0] = running_ST[0]
    best_prev_T = np.empty(num_t, dtype=np.int64)
    for i in range(1, num_s):
        above_T = acc_ST[i - 1]
        best_prev_T[0] = above_T[0]
        np.minimum(above_T[1:], above_T[:-1], out=best_prev_T[1:])
        np.subtract(best_prev_T, running_before_ST[i], out=best_prev_T)
        np.minimum.accumulate(best_prev_T, out=best_prev_T)
        np.add(best_prev_T, running_ST[i], out=acc_ST[i])
    return acc_ST


def dtw_backtrack(acc_ST: np.ndarray) -> np.ndarray:
    """path_P2 from (0, 0) to (S-1, T-1); ties: diagonal, then (i-1, j), then (i, j-1)."""
    i, j = acc_ST.shape[0] - 1, acc_ST.shape[1] - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diag, up, left = acc_ST[i - 1, j - 1], acc_ST[i - 1, j], acc_ST[i, j - 1]
            if diag <= up and diag <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
        path.append((i, j))
    return np.asarray(path[::-1], dtype=np.int64)


def one_to_one_from_path(path_P2: np.ndarray, num_student: int, num_teacher: int) -> np.ndarray:
    """aligned_teacher_pos_S: teacher position where both positions occur once on the path."""
    aligned_S = np.full(num_student, -1, dtype=np.int64)
    if path_P2.shape[0] == 0:
        return aligned_S
    student_count = np.bincount(path_P2[:, 0], minlength=num_student)
    teacher_count = np.bincount(path_P2[:, 1], minlength=num_teacher)
    single = (student_count[path_P2[:, 0]] == 1) & (teacher_count[path_P2[:, 1]] == 1)
    aligned_S[path_P2[single, 0]] = path_P2[single, 1]
    return aligned_S


def mined_dp_align(
    student_tokens: Sequence[str], teacher_tokens: Sequence[str], backend: str = "auto"
) -> DPAlignment:
    """MinED alignment of two token-string sequences (module docstring).

    Args:
        student_tokens, teacher_tokens: token strings, raw ("Ġhas", "▁has") or normalised
            (``normalized_vocab(tokenizer)[id]``: decodes byte-level "Ċ"/"Ã©" to text, better).
        backend: edit-distance backend, "auto" | "numpy" | "rapidfuzz".
    """
    num_s, num_t = len(student_tokens), len(teacher_tokens)
    if num_s == 0 or num_t == 0:
        empty = np.zeros((0, 2), dtype=np.int64)
        return DPAlignment(empty, np.full(num_s, -1, dtype=np.int64), 0, 0.0)
    cost_ST = token_cost_matrix(student_tokens, teacher_tokens, backend)
    acc_ST = dtw_cumulative(cost_ST)
    path_P2 = dtw_backtrack(acc_ST)
    aligned_S = one_to_one_from_path(path_P2, num_s, num_t)
    return DPAlignment(
        path_P2=path_P2,
        aligned_teacher_pos_S=aligned_S,
        total_cost=int(acc_ST[-1, -1]),
        one_to_one_share=float((aligned_S >= 0).mean()),
    )


__all__ = [
    "DPAlignment",
    "dtw_backtrack",
    "dtw_cumulative",
    "mined_dp_align",
    "one_to_one_from_path",
    "strip_markers",
    "token_cost_matrix",
]
