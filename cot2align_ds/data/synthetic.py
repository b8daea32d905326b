"""Synthetic multi-step arithmetic word problems with gold step-by-step rationales.

The task family behind the embedded demo and the small reasoning benchmark: each problem chains
``num_steps`` additions/subtractions on a running quantity, so the final number needs every
intermediate result, and a written rationale (one equation per step) makes it learnable by a
tiny model. ``num_steps`` is the difficulty knob; an out-of-distribution split uses more steps
than training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cot2align_ds.data.records import Record

_NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Amy", "Ben", "Kim"]
_ITEMS = ["apples", "pens", "coins", "books", "cards", "stones", "shells", "cups"]
_GAIN = ["buys {n} more {item}", "finds {n} {item}", "gets {n} {item} from a friend"]
_LOSS = ["gives away {n} {item}", "loses {n} {item}", "sells {n} {item}"]
INSTRUCTION = "Solve the word problem and give the final number."


@dataclass(frozen=True)
class ArithmeticTaskSpec:
    """Difficulty knobs of the task family."""

    num_steps: int = 2
    max_start: int = 20
    max_operand: int = 9
    instruction: str = INSTRUCTION


def make_problem(rng: random.Random, spec: ArithmeticTaskSpec, example_id: str) -> Record:
    """One problem: start quantity, ``spec.num_steps`` gains/losses, never below zero."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(1, spec.max_start)
    sentences = [f"{name} has {value} {item}."]
    steps = [f"{name} starts with {value} {item}."]
    for step_index in range(spec.num_steps):
        operand = rng.randint(1, spec.max_operand)
        gain = value < operand or rng.random() < 0.5
        phrase = rng.choice(_GAIN if gain else _LOSS).format(n=operand, item=item)
        lead = "Then" if step_index else "First"
        sentences.append(f"{lead} {name} {phrase}.")
        new_value = value + operand if gain else value - operand
        steps.append(f"{value} {'+' if gain else '-'} {operand} = {new_value}.")
        value = new_value
    sentences.append(f"How many {item} does {name} have now?")
    return Record(
        id=example_id,
        instruction=spec.instruction,
        input=" ".join(sentences),
        output=str(value),
        rationale=" ".join(steps),
    )


def make_split(num_examples: int, spec: ArithmeticTaskSpec, seed: int, prefix: str) -> list[Record]:
    """A reproducible list of problems; ids are ``{prefix}-{index}``."""
    rng = random.Random(seed)
    return [make_problem(rng, spec, f"{prefix}-{index}") for index in range(num_examples)]
