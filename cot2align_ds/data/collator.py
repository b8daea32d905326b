"""Collate examples into a batch for both tokenizers; runs inside DataLoader workers.

Legend: B batch, S student positions, T teacher positions.

Each text is tokenized separately by each tokenizer: prompt (special tokens as the tokenizer
adds them, at most ``max_prompt_tokens``, cut from the left so the "Response:" marker next to
the answer survives, leading special tokens kept; evaluation cuts prompts the same way) then
answer + EOS (truncated so the total stays within ``max_total_tokens``). Labels are already
shifted: ``labels[t]`` is the target of the logits at position ``t`` and -100 where that target
is not an answer token, so "response positions" are simply ``labels != -100`` on every side.
Padding is on the right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cot2align_ds.data.examples import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedPair:
    input_ids: list[int]
    labels: list[int]


def truncate_prompt(ids: list[int], max_tokens: int, special_ids: set[int]) -> list[int]:
    """Keep the last ``max_tokens`` ids, but keep leading special tokens (BOS) in front."""
    if len(ids) <= max_tokens:
        return ids
    num_prefix = 0
    while num_prefix < max_tokens - 1 and ids[num_prefix] in special_ids:
        num_prefix += 1
    keep = max_tokens - num_prefix
    return ids[:num_prefix] + ids[len(ids) - keep :]


def tokenize_pair(
    tokenizer, prompt: str, answer: str, *, max_prompt_tokens: int, max_total_tokens: int
) -> TokenizedPair:
    prompt_ids = truncate_prompt(
        tokenizer(prompt, add_special_tokens=True)["input_ids"],
        max_prompt_tokens,
        set(tokenizer.all_special_ids),
    )
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    answer_ids = (answer_ids + [tokenizer.eos_token_id])[: max_total_tokens - len(prompt_ids)]
    input_ids = prompt_ids + answer_ids
    # Position t predicts token t+1: the last prompt position predicts the first answer token.
    labels = [IGNORE_INDEX] * (len(prompt_ids) - 1) + answer_ids + [IGNORE_INDEX]
    return TokenizedPair(input_ids, labels)


def pad_side(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized pairs into ``input_ids_BL``, ``attention_mask_BL``, ``labels_BL``."""
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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class DistillCollator:
    """Picklable callable: list of ``Example`` -> nested dict of tensors.

    Keys: ``student`` / ``teacher`` (main view: CoT view for CoT examples, standard otherwise),
    ``is_cot_B``, and for CoT examples only, their standard views ``student_standard`` /
    ``teacher_standard`` (C rows, C = number of CoT examples, possibly 0).
    """

    def __init__(
        self,
        student_tokenizer,
        teacher_tokenizer=None,
        *,
        max_prompt_tokens: int,
        max_total_tokens: int,
    ) -> None:
        self.tokenizers = {"student": student_tokenizer}
        if teacher_tokenizer is not None:
            self.tokenizers["teacher"] = teacher_tokenizer
        self.limits = {"max_prompt_tokens": max_prompt_tokens, "max_total_tokens": max_total_tokens}

    def _side(self, tokenizer, texts: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        pairs = [tokenize_pair(tokenizer, p, a, **self.limits) for p, a in texts]
        return pad_side(pairs, tokenizer.pad_token_id)

    def __call__(self, examples: Sequence[Example]) -> dict:
        main = [(example.prompt, example.answer) for example in examples]
        standard = [
            (example.standard_prompt or "", example.standard_answer or "")
            for example in examples
            if example.is_cot
        ]
        batch: dict = {"is_cot_B": torch.tensor([e.is_cot for e in examples], dtype=torch.bool)}
        batch["ids"] = [example.id for example in examples]
        for role, tokenizer in self.tokenizers.items():
            batch[role] = self._side(tokenizer, main)
            batch[f"{role}_standard"] = self._side(tokenizer, standard)
        return batch
