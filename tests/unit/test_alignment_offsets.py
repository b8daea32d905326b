"""Character-offset alignment: properties over many texts on two different trained tokenizers,
hand-written edge cases, and the vectorised cut matching against its two-pointer reference."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import ByT5Tokenizer

from cot2align_ds.alignment.offsets import (
    TokenizerError,
    _cuts,
    _match_cuts,
    align_by_char_boundaries,
    clean_char_spans,
    match_intervals_greedy,
    token_char_spans,
)


def _covered(spans_N2: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Character interval covered by the content tokens of positions lo..hi-1 ((0, 0) if none)."""
    part = spans_N2[lo:hi]
    part = part[part[:, 1] > part[:, 0]]
    return (int(part[:, 0].min()), int(part[:, 1].max())) if part.size else (0, 0)


def _check_partition(group_id_N: np.ndarray, ranges_G2: np.ndarray) -> None:
    """Every position is in exactly one group or in the unmatched suffix; groups are contiguous,
    non-empty and in order."""
    matched = group_id_N >= 0
    num_matched = int(matched.sum())
    assert matched[:num_matched].all() and not matched[num_matched:].any(), "-1 not a suffix"
    expected = np.repeat(np.arange(ranges_G2.shape[0]), ranges_G2[:, 1] - ranges_G2[:, 0])
    np.testing.assert_array_equal(group_id_N[:num_matched], expected)
    assert (ranges_G2[:, 1] > ranges_G2[:, 0]).all(), "empty group"
    assert ranges_G2[0, 0] == 0 if ranges_G2.size else num_matched == 0
    np.testing.assert_array_equal(ranges_G2[1:, 0], ranges_G2[:-1, 1])  # monotone, no gaps


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_groups_partition_both_sides_and_share_boundaries(
    toy_teacher_tokenizer, toy_student_tokenizer, alignment_texts, add_special_tokens
):
    num_one_to_one = 0
    for text in alignment_texts:
        student = token_char_spans(toy_student_tokenizer, text, add_special_tokens)
        teacher = token_char_spans(toy_teacher_tokenizer, text, add_special_tokens)
        alignment = align_by_char_boundaries(student.spans_N2, teacher.spans_N2)
        _check_partition(alignment.group_id_S, alignment.student_ranges_G2)
        _check_partition(alignment.group_id_T, alignment.teacher_ranges_G2)
        # both tokenizers cover the whole text, so nothing is unmatched ...
        assert alignment.num_unmatched_student == alignment.num_unmatched_teacher == 0
        # ... and each group covers the same characters on both sides
        for (s_lo, s_hi), (t_lo, t_hi) in zip(
            alignment.student_ranges_G2, alignment.teacher_ranges_G2, strict=True
        ):
            assert _covered(student.spans_N2, s_lo, s_hi) == _covered(teacher.spans_N2, t_lo, t_hi)
        pairs = np.flatnonzero(alignment.aligned_teacher_pos_S >= 0)
        np.testing.assert_array_equal(
            student.spans_N2[pairs], teacher.spans_N2[alignment.aligned_teacher_pos_S[pairs]]
        )
        assert np.all(np.diff(alignment.aligned_teacher_pos_S[pairs]) > 0)
        num_one_to_one += pairs.size
    assert num_one_to_one > 100  # the pair differs, but not everywhere


def test_token_spans_cover_the_text(toy_teacher_tokenizer, toy_student_tokenizer, alignment_texts):
    for text in alignment_texts:
        for tokenizer in (toy_teacher_tokenizer, toy_student_tokenizer):
            spans_N2 = token_char_spans(tokenizer, text).spans_N2
            content = spans_N2[spans_N2[:, 1] > spans_N2[:, 0]]
            covered = np.zeros(len(text), dtype=bool)
            for start, end in content:
                covered[start:end] = True
            assert covered.all(), text
            assert np.all(np.diff(np.maximum.accumulate(spans_N2[:, 1])) >= 0)


