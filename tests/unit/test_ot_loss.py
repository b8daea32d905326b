"""Tests for the OT loss between hidden-state sequences: costs, masking, gradient modes, groups.

Shape legend: B batch, S student positions, T teacher positions, D hidden size.
"""

from __future__ import annotations

import math

import ot
import pytest
import torch
from torch.testing import assert_close

from cot2align_ds.losses.ot.loss import cost_matrix, multi_pair_ot_loss, ot_loss

F64 = torch.float64


def _hidden(seed=0, dtype=F64, num_problems=3, num_student=6, num_teacher=8, hidden=16):
    generator = torch.Generator().manual_seed(seed)
    student_BSD = torch.randn(num_problems, num_student, hidden, generator=generator, dtype=dtype)
    teacher_BTD = torch.randn(num_problems, num_teacher, hidden, generator=generator, dtype=dtype)
    student_lengths = torch.tensor([num_student, 4, 2, 5, 3][:num_problems])
    teacher_lengths = torch.tensor([num_teacher, 3, 7, 2, 8][:num_problems])
    student_mask_BS = torch.arange(num_student)[None, :] < student_lengths[:, None]
    teacher_mask_BT = torch.arange(num_teacher)[None, :] < teacher_lengths[:, None]
    return student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT


def _naive_loss(student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT, kind, epsilon, iters):
    """Per-sample reference: prune to the real positions, cost by hand, POT's log Sinkhorn."""
    total = 0.0
    for b in range(student_BSD.shape[0]):
        x_SD = student_BSD[b][student_mask_BS[b]]
        y_TD = teacher_BTD[b][teacher_mask_BT[b]]
        if kind == "attention":
            cost_ST = 1 - torch.softmax(x_SD @ y_TD.T / math.sqrt(x_SD.shape[1]), dim=1)
        elif kind == "cosine":
            cost_ST = 1 - torch.nn.functional.cosine_similarity(x_SD[:, None], y_TD[None], dim=-1)
        else:
            cost_ST = torch.cdist(x_SD, y_TD)
        a = torch.full((len(x_SD),), 1 / len(x_SD), dtype=F64)
        b_weights = torch.full((len(y_TD),), 1 / len(y_TD), dtype=F64)
        plan_ST = ot.bregman.sinkhorn_log(
            a, b_weights, cost_ST, epsilon, numItermax=iters, stopThr=0.0, warn=False
        )
        total = total + (plan_ST * cost_ST).sum()
    return total


@pytest.mark.parametrize("kind", ["attention", "cosine", "euclidean"])
def test_loss_and_gradient_match_a_per_sample_reference(kind):
    student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT = _hidden(seed=1)
    epsilon = {"attention": 0.05, "cosine": 0.1, "euclidean": 1.0}[kind]
    inputs = [student_BSD.clone().requires_grad_(), teacher_BTD.clone().requires_grad_()]
    loss, count = ot_loss(
        *inputs,
        student_mask_BS,
        teacher_mask_BT,
        cost=kind,
        epsilon=epsilon,
        num_iters=30,
        grad_mode="unrolled",
    )
    loss.backward()
    naive_inputs = [student_BSD.clone().requires_grad_(), teacher_BTD.clone().requires_grad_()]
    expected = _naive_loss(*naive_inputs, student_mask_BS, teacher_mask_BT, kind, epsilon, 30)
    expected.backward()
    assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert count == 3
    for ours, reference in zip(inputs, naive_inputs, strict=True):
        assert_close(ours.grad, reference.grad, rtol=1e-8, atol=1e-10)


