"""Prompt templates: the standard (Alpaca-style, as used by DSKD/MiniLLM) and CoT prompts.

Two families: ``alpaca`` (the paper's prompts) and ``compact`` (short prompts for tiny models in
the demo and tests, where the Alpaca preamble would dominate sequence length). Each family has a
standard prompt with and without the input section, and a CoT prompt whose answer starts with
"Let's think step by step.". The CoT answer is ``rationale + COT_ANSWER_JOINER + gold``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cot2align_ds.data.records import Record

COT_TRIGGER = "Let's think step by step.\n"
COT_ANSWER_JOINER = "\nTherefore, the answer is: "


@dataclass(frozen=True)
class TemplateFamily:
    with_input: str
    without_input: str
    cot: str


_ALPACA_HEAD = "Below is an instruction that describes a task"
TEMPLATES: dict[str, TemplateFamily] = {
    "alpaca": TemplateFamily(
        with_input=(
            f"{_ALPACA_HEAD}, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            f"{_ALPACA_HEAD}. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
        cot=(
            f"{_ALPACA_HEAD}, paired with an input that provides further context. "
            "Write a response with reasoning step by step that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
            "### Response:\n" + COT_TRIGGER
        ),
    ),
    "compact": TemplateFamily(
        with_input="Task: {instruction}\nInput: {input}\nAnswer: ",
        without_input="Task: {instruction}\nAnswer: ",
        cot="Task: {instruction}\nInput: {input}\nReason step by step.\nAnswer: " + COT_TRIGGER,
    ),
}


def get_template(name: str) -> TemplateFamily:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template '{name}'; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def standard_prompt(record: Record, template: str = "alpaca") -> str:
    family = get_template(template)
    if record.input.strip():
        return family.with_input.format(instruction=record.instruction, input=record.input)
    return family.without_input.format(instruction=record.instruction)


def cot_prompt(record: Record, template: str = "alpaca") -> str:
    family = get_template(template)
    return family.cot.format(instruction=record.instruction, input=record.input)


def cot_answer(rationale: str, gold: str) -> str:
    return rationale.strip() + COT_ANSWER_JOINER + gold
