"""The real-model demo's scoring: answers from the first line, agreement with the teacher."""

from __future__ import annotations

from cot2align_ds.experiments.real_demo import first_line, teacher_agreement


def test_first_line_drops_the_next_example_a_base_model_writes():
    assert first_line(" 2 coins\nInput: Ivy has 10 coins.") == "2 coins"
    assert first_line("7") == "7"


def test_teacher_agreement_compares_final_answers_as_numbers():
    teacher = {"a": "8", "b": "12", "c": "5", "d": ""}
    student = {"a": "8.0", "b": "13", "c": "5", "d": "4"}
    # "d": the teacher gave no answer, so it does not count; 2 of the other 3 agree.
    assert abs(teacher_agreement(student, teacher) - 200 / 3) < 1e-9
    assert teacher_agreement({}, {}) == 0.0
