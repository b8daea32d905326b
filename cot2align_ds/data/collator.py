"""Collate examples into a batch for both tokenizers; runs inside DataLoader workers.

Legend: B batch, C CoT rows (at least 1, see below), S student positions, T teacher positions.

Each text is tokenized separately by each tokenizer: prompt (special tokens as the tokenizer
adds them, at most ``max_prompt_tokens``, cut from the left so the "Response:" marker next to
the answer survives, leading special tokens kept; evaluation cuts prompts the same way;
``data.prompt_truncation`` / ``data.prompt_special_tokens`` give the reference's right cut
without special tokens) then
answer + EOS (truncated so the total stays within ``max_total_tokens``). The batch layout (shifted
labels, right padding, response positions) is ``data/batch.py``.

Cross-tokenizer alignment (MinED) is computed here, in the worker, not in the training step:
``aligned_teacher_pos_BS`` gives, for each student logits position, the teacher logits position
predicting the one-to-one aligned answer token (-1 elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cot2align_ds.alignment.mined_dp import mined_dp_align
from cot2align_ds.alignment.offsets import align_by_char_boundaries, clean_char_spans
from cot2align_ds.data.batch import IGNORE_INDEX, DistillBatch, StandardViews, TokenSide
from cot2align_ds.data.examples import Example
from cot2align_ds.data.templates import require_chat_template
from cot2align_ds.inference.generation import chat_end_text, truncate_prompt
from cot2align_ds.losses.ot.alignment_mass import char_overlap


@dataclass(frozen=True)
class TokenizedPair:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    answer_spans: np.ndarray | None = None  # (N, 2) char spans of the kept answer tokens


def tokenize_pair(
    tokenizer,
    prompt: str,
    answer: str,
    *,
    max_prompt_tokens: int,
    max_total_tokens: int,
    prompt_cut: str = "left",
    prompt_special_tokens: bool = True,
    with_offsets: bool = False,
    end_ids: Sequence[int] | None = None,
) -> TokenizedPair:
    """``end_ids``: what ends the answer (a chat template's end-of-turn tokens); default EOS."""
    prompt_ids = truncate_prompt(
        tokenizer(prompt, add_special_tokens=prompt_special_tokens)["input_ids"],
        max_prompt_tokens,
        set(tokenizer.all_special_ids),
        prompt_cut,
    )
    encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=with_offsets)
    end = list(end_ids) if end_ids else [tokenizer.eos_token_id]
    answer_ids = (encoded["input_ids"] + end)[: max_total_tokens - len(prompt_ids)]
    input_ids = prompt_ids + answer_ids
    # Position t predicts token t+1: the last prompt position predicts the first answer token.
    labels = [IGNORE_INDEX] * (len(prompt_ids) - 1) + answer_ids + [IGNORE_INDEX]
    spans = None
    if with_offsets:
        spans = clean_char_spans(encoded["offset_mapping"], answer, encoded.tokens())
        # The end tokens are zero-width at the end of the answer text, so they align with the
        # other side's.
        ends = [[len(answer), len(answer)]] * len(end)
        spans = np.concatenate([spans.reshape(-1, 2), ends])[: len(answer_ids)]
    return TokenizedPair(input_ids, labels, len(prompt_ids), spans)


def pad_side(pairs: Sequence[TokenizedPair], pad_id: int) -> TokenSide:
    """Right-pad tokenized pairs into one ``TokenSide``.

    K (response positions) is the most response positions in a row, known here in the worker, so
    the training step needs no host sync to shape its gathers.
    """
    length = max((len(pair.input_ids) for pair in pairs), default=1)
    batch = len(pairs)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for row, pair in enumerate(pairs):
        size = len(pair.input_ids)
        input_ids[row, :size] = torch.tensor(pair.input_ids)
        attention_mask[row, :size] = 1
        labels[row, :size] = torch.tensor(pair.labels)
    is_response = labels != IGNORE_INDEX
    num_response = max(int(is_response.sum(1).max()) if batch else 0, 1)
    # A stable sort puts each row's response positions first, in order.
    order = torch.sort((~is_response).to(torch.int8), dim=1, stable=True).indices
    response_index = order[:, :num_response]
    response_mask = torch.gather(is_response, 1, response_index)
    return TokenSide(input_ids, attention_mask, labels, response_index, response_mask)