def test_attention_cost_softmax_runs_over_real_teacher_positions_only():
    student_BSD, teacher_BTD, _, teacher_mask_BT = _hidden(seed=2)
    cost_BST = cost_matrix(student_BSD, teacher_BTD, "attention", teacher_mask_BT=teacher_mask_BT)
    weights_BST = 1 - cost_BST
    assert_close(weights_BST.sum(-1), torch.ones(3, 6, dtype=F64))
    assert (weights_BST * ~teacher_mask_BT[:, None, :]).abs().max() == 0
    changed_BTD = teacher_BTD.clone()
    changed_BTD[~teacher_mask_BT] = 1e3  # padding content must not leak into the real costs
    changed_BST = cost_matrix(
        student_BSD, changed_BTD, "attention", teacher_mask_BT=teacher_mask_BT
    )
    real_BST = teacher_mask_BT[:, None, :].expand_as(cost_BST)
    assert_close(changed_BST[real_BST], cost_BST[real_BST])


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_fused_masked_attention_cost_equals_its_composition(dtype):
    # One op against fill_masked + cost_matrix: values and gradients, NaN and inf in the padding,
    # a problem with no real teacher position, and an upstream gradient that is nonzero at padded
    # positions (the op must still return exactly zero there).
    from cot2align_ds.losses.masking import fill_masked
    from cot2align_ds.losses.ot.loss import masked_attention_cost

    student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT = _hidden(seed=5)
    teacher_mask_BT[2] = False
    student_BSD, teacher_BTD = student_BSD.to(dtype), teacher_BTD.to(dtype)
    student_BSD[~student_mask_BS] = float("nan")
    teacher_BTD[~teacher_mask_BT] = float("inf")
    upstream_BST = torch.randn(student_BSD.shape[:2] + teacher_BTD.shape[1:2], dtype=F64)
    results = []
    for fused in (True, False):
        x_BSD = student_BSD.clone().requires_grad_()
        y_BTD = teacher_BTD.clone().requires_grad_()
        if fused:
            cost_BST = masked_attention_cost(x_BSD, y_BTD, student_mask_BS, teacher_mask_BT)
        else:
            cost_BST = cost_matrix(
                fill_masked(x_BSD, student_mask_BS[:, :, None], 0.0),
                fill_masked(y_BTD, teacher_mask_BT[:, :, None], 0.0),
                "attention",
                teacher_mask_BT=teacher_mask_BT,
            )
        (cost_BST * upstream_BST.to(cost_BST.dtype)).sum().backward()
        results.append((cost_BST.detach(), x_BSD.grad, y_BTD.grad))
    for ours, reference in zip(*results, strict=True):
        assert ours.dtype == reference.dtype
        assert torch.isfinite(ours).all()
        # fp32 to 1e-5; bf16 gradients at bf16's own tolerance (one rounding of fp32 values
        # that differ in their last bits can move a bf16 result by one of its ulps).
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if ours.dtype == torch.float32 else {}
        assert_close(ours, reference, **tolerance)
    assert results[0][1][~student_mask_BS].abs().max() == 0
    assert results[0][2][~teacher_mask_BT].abs().max() == 0


def test_euclidean_cost_is_the_l2_distance_with_finite_gradient_at_zero():
    student_BSD, teacher_BTD, _, _ = _hidden(seed=3)
    assert_close(
        cost_matrix(student_BSD, teacher_BTD, "euclidean"), torch.cdist(student_BSD, teacher_BTD)
    )
    same_BSD = student_BSD.clone().requires_grad_()
    cost_matrix(same_BSD, student_BSD, "euclidean").sum().backward()
    assert torch.isfinite(same_BSD.grad).all()
    with pytest.raises(ValueError):
        cost_matrix(student_BSD, teacher_BTD, "manhattan")


def test_identical_sequences_cost_almost_nothing_with_cosine_and_small_epsilon():
    student_BSD, _, student_mask_BS, _ = _hidden(seed=4, num_teacher=6)
    loss, count = ot_loss(
        student_BSD,
        student_BSD.clone(),
        student_mask_BS,
        student_mask_BS.clone(),
        cost="cosine",
        epsilon=0.01,
        num_iters=200,
    )
    assert count == 3 and 0 <= loss < 1e-6
    other_loss, _ = ot_loss(
        student_BSD, student_BSD.flip(0), student_mask_BS, student_mask_BS.flip(0), cost="cosine"
    )
    assert other_loss > 0.5  # a genuinely different pair is not near zero


