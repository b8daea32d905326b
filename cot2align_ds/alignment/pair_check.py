"""Is this teacher/student tokenizer pair usable for cross-tokenizer distillation? A report.

Fatal problems (training would crash or silently learn garbage):
- a tokenizer without offset mappings (a slow, Python tokenizer): the collator aligns the two
  tokenizations by character offsets;
- a model with fewer embedding rows than its tokenizer has tokens: ids past the last row index
  out of range (more rows than tokens is fine: vocabularies are often padded to a multiple of
  64, and the losses slice logits to the tokenizer length);
- no EOS token on either side: every answer ends with EOS, the only way the student learns to
  stop.
Warnings (workable): no pad token (the collator pads with EOS; padding is masked by length),
identical vocabularies (same-vocabulary KD applies), little exact vocabulary overlap, many
unknown tokens or few one-to-one aligned tokens on the sample texts.

Pure: the CLI command that loads the tokenizers and prints the report lives elsewhere.

Shape legend: N token positions of one text, W teacher vocab.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cot2align_ds.alignment.offsets import (
    TokenizerError,
    align_by_char_boundaries,
    require_offsets,
    token_char_spans,
    tokenizer_name,
)
from cot2align_ds.alignment.vocab_map import exact_vocab_map, is_byte_level, vocab_strings

DEFAULT_TEXTS = (
    "Below is an instruction that describes a task. Write a response that completes it.",
    "Mia has 12 apples. She buys 7 more and gives away 3, so she has 16 apples now.",
    "The café's menu lists crème brûlée for $4.50 (about €4.20) — a 10% discount!",
    "def area(radius: float) -> float:\n    return 3.14159 * radius ** 2\n",
    "Let's think step by step.\nTherefore, the answer is: 42",
)
MIN_ONE_TO_ONE_SHARE = 0.2
MIN_EXACT_OVERLAP = 0.1
MAX_UNK_SHARE = 0.01
_ROLES = ("bos", "eos", "pad", "unk")


@dataclass
class SideInfo:
    """What the report knows about one tokenizer."""

    name: str
    vocab_size: int
    embedding_rows: int | None
    fast: bool
    byte_level: bool
    special: dict[str, str | None]


@dataclass
class SampleStats:
    """Character-offset alignment of the two tokenizations of the sample texts."""

    num_texts: int
    num_student_tokens: int
    num_teacher_tokens: int
    num_groups: int
    one_to_one_share: float  # student tokens aligned one-to-one / student tokens
    one_to_one_group_share: float  # one-to-one groups / groups
    mean_group_size_student: float
    mean_group_size_teacher: float
    student_unk_share: float
    teacher_unk_share: float


@dataclass
class PairReport:
    """Result of :func:`check_tokenizer_pair`; ``problems`` are fatal, ``warnings`` are not."""

    teacher: SideInfo
    student: SideInfo
    exact_overlap_share: float | None  # teacher tokens with an exact student match (normalised)
    identical_vocab: bool
    sample: SampleStats | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (``json.dumps(report.to_dict())``)."""
        return {**asdict(self), "ok": self.ok}

    def to_text(self) -> str:
        """Human-readable, one fact per line, problems and warnings last."""
        lines = [f"tokenizer pair: teacher {self.teacher.name} / student {self.student.name}"]
        for role, side in (("teacher", self.teacher), ("student", self.student)):
            lines.append(_side_line(role, side))
        if self.exact_overlap_share is not None:
            same = " (identical vocabularies)" if self.identical_vocab else ""
            lines.append(f"exact overlap: {self.exact_overlap_share:.1%} of teacher tokens{same}")
        if self.sample is not None:
            lines.extend(_sample_lines(self.sample))
        lines += [f"PROBLEM: {text}" for text in self.problems]
        lines += [f"warning: {text}" for text in self.warnings]
        lines.append("OK" if self.ok else f"NOT OK ({len(self.problems)} problem(s))")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def _side_line(role: str, side: SideInfo) -> str:
    rows = "-" if side.embedding_rows is None else str(side.embedding_rows)
    kind = "byte-level" if side.byte_level else "not byte-level"
    special = " ".join(f"{key}={value!r}" for key, value in side.special.items())
    fast = "fast" if side.fast else "SLOW"
    return f"{role}: {side.vocab_size} tokens, embedding rows {rows}, {fast}, {kind}; {special}"