def answer_alignment(
    student: TokenizedPair,
    teacher: TokenizedPair,
    method: str,
    tokenizers,
    vocab_map: np.ndarray | None = None,
) -> np.ndarray:
    """Teacher logits position aligned one-to-one with each student logits position, else -1.

    ``offsets``: character spans of the answer tokens; ``dp``: edit-distance DP over the answer
    (target) tokens; ``dp_reference``: the DP over the input tokens at the answer's logits
    positions (the last prompt token, then the answer but its last token), a pair kept only
    where ``vocab_map`` sends the teacher's input id to the student's.
    """
    num_student = len(student.input_ids) - student.prompt_length
    num_teacher = len(teacher.input_ids) - teacher.prompt_length
    if method == "offsets":
        groups = align_by_char_boundaries(student.answer_spans, teacher.answer_spans)
        answer_map = groups.aligned_teacher_pos_S
    elif method == "dp_reference":
        s_inputs = student.input_ids[student.prompt_length - 1 : -1]
        t_inputs = teacher.input_ids[teacher.prompt_length - 1 : -1]
        answer_map = mined_dp_align(
            tokenizers["student"].convert_ids_to_tokens(s_inputs),
            tokenizers["teacher"].convert_ids_to_tokens(t_inputs),
        ).aligned_teacher_pos_S.copy()
        for k, j in enumerate(answer_map):
            if j >= 0 and (t_inputs[j] >= len(vocab_map) or vocab_map[t_inputs[j]] != s_inputs[k]):
                answer_map[k] = -1
    else:
        student_tokens = tokenizers["student"].convert_ids_to_tokens(
            student.input_ids[student.prompt_length :]
        )
        teacher_tokens = tokenizers["teacher"].convert_ids_to_tokens(
            teacher.input_ids[teacher.prompt_length :]
        )
        answer_map = mined_dp_align(student_tokens, teacher_tokens).aligned_teacher_pos_S
    positions = np.full(len(student.input_ids), -1, dtype=np.int64)
    for k in range(num_student):
        j = int(answer_map[k])
        if 0 <= j < num_teacher:
            # Logits at (prompt + k - 1) predict answer token k, on both sides.
            positions[student.prompt_length + k - 1] = teacher.prompt_length + j - 1
    return positions


def _char_aligned(pairs: dict, sides: dict) -> torch.Tensor:
    """(B, K_s, K_t): response position k answers token k on each side (``pad_side``)."""
    k_s = sides["student"].response_index.shape[1]
    k_t = sides["teacher"].response_index.shape[1]
    out = torch.zeros(len(pairs["student"]), k_s, k_t, dtype=torch.bool)
    for row, (student, teacher) in enumerate(zip(pairs["student"], pairs["teacher"], strict=True)):
        overlap = char_overlap(student.answer_spans, teacher.answer_spans)
        out[row, : overlap.shape[0], : overlap.shape[1]] = torch.from_numpy(overlap)
    return out


def pad_positions(rows: list[np.ndarray], length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), -1, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.from_numpy(row)
    return out


