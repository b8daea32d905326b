"""Each distillation method, alone and with CoT2Align, runs through both ZeRO-3 engines at world
size 1 and lowers its loss, in fp32 and in bf16 (the precision users run); on the same first
batch and the same weights, bf16 loss terms stay within a stated tolerance of fp32 ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support import STUDENT_ARCH, tiny_run_config

from cot2align_ds.config import validate_config
from cot2align_ds.data.records import read_records, write_records

# (method, student tokenizer, extra sections): same-vocabulary methods share the teacher's.
CASES = {
    "vanilla_kd": ("vanilla_kd", "teacher_tok", {}),
    "dskd": ("dskd", "teacher_tok", {}),
    "uld": ("uld", "student_tok", {}),
    "mined": ("mined", "student_tok", {}),
    "mined_dp": ("mined", "student_tok", {"distill": {"mined_alignment": "dp"}}),
    "dskd_cma": ("dskd_cma", "student_tok", {}),
}
# Every method once more with CoT2Align.
CASES.update(
    {
        f"{name}+cot2align": (method, tokenizer, {**extra, "cot2align": {"enabled": True}})
        for name, (method, tokenizer, extra) in list(CASES.items())
        if name != "mined_dp"
    }
)
EXPECTED_TERMS = {
    "vanilla_kd": {"kd"},
    "dskd": {"kd_t2s_ce", "kd_t2s_kd", "kd_s2t_kd"},
    "uld": {"kd_uld"},
    "mined": {"kd_mined"},
    "dskd_cma": {"kd_t2s_ce", "kd_t2s_kd", "kd_s2t_kd"},
}


def _run(
    workspace, tmp_path, name, precision="fp32", max_steps=8, student=None, cot2align=None, **train
):
    from cot2align_ds.train.loop import run_train

    method, tokenizer, extra = CASES[name]
    student = student or {"architecture": STUDENT_ARCH}
    # Eight records, and an accumulation window that covers all of them: every optimizer step
    # sees the same data, so the logged loss is comparable from step to step.
    train_file = tmp_path / "train8.jsonl"
    write_records(train_file, read_records(workspace["train"])[:8])
    num_examples = 16 if "cot2align" in extra else 8
    config = tiny_run_config(
        workspace,
        tmp_path / name,
        distill={"method": method, "kd_rate": 0.5, "temperature": 1.0, **extra.get("distill", {})},
        train={
            "max_steps": max_steps,
            "micro_batch_size": 4,
            "grad_accum": num_examples // 4,
            "lr": 5e-3,
            "precision": precision,
            **train,
        },
    )
    config["student"] = {**student, "tokenizer": str(workspace[tokenizer])}
    config["data"]["train_file"] = str(train_file)
    if "cot2align" in extra:
        config["cot2align"] = {**extra["cot2align"], "num_iters": 20, **(cot2align or {})}
        config["data"]["cot_records"] = "non_empty_input"
    run_train(validate_config(config))
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_method_lowers_its_loss(workspace, tmp_path, name, precision):
    rows = _run(workspace, tmp_path, name, precision)
    assert all(math.isfinite(value) for row in rows for value in row.values()), rows
    losses = [row["loss/total"] for row in rows]
    assert len(losses) == 8
    assert losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    method = CASES[name][0]
    terms = {key.removeprefix("loss/") for key in rows[-1] if key.startswith("loss/")}
    assert EXPECTED_TERMS[method] <= terms
    if "cot2align" in name:
        assert {"ot_main", "ot_cross_std_cot", "ot_cross_cot_std"} <= terms
        # Every record of the tiny set has an input, so every record has a CoT view and the
        # cross terms are real transport costs, not masked zeros.
        assert rows[-1]["loss/ot_cross_std_cot"] > 0 and rows[-1]["loss/ot_cross_cot_std"] > 0
        assert "lr/projectors" in rows[-1]
        # OT plan diagnostics ride along at log steps; peak memory is always logged.
        assert 0 <= rows[-1]["ot/marginal_error"] < 1e-2 and rows[-1]["ot/plan_entropy"] > 0
        # At epsilon 10 on a [0, 1] cost the plan is close to uniform (normalised entropy ~1).
        assert 0.95 < rows[-1]["ot/plan_entropy_normalised"] <= 1.0 + 1e-6
        # Each layer pair's transport cost per record, for every view.
        for view in ("ot_main", "ot_cross_std_cot", "ot_cross_cot_std"):
            assert rows[-1][f"ot/{view}/layers_0_0"] > 0 and rows[-1][f"ot/{view}/layers_-1_-1"] > 0
    assert rows[-1]["mem/peak_host_rss_mb"] > 0


# bf16 keeps 8 significand bits (relative rounding 2**-9 per operation). With the losses
# accumulating in fp32, every term of every method moved by at most 0.25% of its value here
# (DSKD-CMA's gated t2s KD; CE and the totals by at most 0.13%); 1% leaves a 4x margin, and an
# absolute floor covers terms that start near zero.
BF16_RTOL, BF16_ATOL = 0.01, 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_first_batch_matches_fp32(workspace, tmp_path, name):
    """Same weights (a saved fp32 student, rounded once to bf16), same batch, one step."""
    method, tokenizer, _ = CASES[name]
    student = {"name_or_path": str(workspace[f"student_{tokenizer.removesuffix('_tok')}"])}
    fp32, bf16 = (
        _run(workspace, tmp_path / precision, name, precision, max_steps=1, student=student)[0]
        for precision in ("fp32", "bf16")
    )
    terms = sorted(key for key in fp32 if key.startswith("loss/"))
    assert terms == sorted(key for key in bf16 if key.startswith("loss/"))
    for key in terms:
        assert math.isfinite(bf16[key]), key
        assert abs(bf16[key] - fp32[key]) <= BF16_ATOL + BF16_RTOL * abs(fp32[key]), (
            key,
            fp32[key],
            bf16[key],
        )


# Per-step loss terms of three short runs, written down once from a known-good tree. Structural
# changes to the batch, the objective or the loop must leave them unchanged; the tolerance only
# absorbs float reordering between CPU kernels, not a changed computation.
PINNED_FILE = Path(__file__).resolve().parents[1] / "data" / "pinned_losses.json"
PINNED_CASES = ("dskd_cma+cot2align", "mined_dp", "uld+cot2align")


def pinned_rows(workspace, tmp_path, name: str) -> list[dict[str, float]]:
    # The values were written with one student call per view. One fused call computes the same
    # function (tests/integration/test_fused_views.py, dropout off) but draws other dropout
    # masks for the differently shaped batch, so the pins keep the two calls.
    rows = _run(workspace, tmp_path, name, max_steps=3, cot2align={"fuse_student_views": False})
    return [{k: v for k, v in row.items() if k.startswith(("loss/", "ot/"))} for row in rows]


@pytest.mark.parametrize("name", PINNED_CASES)
def test_per_step_losses_are_pinned(workspace, tmp_path, name):
    pinned = json.loads(PINNED_FILE.read_text())[name]
    rows = pinned_rows(workspace, tmp_path, name)
    # Every pinned term is still logged (new diagnostics may join them) with its pinned value.
    assert len(rows) == len(pinned)
    assert all(set(expected) <= set(row) for row, expected in zip(rows, pinned, strict=True))
    for step, (row, expected) in enumerate(zip(rows, pinned, strict=True), start=1):
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.parametrize("name", ["uld", "dskd_cma+cot2align"])
def test_gradient_checkpointing_trains_the_same_steps(workspace, tmp_path, name):
    """``train.gradient_checkpointing`` recomputes the student's activations in backward: the
    same per-step losses as keeping them (dropout included: the recompute replays its RNG)."""
    plain = _run(workspace, tmp_path / "plain", name, max_steps=3)
    recomputed = _run(
        workspace, tmp_path / "recomputed", name, max_steps=3, gradient_checkpointing=True
    )
    for keep, again in zip(plain, recomputed, strict=True):
        assert again["loss/total"] == pytest.approx(keep["loss/total"], rel=1e-5)


def test_gradient_checkpointing_is_on_in_the_student_engine(workspace, tmp_path):
    from cot2align_ds.engine import deepspeed_engines as dse
    from cot2align_ds.train.loop import Trainer

    config = tiny_run_config(workspace, tmp_path / "run", train={"gradient_checkpointing": True})
    (tmp_path / "run").mkdir()
    trainer = Trainer(validate_config(config), tmp_path / "run", dse.init_distributed(60), None)
    assert trainer.student_engine.module.student.is_activation_checkpointing
