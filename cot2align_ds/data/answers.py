"""The final answer in a generated or written solution, and numbers compared by value.

Shared by evaluation (exact match) and CoT augmentation (keeping rationales whose answer agrees
with the gold one).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# The core of COT_ANSWER_JOINER ("\nTherefore, the answer is: "), matched case-insensitively with
# an optional colon, so "The answer is 42" from a model that drifted from the exact joiner counts.
_ANSWER_PHRASE = re.compile(r"the answer is\s*:?", re.IGNORECASE)
# A number: optional sign (only when not glued to a preceding word/digit, so "3-5" is 3 and 5),
# optional "$", then either comma-grouped thousands ("1,234,567") or plain digits, optional
# decimals. The thousands branch must end at a non-digit so "1,2345" is not read as "1,234".
_NUMBER = re.compile(
    r"(?:(?<![\w.])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"|(?:(?<![\w.])-)?\$?\.\d+"
)


def parse_number(text: str) -> Decimal | None:
    """The numeric value of ``text`` if the whole (stripped) string is one number, else None.

    Tolerates "$", thousands commas, a trailing "%" or period: "$1,234.50." -> 1234.50.
    """
    cleaned = text.strip().rstrip(".").rstrip("%").strip()
    match = _NUMBER.fullmatch(cleaned)
    if match is None:
        return None
    try:
        value = Decimal(re.sub(r"[\s$,]", "", match.group()))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def canonical_number(value: Decimal) -> str:
    """One spelling per value: "3.50" -> "3.5", "4.0" -> "4", "-0" -> "0"."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _find_number(text: str, *, last: bool) -> str | None:
    """The first (or last) number in ``text``, canonical, or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    value = parse_number(matches[-1] if last else matches[0])
    return None if value is None else canonical_number(value)


def extract_answer(text: str) -> str:
    """The final answer in a generation.

    After the last "the answer is:" phrase: the first number there ("42 apples." -> "42"), else
    that text up to the end of its line without trailing period ("yes." -> "yes"). Without the
    phrase: the last number in the text, else the whole stripped text. Numbers come back in
    canonical form ("1,234" -> "1234", "3.50" -> "3.5", "$12" -> "12").
    """
    matches = list(_ANSWER_PHRASE.finditer(text))
    if matches:
        tail = text[matches[-1].end() :].strip()
        number = _find_number(tail, last=False)
        if number is not None:
            return number
        return tail.split("\n", 1)[0].strip().rstrip(".").strip()
    number = _find_number(text, last=True)
    return number if number is not None else text.strip()
