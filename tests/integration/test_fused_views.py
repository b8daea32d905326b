"""CoT2Align's cross-view forwards: one teacher call for both views, and no LM head on the
standard views, give the objective the same numbers as one full call per view."""

from __future__ import annotations

import pytest
import torch
from support import tiny_run_config

from cot2align_ds.config import validate_config
from cot2align_ds.methods import NORMALISERS


def _trainer(workspace, tmp_path, method):
    from cot2align_ds.engine import deepspeed_engines as dse
    from cot2align_ds.train.loop import Trainer

    config = tiny_run_config(
        workspace,
        tmp_path / "run",
        distill={"method": method, "kd_rate": 0.5, "temperature": 1.0},
        cot2align={"enabled": True, "num_iters": 20},
    )
    config["data"]["cot_records"] = "all"
    (tmp_path / "run").mkdir()
    return Trainer(validate_config(config), tmp_path / "run", dse.init_distributed(60), None)


def _loss(trainer, batch, fuse: bool, full_heads: bool):
    trainer.config.cot2align.fuse_teacher_views = fuse
    if full_heads:  # the peer: every view's forward computes all its logits
        student, teacher = trainer._forward_student, trainer._forward_teacher
        trainer._forward_student = lambda side, only_hidden=False: student(side)
        trainer._forward_teacher = lambda ids, mask, only_hidden=False: teacher(ids, mask)
    try:
        with torch.no_grad():
            outputs = trainer._forward_all(batch)
            counts = {key: torch.tensor(1.0) for key in NORMALISERS}
            loss = trainer.objective(
                batch, outputs, trainer.student_engine.module.projectors, trainer.access, counts
            )
    finally:
        vars(trainer).pop("_forward_student", None)
        vars(trainer).pop("_forward_teacher", None)
    return outputs, loss.total, loss.terms


@pytest.mark.parametrize("method", ["uld", "dskd_cma"])
def test_fused_teacher_and_headless_standard_views_match_separate_full_forwards(
    workspace, tmp_path, method
):
    trainer = _trainer(workspace, tmp_path, method)
    batch = next(batch for batch in trainer.loader if bool(batch.standard.valid_C.any()))
    trainer.student_engine.eval()  # dropout off: both passes see the same function
    fused, fused_loss, fused_values = _loss(trainer, batch, fuse=True, full_heads=False)
    apart, apart_loss, apart_values = _loss(trainer, batch, fuse=False, full_heads=True)

    # The standard views' logits were not computed past the last position.
    standard = batch.standard
    rows, length = standard.student.input_ids.shape
    assert fused.student_standard.logits.shape[:2] == (rows, 1)
    assert apart.student_standard.logits.shape[1] == length
    sides = {
        "teacher": batch.teacher,
        "teacher_standard": standard.teacher,
        "student": batch.student,
        "student_standard": standard.student,
    }
    # Every real position of every view sees the same hidden states and teacher logits.
    for key, side in sides.items():
        mask = side.attention_mask.bool()
        got_states, want_states = (
            getattr(fused, key).hidden_states,
            getattr(apart, key).hidden_states,
        )
        for got, want in zip(got_states, want_states, strict=True):
            assert got.shape == want.shape, key
            torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-4)
    for key in ("teacher", "teacher_standard"):
        mask = sides[key].attention_mask.bool()
        got, want = getattr(fused, key).logits, getattr(apart, key).logits
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-4)
    assert set(fused_values) == set(apart_values)
    assert any(name.startswith("ot_cross") for name in fused_values)
    torch.testing.assert_close(fused_loss, apart_loss, atol=1e-5, rtol=1e-5)
    for name, value in fused_values.items():
        torch.testing.assert_close(value, apart_values[name], atol=1e-5, rtol=1e-4, msg=name)
