"""ULD against a plain loop reference: softmax, sort, zero-pad, L1, start-aligned pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from cot2align_ds.losses.uld import start_aligned_masks, uld_loss

B, S, T = 3, 6, 8


def _labels(shape, spans, vocab, gen):
    labels = torch.full(shape, -100)
    for b, (lo, hi) in enumerate(spans):
        labels[b, lo:hi] = torch.randint(0, vocab, (hi - lo,), generator=gen)
    return labels


def _inputs(v: int, w: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, v, generator=gen) * 2
    teacher = torch.randn(B, T, w, generator=gen) * 2
    # ragged: student longer / teacher longer / teacher has no response at all
    student_labels = _labels((B, S), [(1, 6), (2, 4), (0, 3)], v, gen)
    teacher_labels = _labels((B, T), [(4, 7), (1, 8), (0, 0)], w, gen)
    return student, teacher, student_labels, teacher_labels


def _naive(student, teacher, student_labels, teacher_labels, temperature=1.0):
    total, count = torch.zeros(()), 0
    for b in range(student.shape[0]):
        s_pos = [s for s in range(student.shape[1]) if student_labels[b, s] != -100]
        t_pos = [t for t in range(teacher.shape[1]) if teacher_labels[b, t] != -100]
        for s, t in zip(s_pos, t_pos, strict=False):  # zip truncates the longer answer
            p = torch.softmax(student[b, s].float() / temperature, -1).sort(descending=True).values
            q = torch.softmax(teacher[b, t].float() / temperature, -1).sort(descending=True).values
            width = max(p.numel(), q.numel())
            p, q = F.pad(p, (0, width - p.numel())), F.pad(q, (0, width - q.numel()))
            total = total + (p - q).abs().sum()
            count += 1
    return total, count


def _run(fn, student, teacher, *rest):
    s_leaf = student.clone().requires_grad_(True)
    t_leaf = teacher.clone().requires_grad_(True)
    loss, count = fn(s_leaf, t_leaf, *rest)
    loss.backward()
    return loss.detach(), int(count), s_leaf.grad, t_leaf.grad


@pytest.mark.parametrize("v,w", [(13, 13), (9, 17), (17, 9)])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_matches_naive_with_grad(v, w, chunk_size):
    inputs = _inputs(v, w)
    ours = _run(lambda *a: uld_loss(*a, temperature=1.5, chunk_size=chunk_size), *inputs)
    ref = _run(lambda *a: _naive(*a, temperature=1.5), *inputs)
    assert ours[1] == ref[1] == 5  # min(5,3) + min(2,7) + min(3,0)
    for a, b in zip(ours[:1] + ours[2:], ref[:1] + ref[2:], strict=True):
        assert_close(a, b)


def test_chunked_equals_unchunked_grad():
    inputs = _inputs(40, 70, seed=3)
    dense = _run(lambda *a: uld_loss(*a), *inputs)
    chunked = _run(lambda *a: uld_loss(*a, chunk_size=2), *inputs)
    for a, b in zip(dense, chunked, strict=True):
        assert_close(a, b)


def test_vocab_size_slices_padded_rows():
    student, teacher, sl, tl = _inputs(12, 20, seed=4)
    padded_teacher = torch.cat([teacher, torch.full((B, T, 4), 5.0)], dim=-1)
    ours, _ = uld_loss(student, padded_teacher, sl, tl, teacher_vocab_size=20)
    ref, _ = uld_loss(student, teacher, sl, tl)
    assert_close(ours, ref)
    unsliced, _ = uld_loss(student, padded_teacher, sl, tl)
    assert not torch.allclose(unsliced, ref)


def test_identical_distributions_give_zero():
    student, _, sl, _ = _inputs(15, 15)
    loss, count = uld_loss(student, student.clone(), sl, sl.clone(), chunk_size=3)
    assert int(count) == int((sl != -100).sum())
    assert_close(loss, torch.zeros(()))


def test_permuted_vocab_gives_zero():
    # ULD ignores token identity: a teacher that is a vocabulary permutation costs nothing.
    student, _, sl, _ = _inputs(15, 15)
    teacher = student[..., torch.randperm(15, generator=torch.Generator().manual_seed(0))]
    loss, _ = uld_loss(student, teacher, sl, sl)
    assert_close(loss, torch.zeros(()), atol=1e-6, rtol=0)


def test_empty_masks_give_zero_without_nan():
    student, teacher, sl, tl = _inputs(9, 11)
    student = student.requires_grad_(True)
    loss, count = uld_loss(student, teacher, sl, torch.full_like(tl, -100), chunk_size=2)
    assert float(loss.detach()) == 0.0 and int(count) == 0
    loss.backward()
    assert torch.all(student.grad == 0)


def test_start_aligned_masks_pair_in_order():
    s_mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    t_mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    s_keep, t_keep = start_aligned_masks(s_mask, t_mask)
    assert s_keep.tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert t_keep.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]


def test_bf16_finite():
    student, teacher, sl, tl = _inputs(30, 50, seed=5)
    loss16, _ = uld_loss(student.bfloat16(), teacher.bfloat16(), sl, tl, chunk_size=2)
    loss32, _ = uld_loss(student.bfloat16().float(), teacher.bfloat16().float(), sl, tl)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert_close(loss16, loss32)
