"""Tokenizer-pair report: fatal problems, warnings, and the sample statistics on the toy pair."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from cot2align_ds.alignment.offsets import align_by_char_boundaries, token_char_spans
from cot2align_ds.alignment.pair_check import check_tokenizer_pair


def _without(tokenizer, *roles: str):
    """A copy of a fast tokenizer with some special-token roles unset."""
    special = {
        f"{role}_token": getattr(tokenizer, f"{role}_token")
        for role in ("bos", "eos", "pad", "unk")
        if role not in roles and getattr(tokenizer, f"{role}_token") is not None
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(tokenizer.backend_tokenizer), **special
    )


def test_toy_pair_is_ok_with_sensible_shares(
    toy_teacher_tokenizer, toy_student_tokenizer, alignment_texts
):
    texts = alignment_texts[:20]
    report = check_tokenizer_pair(toy_teacher_tokenizer, toy_student_tokenizer, texts)
    assert report.ok and report.problems == []
    sample = report.sample
    assert sample.num_texts == 20
    # recompute the one-to-one share independently
    one_to_one = num_student = 0
    for text in texts:
        student = token_char_spans(toy_student_tokenizer, text)
        teacher = token_char_spans(toy_teacher_tokenizer, text)
        alignment = align_by_char_boundaries(student.spans_N2, teacher.spans_N2)
        one_to_one += int((alignment.aligned_teacher_pos_S >= 0).sum())
        num_student += student.ids_N.size
    assert sample.num_student_tokens == num_student
    assert sample.one_to_one_share == pytest.approx(one_to_one / num_student)
    assert 0.05 < sample.one_to_one_share < 0.95
    # the two segment differently (the Unigram keeps "pens." whole, the BPE splits off the ".";
    # the BPE keeps some rare words whole that the Unigram splits): some groups span several tokens
    group_sizes = (sample.mean_group_size_student, sample.mean_group_size_teacher)
    assert min(group_sizes) >= 1.0 and max(group_sizes) > 1.05
    assert 0 < report.exact_overlap_share < 1 and not report.identical_vocab
    assert report.teacher.byte_level and not report.student.byte_level
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True
    assert report.to_text().splitlines()[-1] == "OK"


def test_default_texts_flag_unknown_characters(toy_teacher_tokenizer, toy_student_tokenizer):
    # the built-in sample has accents and symbols the toy Unigram never saw
    report = check_tokenizer_pair(toy_teacher_tokenizer, toy_student_tokenizer)
    assert report.ok
    assert report.sample.student_unk_share > 0 and report.sample.teacher_unk_share == 0
    assert any("unknown token" in warning for warning in report.warnings)


def test_slow_tokenizer_is_fatal(toy_student_tokenizer):
    report = check_tokenizer_pair(ByT5Tokenizer(), toy_student_tokenizer)
    assert not report.ok and report.sample is None
    assert any("no offset mapping; use a fast tokenizer" in p for p in report.problems)
    assert "PROBLEM: teacher tokenizer" in report.to_text()


def test_missing_eos_is_fatal_missing_pad_is_a_warning(
    toy_teacher_tokenizer, toy_student_tokenizer
):
    no_eos = _without(toy_student_tokenizer, "eos")
    report = check_tokenizer_pair(toy_teacher_tokenizer, no_eos)
    assert report.problems == [
        "student tokenizer has no EOS token: answers end with EOS; set tokenizer.eos_token"
    ]
    no_pad = _without(toy_student_tokenizer, "pad")
    report = check_tokenizer_pair(toy_teacher_tokenizer, no_pad)
    assert report.ok
    assert "student tokenizer has no pad token: padding falls back to EOS" in report.warnings


def test_embedding_rows(toy_teacher_tokenizer, toy_student_tokenizer):
    size = len(toy_student_tokenizer)
    padded = check_tokenizer_pair(
        toy_teacher_tokenizer, toy_student_tokenizer, student_embedding_rows=size + 64
    )
    assert padded.ok
    short = check_tokenizer_pair(
        toy_teacher_tokenizer,
        toy_student_tokenizer,
        teacher_embedding_rows=len(toy_teacher_tokenizer) - 1,
        student_embedding_rows=size,
    )
    assert len(short.problems) == 1 and short.problems[0].startswith(
        f"teacher model has {len(toy_teacher_tokenizer) - 1} embedding rows"
    )


def test_identical_vocabularies_are_a_warning(toy_teacher_tokenizer, toy_texts):
    report = check_tokenizer_pair(toy_teacher_tokenizer, toy_teacher_tokenizer, toy_texts[:5])
    assert report.ok and report.identical_vocab
    assert report.exact_overlap_share == 1.0
    assert report.sample.one_to_one_share == 1.0
    assert any("identical" in warning for warning in report.warnings)
    assert np.isclose(report.sample.mean_group_size_student, 1.0)