@pytest.mark.parametrize("kind", ["attention", "cosine", "euclidean"])
def test_loss_is_invariant_to_a_permutation_of_teacher_positions(kind):
    student_BSD, teacher_BTD, student_mask_BS, _ = _hidden(seed=5)
    teacher_mask_BT = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) < 0.7
    teacher_mask_BT[:, 0] = True
    permutation = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    options = dict(cost=kind, epsilon=0.5, num_iters=50)
    teacher = teacher_BTD.clone().requires_grad_()
    loss, _ = ot_loss(student_BSD, teacher, student_mask_BS, teacher_mask_BT, **options)
    loss.backward()
    permuted = teacher_BTD[:, permutation].clone().requires_grad_()
    permuted_mask_BT = teacher_mask_BT[:, permutation]
    permuted_loss, _ = ot_loss(student_BSD, permuted, student_mask_BS, permuted_mask_BT, **options)
    permuted_loss.backward()
    assert_close(permuted_loss, loss, rtol=1e-10, atol=1e-12)
    assert_close(permuted.grad, teacher.grad[:, permutation], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("grad_mode", ["unrolled", "envelope", "truncated"])
def test_empty_problems_and_nan_padding_add_nothing(grad_mode):
    student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT = _hidden(
        seed=6, dtype=torch.float32
    )
    student_mask_BS[1] = False  # this record has no aligned student position
    student_BSD[~student_mask_BS] = float("nan")  # models may emit anything at padding
    teacher_BTD[~teacher_mask_BT] = float("inf")
    inputs = [student_BSD.clone().requires_grad_(), teacher_BTD.clone().requires_grad_()]
    loss, count = ot_loss(
        *inputs, student_mask_BS, teacher_mask_BT, epsilon=0.5, num_iters=20, grad_mode=grad_mode
    )
    loss.backward()
    assert torch.isfinite(loss) and count == 2
    for tensor in inputs:
        assert torch.isfinite(tensor.grad).all()
    assert inputs[0].grad[1].abs().sum() == 0 and inputs[1].grad[1].abs().sum() == 0
    keep = [0, 2]
    alone, alone_count = ot_loss(
        student_BSD[keep],
        teacher_BTD[keep],
        student_mask_BS[keep],
        teacher_mask_BT[keep],
        epsilon=0.5,
        num_iters=20,
    )
    assert_close(loss, alone)
    assert alone_count == 2
    nothing, no_count = ot_loss(
        student_BSD, teacher_BTD, torch.zeros_like(student_mask_BS), teacher_mask_BT
    )
    assert nothing == 0 and no_count == 0


def test_extra_padded_positions_change_nothing():
    student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT = _hidden(seed=13)
    options = dict(epsilon=0.2, num_iters=40, grad_mode="unrolled")
    inputs = [student_BSD.clone().requires_grad_(), teacher_BTD.clone().requires_grad_()]
    loss, count = ot_loss(*inputs, student_mask_BS, teacher_mask_BT, **options)
    loss.backward()
    generator = torch.Generator().manual_seed(3)
    padded = [
        torch.cat([student_BSD, 50 * torch.randn(3, 5, 16, generator=generator, dtype=F64)], 1),
        torch.cat([teacher_BTD, 50 * torch.randn(3, 7, 16, generator=generator, dtype=F64)], 1),
    ]
    padded = [tensor.requires_grad_() for tensor in padded]
    padded_student_BS = torch.nn.functional.pad(student_mask_BS, (0, 5))
    padded_teacher_BT = torch.nn.functional.pad(teacher_mask_BT, (0, 7))
    padded_loss, padded_count = ot_loss(*padded, padded_student_BS, padded_teacher_BT, **options)
    padded_loss.backward()
    assert_close(padded_loss, loss, rtol=1e-12, atol=1e-14)
    assert padded_count == count == 3
    assert_close(padded[0].grad[:, :6], inputs[0].grad, rtol=1e-10, atol=1e-14)
    assert_close(padded[1].grad[:, :8], inputs[1].grad, rtol=1e-10, atol=1e-14)
    assert padded[0].grad[:, 6:].abs().sum() == 0 and padded[1].grad[:, 8:].abs().sum() == 0


@pytest.mark.parametrize("grad_mode", ["unrolled", "truncated"])
def test_memory_budget_chunks_give_the_same_loss_and_gradient(grad_mode):
    student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT = _hidden(seed=14, num_problems=5)
    results = []
    for budget in (None, 1):  # 1 byte: one problem per chunk, recomputed in backward
        student = student_BSD.clone().requires_grad_()
        loss, _ = ot_loss(
            student,
            teacher_BTD,
            student_mask_BS,
            teacher_mask_BT,
            epsilon=0.3,
            num_iters=30,
            grad_mode=grad_mode,
            memory_budget_bytes=budget,
        )
        loss.backward()
        results.append((loss.detach(), student.grad))
    assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-14)
    assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-14)


