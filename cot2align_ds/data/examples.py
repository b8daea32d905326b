"""Turn records into training examples (prompt/answer text pairs), standard and CoT views.

Every record yields its standard example. A record with a rationale also yields a CoT example
(CoT prompt -> rationale + "Therefore, the answer is: " + gold) when the selection allows it:
``non_empty_input`` follows the reference code, ``all`` uses every record with a rationale.
A CoT example carries its record's standard view too, so the CoT2Align cross terms can pair
them inside one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cot2align_ds.data.records import Record
from cot2align_ds.data.templates import CHAT, cot_answer, cot_prompt, standard_prompt

CotSelection = Literal["none", "non_empty_input", "all"]


@dataclass(frozen=True)
class Example:
    """Prompt and answer texts. With the ``chat`` template the prompts depend on the tokenizer
    (each model's own chat template): ``chat`` then holds the record, and ``prompt_for``
    renders its prompts per tokenizer."""

    id: str
    prompt: str
    answer: str
    standard_prompt: str | None = None
    standard_answer: str | None = None
    chat: Record | None = None

    @property
    def is_cot(self) -> bool:
        return self.standard_prompt is not None

    def prompt_for(self, tokenizer, *, standard_view: bool = False) -> str:
        """The main view's prompt (``standard_view``: the standard view's) for ``tokenizer``."""
        if self.chat is None:
            return self.standard_prompt if standard_view else self.prompt
        if self.is_cot and not standard_view:
            return cot_prompt(self.chat, CHAT, tokenizer)
        return standard_prompt(self.chat, CHAT, tokenizer)


def _wants_cot(record: Record, selection: CotSelection) -> bool:
    if selection == "none" or not (record.rationale or "").strip():
        return False
    return selection == "all" or bool(record.input.strip())


def make_examples(
    records: list[Record], *, template: str, cot_records: CotSelection = "none"
) -> list[Example]:
    examples = []
    chat = template == CHAT
    for record in records:
        record_if_chat = record if chat else None
        prompt = "" if chat else standard_prompt(record, template)
        examples.append(Example(record.id, prompt, record.output, chat=record_if_chat))
        if _wants_cot(record, cot_records):
            examples.append(
                Example(
                    f"{record.id}#cot",
                    "" if chat else cot_prompt(record, template),
                    cot_answer(record.rationale or "", record.output),
                    standard_prompt=prompt,
                    standard_answer=record.output,
                    chat=record_if_chat,
                )
            )
    return examples
