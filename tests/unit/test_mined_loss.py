"""MinED loss against a per-position loop reference."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cot2align_ds.losses.cross_entropy import cross_entropy_loss
from cot2align_ds.losses.mined import mapped_teacher_target, mined_loss

B, S, T, V, W = 2, 6, 7, 10, 14


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, V, generator=gen) * 2
    teacher = torch.randn(B, T, W, generator=gen) * 2
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, :2] = -100
    labels[1, 4:] = -100
    aligned = torch.tensor([[-1, 3, 2, -1, 5, 6], [0, 1, -1, 4, 2, 5]])
    # several teacher ids onto one student id, and a few unmapped teacher ids
    vocab_map = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3, -1, -1])
    return student, teacher, labels, aligned, vocab_map


def _naive(student, teacher, labels, aligned, vocab_map, temperature=1.0, top_k=None):
    total, count = torch.zeros(()), 0
    for b in range(labels.shape[0]):
        for s in range(labels.shape[1]):
            if labels[b, s] == -100:
                continue
            count += 1
            log_q = torch.log_softmax(student[b, s].float() / temperature, -1)
            target = torch.zeros(student.shape[-1])
            if aligned[b, s] >= 0:
                p = torch.softmax(teacher[b, aligned[b, s]].float() / temperature, -1)
                keep = p.argsort(descending=True)[: top_k or p.numel()]
                for w in keep.tolist():
                    if vocab_map[w] >= 0:
                        target[vocab_map[w]] += p[w]
            if target.sum() == 0:
                target[labels[b, s]] = 1.0
            target = target / target.sum()
            nz = target > 0
            total = total + (target[nz] * (target[nz].log() - log_q[nz])).sum()
    return total, count


def _run(fn, student, *rest):
    leaf = student.clone().requires_grad_(True)
    loss, count = fn(leaf, *rest)
    loss.backward()
    return loss.detach(), int(count), leaf.grad


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_naive_with_grad(top_k, chunk_size, temperature):
    inputs = _inputs()
    ours = _run(
        lambda *a: mined_loss(*a, temperature=temperature, top_k=top_k, chunk_size=chunk_size),
        *inputs,
    )
    ref = _run(lambda *a: _naive(*a, temperature=temperature, top_k=top_k), *inputs)
    assert ours[1] == ref[1] == 8
    assert_close(ours[0], ref[0])
    assert_close(ours[2], ref[2])


def test_unaligned_falls_back_to_gold_cross_entropy():
    student, teacher, labels, aligned, vocab_map = _inputs(1)
    ours = mined_loss(student, teacher, labels, torch.full_like(aligned, -1), vocab_map)
    ce = cross_entropy_loss(student, labels)
    assert_close(ours.sum, ce.sum)
    assert int(ours.count) == int(ce.count)


def test_fully_unmapped_teacher_mass_falls_back_to_gold():
    _, teacher, labels, _, _ = _inputs(2)
    target = mapped_teacher_target(
        teacher[0, :3],
        labels[1, :3],
        torch.full((W,), -1),
        student_vocab=V,
        temperature=1.0,
        top_k=None,
    )
    assert_close(target, torch.nn.functional.one_hot(labels[1, :3], V).float())


def test_target_merges_teacher_ids_and_renormalises():
    teacher = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    vocab_map = torch.tensor([1, 1, -1, 0])
    target = mapped_teacher_target(
        teacher, torch.tensor([2]), vocab_map, student_vocab=3, temperature=1.0, top_k=None
    )
    assert_close(target, torch.tensor([[0.4 / 0.7, 0.3 / 0.7, 0.0]]))
    top2 = mapped_teacher_target(
        teacher, torch.tensor([2]), vocab_map, student_vocab=3, temperature=1.0, top_k=2
    )
    assert_close(top2, torch.tensor([[1.0, 0.0, 0.0]]))  # id 2 is unmapped, id 3 -> 0


def test_identity_map_and_equal_logits_give_zero():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(B, S, V, generator=gen)
    labels = torch.randint(0, V, (B, S), generator=gen)
    aligned = torch.arange(S).expand(B, S)
    loss, count = mined_loss(logits, logits.clone(), labels, aligned, torch.arange(V))
    assert int(count) == B * S
    assert_close(loss, torch.zeros(()), atol=1e-5, rtol=0)


def test_teacher_vocab_size_and_short_map():
    student, teacher, labels, aligned, vocab_map = _inputs(4)
    padded = torch.cat([teacher, torch.full((B, T, 3), 9.0)], -1)
    ref = mined_loss(student, teacher, labels, aligned, vocab_map, top_k=4)
    sliced = mined_loss(student, padded, labels, aligned, vocab_map, top_k=4, teacher_vocab_size=W)
    assert_close(sliced.sum, ref.sum)
    # without slicing, the padded ids (beyond the map) are unmapped but take top-k slots
    unsliced = mined_loss(student, padded, labels, aligned, vocab_map, top_k=4)
    assert torch.isfinite(unsliced.sum) and not torch.allclose(unsliced.sum, ref.sum)


def test_empty_mask_gives_zero_without_nan():
    student, teacher, labels, aligned, vocab_map = _inputs()
    student = student.requires_grad_(True)
    loss, count = mined_loss(student, teacher, torch.full_like(labels, -100), aligned, vocab_map)
    assert float(loss.detach()) == 0.0 and int(count) == 0
    loss.backward()
    assert torch.all(student.grad == 0)


def test_no_gradient_to_teacher_and_bf16_finite():
    student, teacher, labels, aligned, vocab_map = _inputs(5)
    teacher = teacher.bfloat16().requires_grad_(True)
    loss16, _ = mined_loss(student.bfloat16(), teacher, labels, aligned, vocab_map, chunk_size=3)
    loss32, _ = mined_loss(
        student.bfloat16().float(), teacher.detach().float(), labels, aligned, vocab_map
    )
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert_close(loss16, loss32)
    assert not loss16.requires_grad  # the target is a constant; student logits had no grad