def test_bf16_hidden_states_give_a_finite_fp32_loss():
    student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT = _hidden(
        seed=7, dtype=torch.float32
    )
    student = student_BSD.bfloat16().requires_grad_()
    loss, _ = ot_loss(student, teacher_BTD.bfloat16(), student_mask_BS, teacher_mask_BT)
    loss.backward()
    reference, _ = ot_loss(student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad).all()
    assert_close(loss, reference, rtol=2e-2, atol=0)


def test_gradient_modes_at_the_reference_settings():
    # Attention cost, epsilon=10, 100 iterations: the settings of the reference scripts.
    student_BSD, teacher_BTD, student_mask_BS, teacher_mask_BT = _hidden(
        seed=8, num_problems=4, num_student=24, num_teacher=32, hidden=64
    )
    gradients = {}
    for grad_mode in ("unrolled", "truncated", "envelope"):
        inputs = [student_BSD.clone().requires_grad_(), teacher_BTD.clone().requires_grad_()]
        loss, _ = ot_loss(*inputs, student_mask_BS, teacher_mask_BT, grad_mode=grad_mode)
        loss.backward()
        gradients[grad_mode] = torch.cat([inputs[0].grad.flatten(), inputs[1].grad.flatten()])
        assert torch.isfinite(gradients[grad_mode]).all()
    unrolled, envelope = gradients["unrolled"], gradients["envelope"]
    assert_close(gradients["truncated"], unrolled, rtol=1e-9, atol=1e-14)
    relative = ((envelope - unrolled).norm() / unrolled.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(envelope, unrolled, dim=0).item()
    # Measured: relative difference 0.50, cosine 0.99999. Same direction, half the norm: the
    # envelope gradient is the gradient of the entropy-regularised objective (see sinkhorn.py).
    assert 0.45 < relative < 0.55 and cosine > 0.9999
    assert 0.45 < (envelope.norm() / unrolled.norm()).item() < 0.55


@pytest.mark.parametrize("grad_mode", ["unrolled", "envelope", "truncated"])
def test_multi_pair_equals_separate_calls_with_gradients(grad_mode):
    groups = [
        _hidden(seed=10, num_problems=3, num_student=6, num_teacher=8),
        _hidden(seed=11, num_problems=2, num_student=9, num_teacher=5),
        _hidden(seed=12, num_problems=4, num_student=4, num_teacher=10, hidden=24),
    ]
    weights = [1.0, 0.25, torch.tensor(2.0, dtype=F64)]
    options = dict(cost="attention", epsilon=0.3, num_iters=40, grad_mode=grad_mode)
    leaves = [[g[0].clone().requires_grad_(), g[1].clone().requires_grad_()] for g in groups]
    pairs = [(*leaf, g[2], g[3], w) for leaf, g, w in zip(leaves, groups, weights, strict=True)]
    result = multi_pair_ot_loss(pairs, **options)
    result.loss_sum.backward()
    separate_total = 0.0
    for index, (group, weight) in enumerate(zip(groups, weights, strict=True)):
        separate = [group[0].clone().requires_grad_(), group[1].clone().requires_grad_()]
        loss, count = ot_loss(*separate, group[2], group[3], **options)
        (weight * loss).backward()
        separate_total = separate_total + weight * loss.detach()
        assert_close(result.group_sums_G[index], loss, rtol=1e-10, atol=1e-12)
        assert result.group_counts_G[index] == count
        for ours, reference in zip(leaves[index], separate, strict=True):
            assert_close(ours.grad, reference.grad, rtol=1e-8, atol=1e-12)
    assert_close(result.loss_sum, separate_total, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        multi_pair_ot_loss([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fill", [0.0, -3.0, -1e30, float("-inf")])
def test_fill_masked_matches_where_in_value_and_gradient(dtype, fill):
    from cot2align_ds.losses.masking import fill_masked

    generator = torch.Generator().manual_seed(0)
    x_BSD = torch.randn(3, 5, 4, generator=generator).to(dtype)
    keep_BS1 = torch.rand(3, 5, 1, generator=generator) > 0.4
    hidden = ~keep_BS1.expand_as(x_BSD)
    x_BSD[hidden] = float("nan")  # hidden: never reaches output or gradient
    x_BSD[hidden & (torch.rand(3, 5, 4, generator=generator) > 0.5)] = float("inf")
    weights_BSD = torch.randn(3, 5, 4, generator=generator).to(dtype)
    ours = x_BSD.clone().requires_grad_()
    peer = x_BSD.clone().requires_grad_()
    (fill_masked(ours, keep_BS1, fill) * weights_BSD).nansum().backward()
    expected = torch.where(keep_BS1, peer, torch.tensor(fill, dtype=dtype))
    (expected * weights_BSD).nansum().backward()
    assert torch.equal(fill_masked(x_BSD, keep_BS1, fill), expected.detach())
    assert torch.equal(ours.grad, peer.grad)
    # A mask wider than x broadcasts x, as where does.
    keep_BSD = torch.rand(3, 5, 4, generator=generator) > 0.5
    wide = fill_masked(x_BSD[:, :, :1], keep_BSD, fill)
    expected_wide = torch.where(keep_BSD, x_BSD[:, :, :1], torch.tensor(fill, dtype=dtype))
    assert_close(wide, expected_wide, rtol=0, atol=0, equal_nan=True)
    # A tuple of masks is their AND (a pair mask without its B*S*T product), gradient included.
    keep_B1D = torch.rand(3, 1, 4, generator=generator) > 0.3
    pair = x_BSD.clone().requires_grad_()
    (fill_masked(pair, (keep_BS1, keep_B1D), fill) * weights_BSD).nansum().backward()
    reference = x_BSD.clone().requires_grad_()
    expected_pair = torch.where(keep_BS1 & keep_B1D, reference, torch.tensor(fill, dtype=dtype))
    (expected_pair * weights_BSD).nansum().backward()
    assert torch.equal(fill_masked(x_BSD, (keep_BS1, keep_B1D), fill), expected_pair.detach())
    assert torch.equal(pair.grad, reference.grad)
    assert torch.isfinite(ours.grad).all()


def test_euclidean_cost_is_stable_on_large_nearly_equal_states():
    # Massive activations: a shared offset of 1e4 in a few dimensions, small differences on top.
    generator = torch.Generator().manual_seed(5)
    offset = torch.zeros(16)
    offset[:3] = 1e4
    student = offset + 0.1 * torch.randn(2, 6, 16, generator=generator)
    teacher = offset + 0.1 * torch.randn(2, 5, 16, generator=generator)
    exact = (student.double()[:, :, None] - teacher.double()[:, None, :]).norm(dim=-1)
    cost = cost_matrix(student, teacher, "euclidean")
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost.double(), exact, rtol=1e-4, atol=1e-5)
