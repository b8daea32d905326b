"""Every loss takes bf16 inputs (what a bf16 run's models produce) and accumulates in fp32: its
sum is fp32 and equals the same loss on the bf16 values upcast to fp32 first."""

from __future__ import annotations

import pytest
import torch

from cot2align_ds.losses.cross_entropy import cross_entropy_loss
from cot2align_ds.losses.divergences import kd_divergence
from cot2align_ds.losses.mined import mined_loss
from cot2align_ds.losses.ot.loss import ot_loss
from cot2align_ds.losses.uld import uld_loss

B, S, T, V, W, D = 2, 7, 9, 50, 70, 16


def _inputs():
    generator = torch.Generator().manual_seed(0)
    labels_BS = torch.randint(0, V, (B, S), generator=generator)
    labels_BS[:, :2] = -100
    labels_BT = torch.randint(0, W, (B, T), generator=generator)
    labels_BT[:, :3] = -100
    return {
        "student_BSV": 3 * torch.randn(B, S, V, generator=generator),
        "teacher_BSV": 3 * torch.randn(B, S, V, generator=generator),
        "teacher_BTW": 3 * torch.randn(B, T, W, generator=generator),
        "student_hidden_BSD": torch.randn(B, S, D, generator=generator),
        "teacher_hidden_BTD": torch.randn(B, T, D, generator=generator),
        "labels_BS": labels_BS,
        "labels_BT": labels_BT,
        "aligned_BS": torch.randint(0, T, (B, S), generator=generator),
        "vocab_map_W": torch.randint(-1, V, (W,), generator=generator),
    }


LOSSES = {
    "ce": lambda x: cross_entropy_loss(x["student_BSV"], x["labels_BS"]).sum,
    "kd": lambda x: (
        kd_divergence(
            x["student_BSV"], x["teacher_BSV"], x["labels_BS"] != -100, temperature=2.0
        ).sum
    ),
    "uld": lambda x: (
        uld_loss(
            x["student_BSV"], x["teacher_BTW"], x["labels_BS"], x["labels_BT"], temperature=1.0
        ).sum
    ),
    "mined": lambda x: (
        mined_loss(
            x["student_BSV"], x["teacher_BTW"], x["labels_BS"], x["aligned_BS"], x["vocab_map_W"]
        ).sum
    ),
    "ot": lambda x: ot_loss(
        x["student_hidden_BSD"],
        x["teacher_hidden_BTD"],
        x["labels_BS"] != -100,
        x["labels_BT"] != -100,
        num_iters=20,
    )[0],
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_inputs_accumulate_in_fp32(name):
    inputs = _inputs()
    floats = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    upcast = {k: v.float() if v.is_floating_point() else v for k, v in floats.items()}
    low, reference = LOSSES[name](floats), LOSSES[name](upcast)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    # Same values in, so only the order of fp32 sums may differ.
    torch.testing.assert_close(low, reference, rtol=1e-5, atol=1e-5)