class DistillCollator:
    """Picklable callable: list of ``Example`` -> ``DistillBatch``.

    ``cot_views`` adds the standard views of the CoT examples (Cross-CoT); ``alignment``
    ("offsets" or "dp") adds MinED's one-to-one token alignment.
    """

    def __init__(
        self,
        student_tokenizer,
        teacher_tokenizer=None,
        *,
        max_prompt_tokens: int,
        max_total_tokens: int,
        prompt_cut: str = "left",
        prompt_special_tokens: bool = True,
        cot_views: bool = False,
        alignment: str | None = None,
        vocab_map=None,
        char_alignment: bool = False,
    ) -> None:
        self.tokenizers = {"student": student_tokenizer}
        if teacher_tokenizer is not None:
            self.tokenizers["teacher"] = teacher_tokenizer
        # Everything tokenize_pair needs besides the texts: lengths and how prompts are cut.
        self.limits = {
            "max_prompt_tokens": max_prompt_tokens,
            "max_total_tokens": max_total_tokens,
            "prompt_cut": prompt_cut,
            "prompt_special_tokens": prompt_special_tokens,
        }
        self.cot_views = cot_views
        self._end_ids: dict[str, list[int]] = {}
        self.alignment = alignment if teacher_tokenizer is not None else None
        # Character offsets need fast tokenizers on both sides; without them, no diagnostic.
        self.char_alignment = (
            char_alignment
            and teacher_tokenizer is not None
            and all(getattr(t, "is_fast", False) for t in self.tokenizers.values())
        )
        if self.alignment == "dp_reference" and vocab_map is None:
            raise ValueError("the dp_reference alignment needs the teacher->student vocabulary map")
        # A NumPy array: the collator is pickled into the DataLoader workers.
        self.vocab_map = None if vocab_map is None else np.asarray(vocab_map, dtype=np.int64)

    def _tokenize(
        self, role: str, examples: Sequence[Example], *, standard_view: bool = False
    ) -> list[TokenizedPair]:
        offsets = (self.alignment == "offsets" or self.char_alignment) and not standard_view
        tokenizer = self.tokenizers[role]
        pairs = []
        for example in examples:
            limits = dict(self.limits)
            end_ids = None
            if example.chat is not None:
                # The chat template writes its own BOS; the answer ends the template's turn.
                limits["prompt_special_tokens"] = False
                end_ids = self._chat_end_ids(role)
            answer = example.standard_answer if standard_view else example.answer
            prompt = example.prompt_for(tokenizer, standard_view=standard_view)
            pairs.append(
                tokenize_pair(
                    tokenizer,
                    prompt,
                    answer or "",
                    **limits,
                    with_offsets=offsets,
                    end_ids=end_ids,
                )  # fmt: skip
            )
        return pairs

    def _chat_end_ids(self, role: str) -> list[int]:
        if role not in self._end_ids:
            tokenizer = self.tokenizers[role]
            require_chat_template(tokenizer)
            text = chat_end_text(tokenizer)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            self._end_ids[role] = ids or [tokenizer.eos_token_id]
        return self._end_ids[role]

    def _pad(self, role: str, pairs: list[TokenizedPair]) -> TokenSide:
        return pad_side(pairs, self.tokenizers[role].pad_token_id)

    def __call__(self, examples: Sequence[Example]) -> DistillBatch:
        pairs = {role: self._tokenize(role, examples) for role in self.tokenizers}
        sides = {role: self._pad(role, role_pairs) for role, role_pairs in pairs.items()}
        aligned = None
        if self.alignment is not None:
            rows = [
                answer_alignment(s, t, self.alignment, self.tokenizers, self.vocab_map)
                for s, t in zip(pairs["student"], pairs["teacher"], strict=True)
            ]
            aligned = pad_positions(rows, sides["student"].labels.shape[1])
        char_aligned = None
        if self.char_alignment:
            char_aligned = _char_aligned(pairs, sides)
        return DistillBatch(
            ids=[example.id for example in examples],
            is_cot_B=torch.tensor([e.is_cot for e in examples], dtype=torch.bool),
            student=sides["student"],
            teacher=sides.get("teacher"),
            aligned_teacher_pos_BS=aligned,
            standard=self._standard_views(examples) if self.cot_views else None,
            char_aligned_BKJ=char_aligned,
        )

    def _standard_views(self, examples: Sequence[Example]) -> StandardViews:
        cot_rows = [index for index, example in enumerate(examples) if example.is_cot]
        views = [examples[i] for i in cot_rows]
        valid = [True] * len(cot_rows)
        sides = {}
        for role in self.tokenizers:
            if cot_rows:
                pairs = self._tokenize(role, views, standard_view=True)
            else:  # a masked stand-in row, so every rank runs the same forward passes
                pairs = self._tokenize(role, examples[:1])
            sides[role] = self._pad(role, pairs)
        if not cot_rows:
            cot_rows, valid = [0], [False]
        return StandardViews(
            student=sides["student"],
            teacher=sides.get("teacher"),
            rows_C=torch.tensor(cot_rows, dtype=torch.long),
            valid_C=torch.tensor(valid, dtype=torch.bool),
        )
