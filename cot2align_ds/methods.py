"""The method registry: per distillation method, what it reads, builds and adds to the loss.

Config validation, the objective, the planner, the demo and the report tables all read this one
table, so adding a method means one entry here and its loss function (wired into
``train/objective.py``). The method itself is described in ``docs/method.md``.

A term is (name, normaliser): the loss sum is divided by that count taken over the whole
accumulation window and all ranks. Normalisers: ``student_tokens`` (student response tokens,
CE's denominator, which the reference code uses for every per-token term), ``records`` (rows of
the micro-batch), ``cot_records`` (rows with a CoT view).
"""

from __future__ import annotations

from dataclasses import dataclass

NORMALISERS = ("student_tokens", "records", "cot_records")


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # as tables and logs print it
    # fp32 vocabulary-sized intermediates alive at the loss's peak (forward + backward), per
    # response row, for (student vocab V, teacher vocab W); read off the loss implementations and
    # used by the planner. CE keeps a log-softmax and its gradient; KL-type KD adds a tempered
    # log-softmax (student) and softmax (teacher); ULD adds sorted probabilities and int64 sort
    # indices (two fp32 copies); DSKD adds teacher-in-student-space and student-in-teacher-space
    # logits.
    logit_copies: tuple[int, int]
    kd_terms: tuple[tuple[str, str], ...] = ()  # (term, normaliser), each weighted by kd_rate
    needs_teacher: bool = True
    cross_tokenizer: bool = True  # False: student and teacher must share one vocabulary
    reads_hidden_states: bool = False  # the last hidden state, beyond the logits
    projectors: tuple[str, ...] = ()  # trainable projectors built beside the student
    token_alignment: bool = False  # the collator aligns response tokens one-to-one (MinED)


_DSKD_TERMS = (
    ("kd_t2s_ce", "student_tokens"),
    ("kd_t2s_kd", "student_tokens"),
    # All three per student response token, as the reference code divides them (the s2t term
    # sums over teacher positions but shares CE's denominator).
    ("kd_s2t_kd", "student_tokens"),
)

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("sft", "SFT", (2, 0), needs_teacher=False),
        Method(
            "vanilla_kd", "Vanilla KD", (4, 2), (("kd", "student_tokens"),), cross_tokenizer=False
        ),
        Method("uld", "ULD", (6, 4), (("kd_uld", "student_tokens"),)),
        Method("mined", "MinED", (5, 2), (("kd_mined", "student_tokens"),), token_alignment=True),
        Method(
            "dskd",
            "DSKD",
            (6, 3),
            _DSKD_TERMS,
            cross_tokenizer=False,
            reads_hidden_states=True,
            projectors=("t2s", "s2t"),
        ),
        Method(
            "dskd_cma",
            "DSKD-CMA",
            (6, 3),
            _DSKD_TERMS,
            reads_hidden_states=True,
            projectors=("t2s", "s2t", "query"),
        ),
    )
}
METHOD_NAMES = tuple(METHODS)

# CoT2Align's transport terms: the main views, then the two Cross-CoT pairings.
OT_TERMS = (
    ("ot_main", "records"),
    ("ot_cross_std_cot", "cot_records"),
    ("ot_cross_cot_std", "cot_records"),
)


def get_method(name: str) -> Method:
    return METHODS[name]


def needs_hidden_states(method: str, cot2align: bool) -> bool:
    """Whether the forward passes must return hidden states (OT reads them at layer pairs)."""
    return cot2align or METHODS[method].reads_hidden_states


def projector_shapes(
    method: str, cot2align: bool, student_hidden: int, teacher_hidden: int
) -> dict[str, tuple[int, int]]:
    """(in, out) features of each trainable projector (a ``nn.Linear`` with bias)."""
    d_s, d_t = student_hidden, teacher_hidden
    every = {"t2s": (d_t, d_s), "s2t": (d_s, d_t), "query": (2 * d_s, 2 * d_t)}
    shapes = {name: every[name] for name in METHODS[method].projectors}
    if cot2align:
        shapes["ot"] = (d_t, d_s)  # shared by every OT layer pair
    return shapes


def projector_params(method: str, cot2align: bool, student_hidden: int, teacher_hidden: int) -> int:
    """Weights + biases of the projectors ``projector_shapes`` lists."""
    shapes = projector_shapes(method, cot2align, student_hidden, teacher_hidden)
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in shapes.values())
