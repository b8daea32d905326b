"""The method registry is the one place that says what a method needs: config validation, the
objective and the planner read it and agree with it."""

from __future__ import annotations

import typing

import pytest

from cot2align_ds.config import DistillConfig, validate_config
from cot2align_ds.methods import METHODS, NORMALISERS, OT_TERMS, projector_params
from cot2align_ds.train.objective import Objective


def test_config_accepts_exactly_the_registered_methods():
    field = DistillConfig.model_fields["method"].annotation
    assert typing.get_args(field) == tuple(METHODS)


def test_every_term_has_a_known_normaliser():
    for method in METHODS.values():
        assert {norm for _, norm in method.kd_terms} <= set(NORMALISERS), method.name
    assert {norm for _, norm in OT_TERMS} <= set(NORMALISERS)


def _config(method: str, cot2align: bool):
    teacher = {"name_or_path": "t"} if METHODS[method].needs_teacher else None
    return validate_config(
        {
            "student": {"name_or_path": "s"},
            "teacher": teacher,
            "distill": {"method": method},
            "cot2align": {"enabled": cot2align, "cross_cot": False},
        }
    )


CASES = [
    (name, cot2align)
    for name, method in METHODS.items()
    for cot2align in (False, True)
    if method.needs_teacher or not cot2align  # CoT2Align needs a teacher
]


@pytest.mark.parametrize(("method", "cot2align"), CASES)
def test_the_objective_builds_what_the_registry_lists(method, cot2align):
    run = _config(method, cot2align)
    objective = Objective(run.distill, run.cot2align, teacher_to_student_vocab_W=_vocab_map())
    projectors = objective.build_projectors(16, 24)
    assert projector_params(method, cot2align, 16, 24) == sum(
        p.numel() for p in projectors.parameters()
    )
    names = [term.name for term in objective.terms]
    expected = ["ce", *(name for name, _ in METHODS[method].kd_terms)]
    assert names == expected + (["ot_main"] if cot2align else [])
    assert objective.needs_hidden_states == (cot2align or METHODS[method].reads_hidden_states)
    assert (objective.alignment is not None) == METHODS[method].token_alignment


def test_a_method_without_a_teacher_is_refused_with_cot2align():
    with pytest.raises(Exception, match="cot2align.enabled needs a base KD method"):
        _config("sft", True)


def _vocab_map():
    import torch

    return torch.zeros(4, dtype=torch.long)


def test_dskd_terms_are_all_per_student_token_as_in_the_reference():
    for name in ("dskd", "dskd_cma"):
        assert {norm for _, norm in METHODS[name].kd_terms} == {"student_tokens"}


def test_uld_runs_at_its_own_temperature_not_the_kl_one(monkeypatch):
    """The reference applies ULD's softmax without temperature: ``distill.temperature`` (2.0 in
    the paper recipes) is for the KL-type divergences only."""
    import torch

    from cot2align_ds.data.batch import DistillBatch, TokenSide
    from cot2align_ds.train import objective as objective_module

    seen = {}

    real_uld_loss = objective_module.uld_loss

    def spy(*args, temperature, **kwargs):
        seen["temperature"] = temperature
        return real_uld_loss(*args, temperature=temperature, **kwargs)

    monkeypatch.setattr(objective_module, "uld_loss", spy)
    run = validate_config(
        {
            "student": {"name_or_path": "s"},
            "teacher": {"name_or_path": "t"},
            "distill": {"method": "uld", "temperature": 2.0},
        }
    )
    assert run.distill.uld_temperature == 1.0
    objective = Objective(run.distill, run.cot2align)
    labels = torch.tensor([[-100, 3, 4, -100]])
    side = TokenSide(
        torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), labels,
        torch.tensor([[1, 2]]), torch.tensor([[True, True]]),
    )  # fmt: skip
    batch = DistillBatch(["r"], torch.tensor([False]), side, side)
    outputs = objective_module.StepOutputs(
        objective_module.ModelOutputs(torch.randn(1, 4, 7)),
        objective_module.ModelOutputs(torch.randn(1, 4, 9)),
    )
    objective._kd_sums(batch, outputs, None, None)
    assert seen["temperature"] == 1.0
