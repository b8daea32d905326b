"""Unit-test fixtures: two genuinely different tokenizers trained once per session.

The teacher is a byte-level BPE ("Ġ" spaces, one ``<|endoftext|>`` special), the student a
Unigram with Metaspace ("▁" spaces, ``<pad> <unk> <s> </s>``, a lone "▁" token whose offset
overlaps the next token): the differences real teacher/student pairs have.
"""

from __future__ import annotations

import pytest

from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split


def record_texts(num_examples: int, seed: int, num_steps: int = 2) -> list[str]:
    """Prompt-and-answer-like texts of synthetic arithmetic problems."""
    records = make_split(num_examples, ArithmeticTaskSpec(num_steps=num_steps), seed, "toy")
    return [
        f"{record.instruction}\n{record.input}\n{record.rationale}\n"
        f"Therefore, the answer is: {record.output}"
        for record in records
    ]


@pytest.fixture(scope="session")
def toy_texts() -> list[str]:
    """The corpus the toy tokenizers are trained on."""
    return record_texts(200, seed=0)


@pytest.fixture(scope="session")
def alignment_texts() -> list[str]:
    """Texts the tokenizers were not trained on, plus edge cases: leading and repeated spaces,
    characters the Unigram maps to <unk> and byte-level splits into several tokens, tabs,
    no-break spaces, whitespace only, empty."""
    return record_texts(40, seed=7, num_steps=3) + [
        "  Mia has 12 apples.\n\nThen  she sells 3.",
        "Xyz (Mia) 3-4=7 é 😀 über",
        "\tTom\u00a0finds 5 shells.  ",
        "    ",
        "Ava",
        "",
    ]


@pytest.fixture(scope="session")
def toy_teacher_tokenizer(toy_texts):
    from cot2align_ds.models.toy_tokenizers import train_byte_bpe

    return train_byte_bpe(toy_texts, vocab_size=512)


@pytest.fixture(scope="session")
def toy_student_tokenizer(toy_texts):
    from cot2align_ds.models.toy_tokenizers import train_unigram

    return train_unigram(toy_texts, vocab_size=400)


@pytest.fixture
def solver_backend():
    """``solver_backend(cpu_arrays="numpy")``: the OT solver's backend for the rest of the test
    (nested calls change further fields; all are undone at teardown)."""
    import contextlib

    from cot2align_ds.losses.ot.backend import use_backend

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(use_backend(**changes))
