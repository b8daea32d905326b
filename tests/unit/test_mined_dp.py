"""MinED DP alignment against a pure-Python DTW reference and exhaustive search over paths."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from cot2align_ds.alignment.mined_dp import (
    dtw_cumulative,
    mined_dp_align,
    one_to_one_from_path,
    strip_markers,
    token_cost_matrix,
)
from cot2align_ds.alignment.offsets import token_char_spans
from cot2align_ds.alignment.vocab_map import levenshtein, normalized_vocab


def _reference(student: list[str], teacher: list[str]) -> tuple[list[tuple[int, int]], int]:
    """Textbook DTW: nested loops, costs from the plain Levenshtein, same tie order."""
    cost = [[levenshtein(strip_markers(s), strip_markers(t)) for t in teacher] for s in student]
    inf = float("inf")
    acc = [[inf] * len(teacher) for _ in student]
    for i, j in itertools.product(range(len(student)), range(len(teacher))):
        before = [
            acc[i - 1][j - 1] if i and j else inf,
            acc[i - 1][j] if i else inf,
            acc[i][j - 1] if j else inf,
        ]
        acc[i][j] = cost[i][j] + (0 if i == j == 0 else min(before))
    i, j = len(student) - 1, len(teacher) - 1
    path = [(i, j)]
    while (i, j) != (0, 0):
        moves = [(i - 1, j - 1), (i - 1, j), (i, j - 1)]
        i, j = min((m for m in moves if min(m) >= 0), key=lambda m: acc[m[0]][m[1]])
        path.append((i, j))
    return path[::-1], int(acc[-1][-1])


def _random_tokens(rng: random.Random, count: int) -> list[str]:
    pieces = ["a", "b", "ab", "ba", "abc", "Ġa", "▁b", "Ġ", "▁", "cab", " b"]
    return [rng.choice(pieces) for _ in range(count)]


def test_matches_reference_dtw_on_random_sequences():
    rng = random.Random(0)
    for _ in range(150):
        student = _random_tokens(rng, rng.randint(1, 9))
        teacher = _random_tokens(rng, rng.randint(1, 9))
        path, total = _reference(student, teacher)
        alignment = mined_dp_align(student, teacher, backend="numpy")
        assert alignment.path_P2.tolist() == [list(cell) for cell in path]
        assert alignment.total_cost == total
        counts_s = np.bincount([i for i, _ in path], minlength=len(student))
        counts_t = np.bincount([j for _, j in path], minlength=len(teacher))
        expected = [-1] * len(student)
        for i, j in path:
            if counts_s[i] == 1 and counts_t[j] == 1:
                expected[i] = j
        assert alignment.aligned_teacher_pos_S.tolist() == expected


def _monotone_paths(num_s: int, num_t: int):
    """Every path from (0, 0) to the corner with diagonal/down/right steps."""

    def extend(path):
        i, j = path[-1]
        if (i, j) == (num_s - 1, num_t - 1):
            yield path
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < num_s and j + dj < num_t:
                yield from extend([*path, (i + di, j + dj)])

    yield from extend([(0, 0)])


def test_total_cost_is_the_minimum_over_all_paths():
    rng = random.Random(1)
    for _ in range(30):
        student = _random_tokens(rng, rng.randint(1, 4))
        teacher = _random_tokens(rng, rng.randint(1, 4))
        cost = token_cost_matrix(student, teacher, backend="numpy")
        best = min(
            sum(cost[i, j] for i, j in path) for path in _monotone_paths(len(student), len(teacher))
        )
        assert mined_dp_align(student, teacher, backend="numpy").total_cost == best


def test_cumulative_cost_is_symmetric_under_transpose():
    rng = np.random.default_rng(0)
    cost = rng.integers(0, 6, (7, 4))
    np.testing.assert_array_equal(dtw_cumulative(cost), dtw_cumulative(cost.T).T)


def test_identical_sequences_align_one_to_one_everywhere(toy_teacher_tokenizer, toy_texts):
    tokens = toy_teacher_tokenizer.convert_ids_to_tokens(
        toy_teacher_tokenizer(toy_texts[0])["input_ids"]
    )
    alignment = mined_dp_align(tokens, tokens)
    assert alignment.aligned_teacher_pos_S.tolist() == list(range(len(tokens)))
    assert alignment.total_cost == 0 and alignment.one_to_one_share == 1.0
    repeated = ["a", "a", "a"]
    assert mined_dp_align(repeated, repeated).aligned_teacher_pos_S.tolist() == [0, 1, 2]


def test_space_markers_are_stripped():
    alignment = mined_dp_align(["▁has", "▁2"], ["Ġhas", " 2"])
    assert alignment.total_cost == 0
    assert alignment.aligned_teacher_pos_S.tolist() == [0, 1]


def test_many_to_one_runs_are_not_one_to_one():
    alignment = mined_dp_align(["So", "lve", "it"], ["Solve", "it"])
    assert alignment.path_P2.tolist() == [[0, 0], [1, 0], [2, 1]]
    assert alignment.aligned_teacher_pos_S.tolist() == [-1, -1, 1]


def test_empty_sequences():
    alignment = mined_dp_align([], ["a"])
    assert alignment.path_P2.shape == (0, 2) and alignment.aligned_teacher_pos_S.shape == (0,)
    alignment = mined_dp_align(["a", "b"], [])
    assert alignment.aligned_teacher_pos_S.tolist() == [-1, -1]
    assert one_to_one_from_path(np.zeros((0, 2), dtype=np.int64), 2, 0).tolist() == [-1, -1]


def test_real_pair_path_is_monotone_and_complete(
    toy_teacher_tokenizer, toy_student_tokenizer, alignment_texts
):
    student_vocab = normalized_vocab(toy_student_tokenizer)
    teacher_vocab = normalized_vocab(toy_teacher_tokenizer)
    for text in alignment_texts[:10]:
        student = token_char_spans(toy_student_tokenizer, text)
        teacher = token_char_spans(toy_teacher_tokenizer, text)
        student_tokens = [student_vocab[i] for i in student.ids_N]
        teacher_tokens = [teacher_vocab[i] for i in teacher.ids_N]
        dp = mined_dp_align(student_tokens, teacher_tokens)
        path = dp.path_P2
        assert path[0].tolist() == [0, 0]
        assert path[-1].tolist() == [len(student_tokens) - 1, len(teacher_tokens) - 1]
        assert np.all(np.diff(path, axis=0) >= 0) and np.all(np.diff(path, axis=0).sum(1) >= 1)
        pairs = np.flatnonzero(dp.aligned_teacher_pos_S >= 0)
        assert np.all(np.diff(dp.aligned_teacher_pos_S[pairs]) > 0)
        # the path cost is the summed token distance along it
        cost = token_cost_matrix(student_tokens, teacher_tokens)
        assert dp.total_cost == int(cost[path[:, 0], path[:, 1]].sum())


@pytest.mark.parametrize("backend", ["numpy", "rapidfuzz"])
def test_cost_matrix_backends(backend):
    if backend == "rapidfuzz":
        pytest.importorskip("rapidfuzz")
    student, teacher = ["Ġab", "c", "abc", "ab"], ["▁abc", "b", "", "ab"]
    expected = [[levenshtein(strip_markers(s), strip_markers(t)) for t in teacher] for s in student]
    assert token_cost_matrix(student, teacher, backend).tolist() == expected