def _sample_lines(sample: SampleStats) -> list[str]:
    return [
        f"sample: {sample.num_texts} texts, {sample.num_student_tokens} student / "
        f"{sample.num_teacher_tokens} teacher tokens, {sample.num_groups} aligned groups",
        f"one-to-one: {sample.one_to_one_share:.1%} of student tokens, "
        f"{sample.one_to_one_group_share:.1%} of groups; mean group size "
        f"{sample.mean_group_size_student:.2f} student / {sample.mean_group_size_teacher:.2f} "
        "teacher tokens",
        f"unknown tokens: student {sample.student_unk_share:.1%}, "
        f"teacher {sample.teacher_unk_share:.1%}",
    ]


def _side_info(tokenizer: Any, embedding_rows: int | None) -> SideInfo:
    special = {role: getattr(tokenizer, f"{role}_token", None) for role in _ROLES}
    return SideInfo(
        name=tokenizer_name(tokenizer),
        vocab_size=len(tokenizer),
        embedding_rows=embedding_rows,
        fast=bool(getattr(tokenizer, "is_fast", False)),
        byte_level=is_byte_level(tokenizer),
        special={role: None if value is None else str(value) for role, value in special.items()},
    )


def _side_findings(role: str, side: SideInfo) -> tuple[list[str], list[str]]:
    """(problems, warnings) of one tokenizer on its own."""
    problems, warnings = [], []
    if not side.fast:
        problems.append(
            f"{role} tokenizer {side.name!r} has no offset mapping; use a fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if side.embedding_rows is not None and side.embedding_rows < side.vocab_size:
        problems.append(
            f"{role} model has {side.embedding_rows} embedding rows but its tokenizer has "
            f"{side.vocab_size} tokens: use the model's own tokenizer or resize_token_embeddings"
        )
    if side.special["eos"] is None:
        problems.append(
            f"{role} tokenizer has no EOS token: answers end with EOS; set tokenizer.eos_token"
        )
    if side.special["pad"] is None:
        warnings.append(f"{role} tokenizer has no pad token: padding falls back to EOS")
    return problems, warnings


def _sample_stats(
    teacher_tokenizer: Any, student_tokenizer: Any, texts: Sequence[str]
) -> SampleStats:
    """Align each text's two tokenizations by character offsets and add up the groups."""
    totals = np.zeros(6, dtype=np.int64)  # S, T, groups, 1:1 groups, S unk, T unk
    for text in texts:
        student = token_char_spans(student_tokenizer, text)
        teacher = token_char_spans(teacher_tokenizer, text)
        alignment = align_by_char_boundaries(student.spans_N2, teacher.spans_N2)
        one_to_one = int((alignment.aligned_teacher_pos_S >= 0).sum())
        totals += [
            student.ids_N.size,
            teacher.ids_N.size,
            alignment.num_groups,
            one_to_one,
            _count_id(student.ids_N, getattr(student_tokenizer, "unk_token_id", None)),
            _count_id(teacher.ids_N, getattr(teacher_tokenizer, "unk_token_id", None)),
        ]
    num_s, num_t, groups, one_to_one, unk_s, unk_t = (int(value) for value in totals)
    return SampleStats(
        num_texts=len(texts),
        num_student_tokens=num_s,
        num_teacher_tokens=num_t,
        num_groups=groups,
        one_to_one_share=one_to_one / max(num_s, 1),
        one_to_one_group_share=one_to_one / max(groups, 1),
        mean_group_size_student=num_s / max(groups, 1),
        mean_group_size_teacher=num_t / max(groups, 1),
        student_unk_share=unk_s / max(num_s, 1),
        teacher_unk_share=unk_t / max(num_t, 1),
    )


def _count_id(ids_N: np.ndarray, token_id: int | None) -> int:
    return 0 if token_id is None else int((ids_N == token_id).sum())


def _sample_warnings(sample: SampleStats) -> list[str]:
    warnings = []
    for role, share in (
        ("student", sample.student_unk_share),
        ("teacher", sample.teacher_unk_share),
    ):
        if share > MAX_UNK_SHARE:
            warnings.append(
                f"{role} tokenizer maps {share:.1%} of the sample tokens to its unknown token: "
                "those characters are lost"
            )
    if sample.one_to_one_share < MIN_ONE_TO_ONE_SHARE:
        warnings.append(
            f"only {sample.one_to_one_share:.1%} of student tokens align one-to-one with a "
            "teacher token on the sample: position-wise KD (MinED/ULD) sees little teacher signal"
        )
    return warnings


def _vocab_findings(report: PairReport) -> None:
    if report.identical_vocab:
        report.warnings.append(
            "the two vocabularies are identical: same-vocabulary KD applies directly"
        )
    elif report.exact_overlap_share is not None and report.exact_overlap_share < MIN_EXACT_OVERLAP:
        report.warnings.append(
            f"only {report.exact_overlap_share:.1%} of teacher tokens have an exact student "
            "match: the MinED vocabulary map relies on approximate matches"
        )


def template_findings(tokenizers: dict[str, Any], template: str) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a prompt template against each tokenizer's chat template: an
    instruct model fed plain prompts is not what it was tuned on; chat prompts need a template."""
    problems, warnings = [], []
    for role, tokenizer in tokenizers.items():
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            problems.append(
                f"{role} tokenizer has no chat template, but data.template is chat; use "
                "alpaca or compact"
            )
        elif template != "chat" and has_chat:
            warnings.append(
                f"{role} tokenizer has a chat template (an instruct model) but prompts use the "
                f"{template} template; set data.template: chat to train on the conversation "
                "format it was tuned on"
            )
    return problems, warnings


def check_tokenizer_pair(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    texts: Sequence[str] | None = None,
    teacher_embedding_rows: int | None = None,
    student_embedding_rows: int | None = None,
    template: str | None = None,
) -> PairReport:
    """Report on a teacher/student tokenizer pair (module docstring); ``texts`` default to a
    few built-in lines (prose, numbers, accents, code); ``template``: the prompt template the
    run uses (checked against the tokenizers' chat templates)."""
    teacher = _side_info(teacher_tokenizer, teacher_embedding_rows)
    student = _side_info(student_tokenizer, student_embedding_rows)
    map_W = exact_vocab_map(teacher_tokenizer, student_tokenizer)
    report = PairReport(
        teacher=teacher,
        student=student,
        exact_overlap_share=float((map_W >= 0).mean()) if map_W.size else 0.0,
        identical_vocab=vocab_strings(teacher_tokenizer) == vocab_strings(student_tokenizer),
        sample=None,
    )
    for role, side in (("teacher", teacher), ("student", student)):
        problems, warnings = _side_findings(role, side)
        report.problems += problems
        report.warnings += warnings
    tokenizers = {"teacher": teacher_tokenizer, "student": student_tokenizer}
    if template is not None:
        problems, warnings = template_findings(tokenizers, template)
        report.problems += problems
        report.warnings += warnings
    _vocab_findings(report)
    try:
        require_offsets(teacher_tokenizer)
        require_offsets(student_tokenizer)
        report.sample = _sample_stats(
            teacher_tokenizer, student_tokenizer, list(DEFAULT_TEXTS if texts is None else texts)
        )
    except TokenizerError:
        return report  # already a problem; no alignment without offsets
    report.warnings += _sample_warnings(report.sample)
    return report


__all__ = ["DEFAULT_TEXTS", "PairReport", "SampleStats", "SideInfo", "check_tokenizer_pair"]
