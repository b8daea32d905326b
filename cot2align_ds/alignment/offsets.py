"""Character spans of a tokenization, and alignment of two tokenizations by shared boundaries.

Two tokenizers of the same text agree wherever both put a token boundary at the same character:
the text between two such shared boundaries is covered by a contiguous run of student tokens and
a contiguous run of teacher tokens, an aligned *group*. A group of one student and one teacher
token is a one-to-one pair that a MinED/ULD-style loss can use directly.

Shape legend: S student positions, T teacher positions, N positions of either side, G groups,
K content tokens of one side, C its valid cuts, E its empty tokens, M matched cuts (shared
boundaries after the start), B shared boundaries including the start (M + 1).

Conventions of :func:`align_by_char_boundaries` (tested in tests/unit/test_alignment_offsets.py):
- Spans are half-open ``[start, end)`` character ranges. A token with ``end <= start`` is *empty*
  (special tokens, a synthesised space marker); the others are *content* tokens.
- A side can cut after content token k when no later token starts before the characters seen so
  far end; the cut is the interval ``[max end so far, min later start]``, so a gap in the coverage
  (whitespace left out by one tokenizer) still lines up with the other side's cut anywhere in it.
  Tokens sharing one character (byte fallback, an overlapping lone "▁") can never be split.
- Cuts of the two sides match when their intervals intersect (greedy, in order). The start of
  the sequences is always a shared boundary.
- Empty tokens: where both sides have empty tokens at the same shared boundary (BOS next to BOS,
  EOS next to EOS) they form a group of their own; otherwise an empty token joins the group of
  the next content token of its side, or of the previous one when no matched token follows.
- Truncation: content tokens after the last shared boundary (the tail of the side that covers
  more text, or both tails when neither ends on a shared boundary) are *unmatched*: group id -1.
  Nothing else is ever unmatched, and unmatched positions always form a suffix.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from cot2align_ds.errors import UserError

SPACE_MARKERS = "Ġ▁"
_MARKER_SET = frozenset(SPACE_MARKERS)
# str.isspace per code point; every whitespace code point is below U+3001 (the last entry,
# False, stands for all larger ones)
_SPACE_TABLE = np.array([chr(code).isspace() for code in range(0x3002)], dtype=bool)


class TokenizerError(UserError):
    """A tokenizer cannot be used as given; the message says what to fix."""


@dataclass(frozen=True)
class TokenSpans:
    """Token ids and their cleaned character spans for one text."""

    ids_N: np.ndarray  # int64
    spans_N2: np.ndarray  # int64, [start, end) per token; end == start for empty tokens


@dataclass(frozen=True)
class CharAlignment:
    """Groups of student and teacher tokens that end on shared character boundaries."""

    student_ranges_G2: np.ndarray  # int64 [first, last + 1) student positions of each group
    teacher_ranges_G2: np.ndarray  # int64 [first, last + 1) teacher positions of each group
    group_id_S: np.ndarray  # int64, -1 = unmatched (truncated tail)
    group_id_T: np.ndarray  # int64, -1 = unmatched (truncated tail)
    aligned_teacher_pos_S: np.ndarray  # int64 teacher position for one-to-one groups, else -1
    one_to_one_share: float  # share of student positions in one-to-one groups (0 when S == 0)

    @property
    def num_groups(self) -> int:
        return int(self.student_ranges_G2.shape[0])

    @property
    def num_unmatched_student(self) -> int:
        return int((self.group_id_S < 0).sum())

    @property
    def num_unmatched_teacher(self) -> int:
        return int((self.group_id_T < 0).sum())


def tokenizer_name(tokenizer: Any) -> str:
    """``name_or_path`` when set, else the class name (for messages)."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _no_offsets_error(tokenizer: Any) -> TokenizerError:
    return TokenizerError(
        f"tokenizer {tokenizer_name(tokenizer)!r} has no offset mapping; "
        "use a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
    )


def require_offsets(tokenizer: Any) -> None:
    """Raise TokenizerError unless ``tokenizer`` is a fast tokenizer (one with offset mappings;
    a slow one silently ignores ``return_offsets_mapping``)."""
    if not getattr(tokenizer, "is_fast", False):
        raise _no_offsets_error(tokenizer)


