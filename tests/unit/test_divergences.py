"""Vanilla KD divergences against plain probability-space formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from cot2align_ds.losses.divergences import DIVERGENCE_KINDS, divergence_rows, kd_divergence

B, S, V = 2, 5, 13


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def _naive_rows(student, teacher, kind, temperature, skew=0.1, mu=0.5):
    q = torch.softmax(student.float() / temperature, -1)
    p = torch.softmax(teacher.float() / temperature, -1)
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "js":
        m = (p + q) / 2
        return (_kl(p, m) + _kl(q, m)) / 2
    if kind == "skew_forward_kl":
        return _kl(p, skew * p + (1 - skew) * q)
    if kind == "skew_reverse_kl":
        return _kl(q, skew * q + (1 - skew) * p)
    assert kind == "adaptive_kl"
    rows, p_value, q_value = [], p.detach(), q.detach()
    for i in range(p.shape[0]):
        order = p_value[i].argsort()  # ascending teacher probability
        cumulative, g_head, g_tail = 0.0, 0.0, 0.0
        for v in order.tolist():
            cumulative += float(p_value[i, v])
            gap = abs(float(p_value[i, v]) - float(q_value[i, v]))
            if cumulative < mu:
                g_tail += gap
            else:
                g_head += gap
        w_head, w_tail = g_head / (g_head + g_tail), g_tail / (g_head + g_tail)
        rows.append(w_head * _kl(p[i], q[i]) + w_tail * _kl(q[i], p[i]))
    return torch.stack(rows)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, V, generator=gen) * 2
    teacher = torch.randn(B, S, V, generator=gen) * 2
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return student, teacher, mask


def _run(fn, student, teacher, mask):
    s_leaf = student.clone().requires_grad_(True)
    t_leaf = teacher.clone().requires_grad_(True)
    loss, count = fn(s_leaf, t_leaf, mask)
    loss.backward()
    return loss.detach(), int(count), s_leaf.grad, t_leaf.grad


def _naive(kind, temperature):
    def fn(student, teacher, mask):
        rows = _naive_rows(student[mask], teacher[mask], kind, temperature)
        return rows.sum(), int(mask.sum())

    return fn


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_matches_naive_with_grad(kind, chunk_size):
    inputs = _inputs()
    ours = _run(
        lambda s, t, m: kd_divergence(s, t, m, kind=kind, temperature=2.0, chunk_size=chunk_size),
        *inputs,
    )
    ref = _run(_naive(kind, 2.0), *inputs)
    assert ours[1] == ref[1] == 5
    for a, b in zip(ours[:1] + ours[2:], ref[:1] + ref[2:], strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_chunked_equals_unchunked(kind):
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 9, 50, generator=gen), torch.randn(3, 9, 50, generator=gen)
    mask = torch.rand(3, 9, generator=gen) > 0.3
    dense = _run(lambda s, t, m: kd_divergence(s, t, m, kind=kind), student, teacher, mask)
    chunked = _run(
        lambda s, t, m: kd_divergence(s, t, m, kind=kind, chunk_size=4), student, teacher, mask
    )
    for a, b in zip(dense, chunked, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_identical_distributions_give_zero(kind):
    student, _, mask = _inputs(2)
    loss, _ = kd_divergence(student, student.clone(), mask, kind=kind)
    assert_close(loss, torch.zeros(()), atol=1e-6, rtol=0)


def test_positive_for_different_distributions():
    student, teacher, mask = _inputs(3)
    for kind in DIVERGENCE_KINDS:
        assert float(kd_divergence(student, teacher, mask, kind=kind).sum) > 1e-3, kind


def test_js_of_disjoint_distributions_is_log2():
    student = torch.tensor([[0.0, float("-inf")]])
    teacher = torch.tensor([[float("-inf"), 0.0]])
    assert_close(divergence_rows(student, teacher, kind="js"), torch.tensor([math.log(2)]))


@pytest.mark.parametrize("kind", ["forward_kl", "js", "skew_forward_kl", "skew_reverse_kl"])
def test_teacher_zero_mass_entries_are_finite(kind):
    # A teacher that puts no mass on some ids (-inf logits) must not produce NaN values/grads.
    student, teacher, mask = _inputs(4)
    teacher[..., :3] = float("-inf")
    student = student.requires_grad_(True)
    loss, _ = kd_divergence(student, teacher, mask, kind=kind, chunk_size=3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_vocab_size_drops_padded_rows():
    student, teacher, mask = _inputs(5)
    pad = torch.full((B, S, 3), 4.0)
    padded = kd_divergence(
        torch.cat([student, pad], -1), torch.cat([teacher, -pad], -1), mask, vocab_size=V
    )
    assert_close(padded.sum, kd_divergence(student, teacher, mask).sum)


def test_empty_mask_gives_zero_without_nan():
    student, teacher, _ = _inputs()
    student = student.requires_grad_(True)
    loss, count = kd_divergence(student, teacher, torch.zeros(B, S, dtype=torch.bool), chunk_size=2)
    assert float(loss.detach()) == 0.0 and int(count) == 0
    loss.backward()
    assert torch.all(student.grad == 0)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_bf16_inputs_finite(kind):
    student, teacher, mask = _inputs(6)
    loss16, _ = kd_divergence(student.bfloat16(), teacher.bfloat16(), mask, kind=kind)
    loss32, _ = kd_divergence(
        student.bfloat16().float(), teacher.bfloat16().float(), mask, kind=kind
    )
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert_close(loss16, loss32)


def test_unknown_kind_raises():
    student, teacher, mask = _inputs()
    with pytest.raises(ValueError, match="unknown divergence kind"):
        kd_divergence(student, teacher, mask, kind="kl")
