"""Prompt templates: the standard (Alpaca-style, as used by DSKD/MiniLLM) and CoT prompts.

Two text families: ``alpaca`` (the paper's prompts) and ``compact`` (short prompts for tiny
models in the demo and tests, where the Alpaca preamble would dominate sequence length). Each
family has a standard prompt with and without the input section, and a CoT prompt whose answer
starts with "Let's think step by step.". The CoT answer is ``rationale + COT_ANSWER_JOINER +
gold``.

``chat``: each model's own chat template (``tokenizer.apply_chat_template``), so the teacher and
the student each see the conversation the way they were tuned on it; the prompts then differ
between the two tokenizers while the answer text is the same. The conversation is the record's
``messages`` (or one user turn made of instruction and input); the CoT view adds a request for
step-by-step reasoning to the last user turn and starts the assistant's turn with the CoT
trigger. The answer ends with the template's end-of-turn token(s) rather than EOS
(``chat_end_text``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cot2align_ds.data.records import Record
from cot2align_ds.errors import UserError

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


CHAT = "chat"
TEMPLATE_NAMES = (*TEMPLATES, CHAT)
COT_REQUEST = "Answer with reasoning, step by step."


class ChatTemplateError(UserError):
    """A tokenizer without a chat template was asked to render a chat prompt."""


def get_template(name: str) -> TemplateFamily:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template '{name}'; choose one of {sorted(TEMPLATE_NAMES)}")
    return TEMPLATES[name]


def standard_prompt(record: Record, template: str = "alpaca", tokenizer=None) -> str:
    """The standard prompt; with ``template="chat"``, rendered by ``tokenizer``'s template."""
    if template == CHAT:
        return render_chat(tokenizer, chat_messages(record))
    family = get_template(template)
    if record.input.strip():
        return family.with_input.format(instruction=record.instruction, input=record.input)
    return family.without_input.format(instruction=record.instruction)


def cot_prompt(record: Record, template: str = "alpaca", tokenizer=None) -> str:
    """The CoT prompt; with ``template="chat"``, rendered by ``tokenizer``'s template."""
    if template == CHAT:
        return render_chat(tokenizer, chat_messages(record, cot=True)) + COT_TRIGGER
    family = get_template(template)
    return family.cot.format(instruction=record.instruction, input=record.input)


def chat_messages(record: Record, *, cot: bool = False) -> list[dict[str, str]]:
    """The conversation before the answer: the record's ``messages``, or one user turn."""
    if record.messages:
        messages = [dict(message) for message in record.messages]
    else:
        text = record.instruction
        if record.input.strip():
            text = f"{text}\n\n{record.input}"
        messages = [{"role": "user", "content": text}]
    if cot:
        last = max(i for i, message in enumerate(messages) if message["role"] == "user")
        messages[last] = {
            **messages[last],
            "content": f"{messages[last]['content']}\n\n{COT_REQUEST}",
        }
    return messages


def require_chat_template(tokenizer) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
        raise ChatTemplateError(
            f"data.template=chat but {name} has no chat template; use alpaca or compact"
        )


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The conversation as the model's chat template writes it, ending where the assistant's
    answer starts."""
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def cot_answer(rationale: str, gold: str) -> str:
    return rationale.strip() + COT_ANSWER_JOINER + gold