def token_char_spans(
    tokenizer: Any,
    text: str,
    add_special_tokens: bool = False,
    max_length: int | None = None,
) -> TokenSpans:
    """Tokenize ``text`` and return ids with cleaned character spans (see clean_char_spans).

    ``max_length`` truncates the tokenization (the alignment then reports the tail of the other
    side as unmatched).
    """
    require_offsets(tokenizer)
    encoding = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    if "offset_mapping" not in encoding:
        raise _no_offsets_error(tokenizer)
    ids = encoding["input_ids"]
    # the Rust encoding already holds the token strings; converting ids again costs ~3x more
    tokens = encoding.tokens() if hasattr(encoding, "tokens") else None
    if tokens is None:
        tokens = tokenizer.convert_ids_to_tokens(ids)
    spans_N2 = clean_char_spans(encoding["offset_mapping"], text, tokens)
    return TokenSpans(np.asarray(ids, dtype=np.int64).reshape(-1), spans_N2)


def clean_char_spans(offsets: Any, text: str, tokens: list[str] | None = None) -> np.ndarray:
    """Raw offset mapping -> spans_N2 (int64) that the alignment can trust.

    - clipped to the text, ``end >= start``;
    - a token made only of space markers ("Ġ", "▁") whose span holds no whitespace stands for a
      space the tokenizer synthesised (Unigram/SentencePiece prefix space, whose raw span
      overlaps the next token): made empty;
    - empty tokens (special tokens report (0, 0) wherever they are) are placed where they occur:
      at the end of the characters covered so far.
    Spans shared by several tokens (byte fallback) are kept: the alignment keeps them together.
    """
    spans_N2 = _as_spans(offsets)
    np.clip(spans_N2, 0, len(text), out=spans_N2)
    np.maximum(spans_N2[:, 1], spans_N2[:, 0], out=spans_N2[:, 1])
    marker_pos_M = np.asarray([] if tokens is None else _marker_only_positions(tokens), np.int64)
    if marker_pos_M.size:
        # whitespace characters inside each span, from a prefix count over the text
        space_count = np.concatenate([[0], np.cumsum(_is_space_chars(text))])
        start_M, end_M = spans_N2[marker_pos_M, 0], spans_N2[marker_pos_M, 1]
        synthesised_M = space_count[end_M] == space_count[start_M]
        spans_N2[marker_pos_M[synthesised_M], 1] = start_M[synthesised_M]
    empty_N = spans_N2[:, 1] <= spans_N2[:, 0]
    if empty_N.any():
        covered_N = np.maximum.accumulate(np.where(empty_N, 0, spans_N2[:, 1]))
        spans_N2[empty_N] = covered_N[empty_N, None]
    return spans_N2


