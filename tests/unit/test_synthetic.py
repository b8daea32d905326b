"""The synthetic arithmetic task: rationales that compute the answer, and its knobs."""

import re

from cot2align_ds.data.synthetic import INSTRUCTION, ArithmeticTaskSpec, make_split


def _equations(rationale: str) -> list[tuple[int, str, int, int]]:
    return [
        (int(a), op, int(b), int(c))
        for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", rationale)
    ]


def test_each_rationale_chains_one_equation_per_step_to_the_answer():
    spec = ArithmeticTaskSpec(num_steps=3, max_start=9, max_operand=2)
    for record in make_split(200, spec, seed=5, prefix="p"):
        equations = _equations(record.rationale)
        assert len(equations) == 3
        for (a, op, b, c), following in zip(equations, [*equations[1:], None], strict=True):
            assert 1 <= b <= 2
            assert c == (a + b if op == "+" else a - b) and c >= 0
            if following is not None:
                assert following[0] == c  # each step starts from the last result
        assert record.output == str(equations[-1][3])
        assert int(re.search(r"has (\d+)", record.input).group(1)) == equations[0][0] <= 9


def test_the_instruction_is_a_knob_and_splits_are_reproducible():
    short = ArithmeticTaskSpec(num_steps=2, instruction="Solve.")
    records = make_split(5, short, seed=3, prefix="s")
    assert {record.instruction for record in records} == {"Solve."}
    assert make_split(5, ArithmeticTaskSpec(num_steps=2), seed=3, prefix="s")[0].instruction == (
        INSTRUCTION
    )
    again = make_split(5, short, seed=3, prefix="s")
    assert [r.model_dump() for r in records] == [r.model_dump() for r in again]
    # The instruction is not drawn from the generator: the problems are the same with either.
    assert [r.input for r in records] == [
        r.input for r in make_split(5, ArithmeticTaskSpec(num_steps=2), seed=3, prefix="s")
    ]
