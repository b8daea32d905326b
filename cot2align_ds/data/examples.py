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
from cot2align_ds.data.templates import cot_answer, cot_prompt, standard_prompt

CotSelection = Literal["none", "non_empty_input", "all"]


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    answer: str
    standard_prompt: str | None = None
    standard_answer: str | None = None

    @property
    def is_cot(self) -> bool:
        return self.standard_prompt is not None


def _wants_cot(record: Record, selection: CotSelection) -> bool:
    if selection == "none" or not (record.rationale or "").strip():
        return False
    return selection == "all" or bool(record.input.strip())


def make_examples(
    records: list[Record], *, template: str, cot_records: CotSelection = "none"
) -> list[Example]:
    examples = []
    for record in records:
        prompt = standard_prompt(record, template)
        examples.append(Example(record.id, prompt, record.output))
        if _wants_cot(record, cot_records):
            examples.append(
                Example(
                    f"{record.id}#cot",
                    cot_prompt(record, template),
                    cot_answer(record.rationale or "", record.output),
                    standard_prompt=prompt,
                    standard_answer=record.output,
                )
            )
    return examples