def test_unigram_lone_space_marker_becomes_empty(toy_student_tokenizer):
    # "X" is not in the Unigram vocabulary: a lone "▁" (raw offset (0, 1)) precedes "<unk>" (0, 1)
    text = "Xyz Qq"
    encoding = toy_student_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert encoding.tokens()[0] == "▁" and encoding["offset_mapping"][:2] == [(0, 1), (0, 1)]
    spans_N2 = token_char_spans(toy_student_tokenizer, text).spans_N2
    assert spans_N2[0].tolist() == [0, 0] and spans_N2[1].tolist() == [0, 1]
    # a "▁" that does cover a space keeps its span
    space_pos = encoding.tokens().index("▁", 1)
    assert spans_N2[space_pos, 1] - spans_N2[space_pos, 0] == 1


def test_clean_char_spans_places_and_clips():
    text = "ab cd"
    tokens = ["<s>", "▁", "ab", "▁cd", "</s>", "junk"]
    offsets = [(0, 0), (0, 1), (0, 2), (2, 5), (0, 0), (4, 9)]
    spans = clean_char_spans(offsets, text, tokens)
    # special at the start stays at 0; "▁" over "a" is synthesised -> empty; the trailing
    # special moves to where the text covered so far ends; out-of-range ends are clipped
    assert spans.tolist() == [[0, 0], [0, 0], [0, 2], [2, 5], [5, 5], [4, 5]]
    spans_no_tokens = clean_char_spans(offsets, text)
    assert spans_no_tokens[1].tolist() == [0, 1]  # without token strings nothing is guessed


def _align(student, teacher):
    return align_by_char_boundaries(np.array(student).reshape(-1, 2), np.array(teacher))


def test_leading_space_token_joins_its_word():
    # student: "▁" covering the space, then "Mia"; teacher: "ĠMia"
    alignment = _align([(0, 1), (1, 4), (4, 8)], [(0, 4), (4, 8)])
    assert alignment.student_ranges_G2.tolist() == [[0, 2], [2, 3]]
    assert alignment.teacher_ranges_G2.tolist() == [[0, 1], [1, 2]]
    assert alignment.aligned_teacher_pos_S.tolist() == [-1, -1, 1]
    assert alignment.one_to_one_share == pytest.approx(1 / 3)


def test_byte_fallback_tokens_sharing_a_character_stay_together():
    # "é" as two byte tokens sharing span (1, 2) on the teacher; the student has "é" whole
    alignment = _align([(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2), (1, 2), (2, 3)])
    assert alignment.teacher_ranges_G2.tolist() == [[0, 1], [1, 3], [3, 4]]
    assert alignment.aligned_teacher_pos_S.tolist() == [0, -1, 3]


def test_overlapping_spans_are_never_split():
    # a raw lone "▁" overlapping the next token (0, 1) + (0, 1), not cleaned
    alignment = _align([(0, 1), (0, 1), (1, 2)], [(0, 1), (1, 2)])
    assert alignment.student_ranges_G2.tolist() == [[0, 2], [2, 3]]
    assert alignment.aligned_teacher_pos_S.tolist() == [-1, -1, 1]


def test_zero_width_specials():
    # student: BOS, a, b, EOS; teacher: a, b, EOS  -> BOS joins "a"; EOS pairs with EOS
    alignment = _align([(0, 0), (0, 1), (1, 2), (2, 2)], [(0, 1), (1, 2), (2, 2)])
    assert alignment.student_ranges_G2.tolist() == [[0, 2], [2, 3], [3, 4]]
    assert alignment.teacher_ranges_G2.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert alignment.aligned_teacher_pos_S.tolist() == [-1, -1, 1, 2]
    # a one-sided empty token joins the next group; at the very end, the previous one
    middle = _align([(0, 1), (1, 1), (1, 2), (2, 2)], [(0, 1), (1, 2)])
    assert middle.student_ranges_G2.tolist() == [[0, 1], [1, 4]]
    # both have a BOS: it is a one-to-one group of its own
    both = _align([(0, 0), (0, 2)], [(0, 0), (0, 1), (1, 2)])
    assert both.aligned_teacher_pos_S.tolist() == [0, -1]
    assert both.teacher_ranges_G2.tolist() == [[0, 1], [1, 3]]


