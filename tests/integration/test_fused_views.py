"""CoT2Align's cross-view forwards: one call per model for both views (the default), or two
student calls with no LM head on the standard view, give the objective the same numbers as one
full call per view; the fused student keeps ZeRO-3's module trace valid across steps."""

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
    trainer.config.cot2align.fuse_student_views = fuse
    if full_heads:  # the peer: every view's forward computes all its logits
        student, teacher = trainer._forward_student, trainer._forward_teacher
        trainer._forward_student = lambda ids, mask, only_hidden=False: student(ids, mask)
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
    headless, headless_loss, _ = _loss(trainer, batch, fuse=False, full_heads=False)

    # Unfused, the student's standard view's logits were not computed past the last position.
    standard = batch.standard
    rows, length = standard.student.input_ids.shape
    assert headless.student_standard.logits.shape[:2] == (rows, 1)
    assert apart.student_standard.logits.shape[1] == length
    torch.testing.assert_close(headless_loss, apart_loss, atol=1e-5, rtol=1e-5)
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


def _student_trace_complete(trainer, steps: int) -> bool:
    """Whether the student engine's ZeRO-3 prefetch trace is complete after ``steps`` optimizer
    steps: a trace invalidated in a step is re-recorded in the next one, never complete."""
    batches = (batch for batch in trainer.loader if bool(batch.standard.valid_C.any()))
    for _ in range(steps):
        trainer.train_step([next(batches)])
    coordinator = trainer.student_engine.optimizer.parameter_offload.get_param_coordinator()
    return coordinator.is_complete_trace()


@pytest.mark.parametrize("fuse", [True, False])
def test_the_fused_zero3_student_keeps_its_prefetch_trace(workspace, tmp_path, fuse):
    """DSKD-CMA + CoT2Align on a rotary student: one student call per micro-batch and the
    query embeddings read from hidden_states[0] leave ZeRO-3 the same module order every step.
    Two calls (the peer) change it and the trace is dropped every step."""
    from support import TEACHER_ARCH

    from cot2align_ds.engine import deepspeed_engines as dse
    from cot2align_ds.train.loop import Trainer

    config = tiny_run_config(
        workspace,
        tmp_path / "run",
        student={"architecture": TEACHER_ARCH, "tokenizer": str(workspace["student_tok"])},
        distill={"method": "dskd_cma", "kd_rate": 0.5, "temperature": 1.0},
        cot2align={"enabled": True, "num_iters": 20, "fuse_student_views": fuse},
    )
    config["data"]["cot_records"] = "all"
    (tmp_path / "run").mkdir()
    trainer = Trainer(validate_config(config), tmp_path / "run", dse.init_distributed(60), None)
    assert trainer.access.student_embeddings_in_hidden
    assert trainer.student_engine.zero_optimization_stage() == 3
    assert _student_trace_complete(trainer, steps=4) is fuse