def _as_spans(offsets: Any) -> np.ndarray:
    """Offsets (list of pairs, or an array) -> a fresh int64 (N, 2) array."""
    if isinstance(offsets, list):
        # fromiter over the flat pairs is ~3x faster than asarray on a list of tuples
        flat = itertools.chain.from_iterable(offsets)
        return np.fromiter(flat, dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
    return np.array(offsets, dtype=np.int64).reshape(-1, 2)


def _is_space_chars(text: str) -> np.ndarray:
    """Bool per character: is it whitespace (as str.isspace)?"""
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    return _SPACE_TABLE[np.minimum(codes, _SPACE_TABLE.size - 1)]


def _marker_only_positions(tokens: list[str]) -> list[int]:
    """Positions of tokens made only of space markers ("▁", "ĠĠ")."""
    return [
        pos
        for pos, token in enumerate(tokens)
        if token[:1] in _MARKER_SET and not token.strip(SPACE_MARKERS)
    ]


@dataclass(frozen=True)
class _Cuts:
    """Content tokens of one side and the cuts it can make (see the module docstring)."""

    content_N: np.ndarray  # bool
    content_pos_K: np.ndarray  # positions of content tokens
    lo_C: np.ndarray  # valid cuts: interval [lo, hi] of character positions
    hi_C: np.ndarray
    after_k_C: np.ndarray  # index k of the content token each valid cut follows


def _cuts(spans_N2: np.ndarray) -> _Cuts:
    content_N = spans_N2[:, 1] > spans_N2[:, 0]
    content_pos_K = content_N.nonzero()[0]
    lo_K = np.maximum.accumulate(spans_N2[content_pos_K, 1])
    hi_K = lo_K.copy()  # the last cut has no gap after it (a truncated side ends there)
    if content_pos_K.size > 1:
        hi_K[:-1] = np.minimum.accumulate(spans_N2[content_pos_K, 0][::-1])[::-1][1:]
    valid_C = (hi_K >= lo_K).nonzero()[0]
    return _Cuts(content_N, content_pos_K, lo_K[valid_C], hi_K[valid_C], valid_C)


def _match_cuts(a: _Cuts, b: _Cuts) -> tuple[np.ndarray, np.ndarray]:
    """Indices of matched cut pairs, strictly increasing on both sides (greedy, in order).

    Cut intervals of one side are disjoint and increasing, so in the common case every cut meets
    at most one cut of the other side and the vectorised lookup is the whole answer.
    """
    first = np.searchsorted(b.hi_C, a.lo_C, side="left")  # first b cut with hi >= a's lo
    last = np.searchsorted(b.lo_C, a.hi_C, side="right") - 1  # last b cut with lo <= a's hi
    count = last - first + 1
    idx_a = (count == 1).nonzero()[0]
    idx_b = first[idx_a]
    if (count <= 1).all() and (idx_b.size < 2 or (np.diff(idx_b) > 0).all()):
        return idx_a, idx_b
    return match_intervals_greedy(a.lo_C, a.hi_C, b.lo_C, b.hi_C)


def match_intervals_greedy(
    lo_a: np.ndarray, hi_a: np.ndarray, lo_b: np.ndarray, hi_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two-pointer reference: match the earliest intersecting intervals, in order."""
    i, j, pairs = 0, 0, []
    lo_a_l, hi_a_l, lo_b_l, hi_b_l = lo_a.tolist(), hi_a.tolist(), lo_b.tolist(), hi_b.tolist()
    while i < len(lo_a_l) and j < len(lo_b_l):
        if hi_a_l[i] < lo_b_l[j]:
            i += 1
        elif hi_b_l[j] < lo_a_l[i]:
            j += 1
        else:
            pairs.append((i, j))
            i, j = i + 1, j + 1
    matched = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return matched[:, 0], matched[:, 1]


def _empty_at_boundary(
    cuts: _Cuts, matched_k_M: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty positions E, the number of content tokens before each, and the shared boundary
    (0..M) each sits at (-1 when inside a group)."""
    empty_pos_E = (~cuts.content_N).nonzero()[0]
    if empty_pos_E.size == 0:
        return empty_pos_E, empty_pos_E, empty_pos_E
    num_before_E = np.cumsum(cuts.content_N)[empty_pos_E]
    boundary_of = np.full(cuts.content_pos_K.size + 1, -1, dtype=np.int64)
    boundary_of[0] = 0  # the start of both sequences is always shared
    boundary_of[matched_k_M + 1] = np.arange(1, matched_k_M.size + 1)
    return empty_pos_E, num_before_E, boundary_of[num_before_E]


def _slots(
    cuts: _Cuts,
    matched_k_M: np.ndarray,
    empty: tuple[np.ndarray, np.ndarray, np.ndarray],
    own_B: np.ndarray,
) -> np.ndarray:
    """Slot of every position: content group g -> 2g+1, own empty group at shared boundary b ->
    2b, unmatched -> -1. Slots order the groups of both sides the same way."""
    num_matched, num_content = matched_k_M.size, cuts.content_pos_K.size
    # content group of content token k = number of matched cuts strictly before it
    group_K = np.searchsorted(matched_k_M, np.arange(num_content), side="left")
    # slot of content token k at [k + 1], with -1 sentinels before the first and after the last
    slot_ext = np.full(num_content + 2, -1, dtype=np.int64)
    slot_ext[1:-1] = np.where(group_K < num_matched, 2 * group_K + 1, -1)
    slots_N = np.full(cuts.content_N.shape[0], -1, dtype=np.int64)
    slots_N[cuts.content_pos_K] = slot_ext[1:-1]
    empty_pos_E, num_before_E, boundary_E = empty
    if empty_pos_E.size:
        next_E, prev_E = slot_ext[num_before_E + 1], slot_ext[num_before_E]
        attached_E = np.where(next_E >= 0, next_E, prev_E)
        own_E = (boundary_E >= 0) & own_B[boundary_E]  # index -1 reads own_B's last: masked
        slots_N[empty_pos_E] = np.where(own_E, 2 * boundary_E, attached_E)
    return slots_N


def align_by_char_boundaries(student_spans_S2: Any, teacher_spans_T2: Any) -> CharAlignment:
    """Partition both tokenizations into monotone groups ending on shared character boundaries.

    Args:
        student_spans_S2, teacher_spans_T2: ``[start, end)`` per token (clean them with
            :func:`clean_char_spans`, or get them from :func:`token_char_spans`).
    Returns:
        CharAlignment; conventions (empty tokens, truncation) in the module docstring.
    """
    student = _cuts(np.asarray(student_spans_S2, dtype=np.int64).reshape(-1, 2))
    teacher = _cuts(np.asarray(teacher_spans_T2, dtype=np.int64).reshape(-1, 2))
    s_idx, t_idx = _match_cuts(student, teacher)
    s_matched_k, t_matched_k = student.after_k_C[s_idx], teacher.after_k_C[t_idx]
    s_empty = _empty_at_boundary(student, s_matched_k)
    t_empty = _empty_at_boundary(teacher, t_matched_k)
    # own_B[b]: both sides have empty tokens right at shared boundary b
    own_B = np.zeros(s_matched_k.size + 1, dtype=bool)
    own_B[s_empty[2][s_empty[2] >= 0]] = True
    t_has_B = np.zeros_like(own_B)
    t_has_B[t_empty[2][t_empty[2] >= 0]] = True
    own_B &= t_has_B
    slots_S = _slots(student, s_matched_k, s_empty, own_B)
    slots_T = _slots(teacher, t_matched_k, t_empty, own_B)
    return _build_alignment(slots_S, slots_T, own_B)


def _build_alignment(slots_S: np.ndarray, slots_T: np.ndarray, own_B: np.ndarray) -> CharAlignment:
    """Slots -> dense group ids, per-group ranges and the one-to-one map."""
    # used slots: every content group (odd) and the own empty groups (even); the table's last
    # entry (-1) is what slot -1 reads
    used = np.empty(2 * own_B.size, dtype=bool)
    used[1::2] = True
    used[0::2] = own_B
    group_of_slot = np.cumsum(used) - 1
    group_of_slot[-1] = -1  # slot 2M + 1 does not exist; index -1 lands here
    group_id_S, group_id_T = group_of_slot[slots_S], group_of_slot[slots_T]
    num_groups = int(used[:-1].sum())
    count_s = np.bincount(group_id_S[group_id_S >= 0], minlength=num_groups)
    count_t = np.bincount(group_id_T[group_id_T >= 0], minlength=num_groups)
    # ids are non-decreasing with a -1 suffix, so each group is one contiguous run
    student_ranges_G2, teacher_ranges_G2 = _ranges(count_s), _ranges(count_t)
    one_to_one_G = (count_s == 1) & (count_t == 1)
    aligned_teacher_pos_S = np.full(slots_S.shape[0], -1, dtype=np.int64)
    aligned_teacher_pos_S[student_ranges_G2[one_to_one_G, 0]] = teacher_ranges_G2[one_to_one_G, 0]
    num_s = slots_S.shape[0]
    return CharAlignment(
        student_ranges_G2=student_ranges_G2,
        teacher_ranges_G2=teacher_ranges_G2,
        group_id_S=group_id_S,
        group_id_T=group_id_T,
        aligned_teacher_pos_S=aligned_teacher_pos_S,
        one_to_one_share=float(one_to_one_G.sum() / num_s) if num_s else 0.0,
    )


def _ranges(count_G: np.ndarray) -> np.ndarray:
    """Group sizes -> [first, last + 1) positions, int64 (G, 2)."""
    ranges_G2 = np.empty((count_G.size, 2), dtype=np.int64)
    np.cumsum(count_G, out=ranges_G2[:, 1])
    ranges_G2[:, 0] = ranges_G2[:, 1] - count_G
    return ranges_G2


__all__ = [
    "CharAlignment",
    "TokenSpans",
    "TokenizerError",
    "align_by_char_boundaries",
    "clean_char_spans",
    "require_offsets",
    "token_char_spans",
    "tokenizer_name",
]