def test_only_special_tokens():
    alignment = _align([(0, 0), (0, 0)], [(0, 0)])
    assert alignment.num_groups == 1 and alignment.student_ranges_G2.tolist() == [[0, 2]]
    one_sided = _align([(0, 0)], np.zeros((0, 2), dtype=np.int64))
    assert one_sided.num_groups == 0 and one_sided.group_id_S.tolist() == [-1]
    assert one_sided.one_to_one_share == 0.0


def test_empty_side_leaves_the_other_unmatched():
    alignment = _align(np.zeros((0, 2), dtype=np.int64), [(0, 1), (1, 2)])
    assert alignment.num_groups == 0
    assert alignment.group_id_T.tolist() == [-1, -1]
    assert alignment.aligned_teacher_pos_S.shape == (0,)


def test_truncated_side_leaves_the_tail_unmatched():
    # teacher truncated inside the student's second token "cde" (2, 5): chars 2..4 unshared
    alignment = _align([(0, 2), (2, 5), (5, 6)], [(0, 2), (2, 3), (3, 4)])
    assert alignment.group_id_S.tolist() == [0, -1, -1]
    assert alignment.group_id_T.tolist() == [0, -1, -1]
    assert alignment.num_unmatched_student == 2 and alignment.num_unmatched_teacher == 2
    # truncated on a shared boundary: only the longer side has a tail
    clean = _align([(0, 2), (2, 5), (5, 6)], [(0, 2), (2, 5)])
    assert clean.group_id_S.tolist() == [0, 1, -1] and clean.group_id_T.tolist() == [0, 1]


def test_truncation_through_max_length(toy_teacher_tokenizer, toy_student_tokenizer, toy_texts):
    text = toy_texts[3]
    student = token_char_spans(toy_student_tokenizer, text, max_length=20)
    teacher = token_char_spans(toy_teacher_tokenizer, text)
    assert student.ids_N.size == 20 < teacher.ids_N.size
    alignment = align_by_char_boundaries(student.spans_N2, teacher.spans_N2)
    _check_partition(alignment.group_id_T, alignment.teacher_ranges_G2)
    assert alignment.num_unmatched_teacher > 0
    last_group = alignment.teacher_ranges_G2[-1]
    assert teacher.spans_N2[last_group[1] - 1, 1] <= student.spans_N2[:, 1].max()


def test_gap_in_one_side_still_matches():
    # student trims the space ("Mia" (0, 3), "has" (4, 7)); teacher keeps it ("Mia " (0, 4))
    alignment = _align([(0, 3), (4, 7)], [(0, 4), (4, 7)])
    assert alignment.aligned_teacher_pos_S.tolist() == [0, 1]


def test_vectorised_cut_matching_equals_two_pointer_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sides = []
        for _ in range(2):
            # random content spans with occasional gaps and overlaps
            num = int(rng.integers(0, 12))
            ends = np.cumsum(rng.integers(1, 3, num))
            starts = np.concatenate([[0], ends[:-1]]) + rng.integers(-1, 2, num) * (
                rng.random(num) < 0.3
            )
            spans = np.stack([np.maximum(starts, 0), ends], axis=1)
            spans[:, 0] = np.minimum(spans[:, 0], spans[:, 1] - 1)
            sides.append(_cuts(spans))
        fast = _match_cuts(*sides)
        reference = match_intervals_greedy(
            sides[0].lo_C, sides[0].hi_C, sides[1].lo_C, sides[1].hi_C
        )
        np.testing.assert_array_equal(fast[0], reference[0])
        np.testing.assert_array_equal(fast[1], reference[1])


def test_gaps_on_both_sides_use_the_reference_matching():
    # student cut [3, 6] (gap) meets teacher cuts [4, 4] and [5, 5]: greedy takes the first
    alignment = _align([(0, 3), (6, 8)], [(0, 4), (4, 5), (5, 8)])
    assert alignment.student_ranges_G2.tolist() == [[0, 1], [1, 2]]
    assert alignment.teacher_ranges_G2.tolist() == [[0, 1], [1, 3]]


def test_slow_tokenizer_is_a_clear_error():
    with pytest.raises(TokenizerError, match="no offset mapping; use a fast tokenizer"):
        token_char_spans(ByT5Tokenizer(), "abc")
