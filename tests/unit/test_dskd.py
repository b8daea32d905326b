"""DSKD (same vocabulary) and DSKD-CMA against dense / per-sequence loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from cot2align_ds.losses.dskd import cross_model_attention, dskd_cma_loss, dskd_loss

B, S, T, V, W, D, H = 3, 6, 7, 11, 13, 4, 6
TEMPERATURE = 2.0


def _kl(p_logits, q_logits):
    """KL(softmax(p / tau) || softmax(q / tau)) per row, plainly."""
    p = torch.softmax(p_logits / TEMPERATURE, -1)
    q = torch.softmax(q_logits / TEMPERATURE, -1)
    return (p * (p.log() - q.log())).sum(-1)


def _projectors(seed=0):
    torch.manual_seed(seed)
    return {
        "query": nn.Linear(2 * D, 2 * H),
        "t2s": nn.Linear(H, D),
        "s2t": nn.Linear(D, H),
    }


# ---------------------------------------------------------------- same vocabulary, position-wise
def _same_vocab_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "student_logits": torch.randn(B, S, V, generator=gen),
        "student_hidden": torch.randn(B, S, D, generator=gen),
        "teacher_logits": torch.randn(B, S, V, generator=gen) * 2,
        "teacher_hidden": torch.randn(B, S, H, generator=gen),
    }
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, :2] = -100
    labels[2, :] = -100
    heads = {
        "student": torch.randn(V, D, generator=gen),
        "teacher": torch.randn(V, H, generator=gen),
    }
    return tensors, labels, heads


def _same_vocab_naive(t, labels, heads, proj):
    mask = labels != -100
    t2s_logits = proj["t2s"](t["teacher_hidden"]) @ heads["student"].T
    s2t_logits = proj["s2t"](t["student_hidden"]) @ heads["teacher"].T
    ce = F.cross_entropy(t2s_logits[mask], labels[mask], reduction="sum")
    # t2s KD: teacher side is the detached t2s logits, student side the student logits
    kd = _kl(t2s_logits[mask].detach(), t["student_logits"][mask]).sum()
    s2t = _kl(t["teacher_logits"][mask], s2t_logits[mask]).sum()
    return ce, kd, s2t


def _grads(tensors, proj):
    out = [tensors[k].grad for k in ("student_logits", "student_hidden")]
    return out + [p.grad for m in proj.values() for p in m.parameters() if p.grad is not None]


def _leaves(tensors):
    return {k: v.clone().requires_grad_(k.startswith("student")) for k, v in tensors.items()}


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_same_vocab_matches_naive_with_grad(chunk_size):
    tensors, labels, heads = _same_vocab_inputs()
    ours_t, ours_p = _leaves(tensors), _projectors()
    ours = dskd_loss(
        ours_t["student_logits"],
        ours_t["student_hidden"],
        ours_t["teacher_logits"],
        ours_t["teacher_hidden"],
        labels,
        student_head_weight_VD=heads["student"],
        teacher_head_weight_WH=heads["teacher"],
        t2s_projector=ours_p["t2s"],
        s2t_projector=ours_p["s2t"],
        temperature=TEMPERATURE,
        chunk_size=chunk_size,
    )
    ours.total.sum.backward()
    ref_t, ref_p = _leaves(tensors), _projectors()
    ce, kd, s2t = _same_vocab_naive(ref_t, labels, heads, ref_p)
    (ce + kd + s2t).backward()
    assert_close(ours.t2s_ce.sum, ce.detach())
    assert_close(ours.t2s_kd.sum, kd.detach())
    assert_close(ours.s2t_kd.sum, s2t.detach())
    assert [int(c) for c in (ours.t2s_ce.count, ours.s2t_kd.count, ours.total.count)] == [10] * 3
    for a, b in zip(_grads(ours_t, ours_p), _grads(ref_t, ref_p), strict=True):
        assert_close(a, b)


# ---------------------------------------------------------------- cross-model attention
def _cma_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    student = {
        "logits": randn(B, S, V),
        "hidden": randn(B, S, D),
        "input_embeds": randn(B, S, D),
        "target_embeds": randn(B, S, D),
    }
    teacher = {
        "logits": randn(B, T, W, scale=2.0),
        "hidden": randn(B, T, H, scale=3.0),
        "input_embeds": randn(B, T, H, scale=0.5),
        "target_embeds": randn(B, T, H, scale=0.5),
    }
    student_labels = torch.randint(0, V, (B, S), generator=gen)
    teacher_labels = torch.randint(0, W, (B, T), generator=gen)
    student_labels[0, :2] = -100
    student_labels[1, 4:] = -100
    teacher_labels[0, :3] = -100
    teacher_labels[1, 5:] = -100
    teacher_labels[2, :] = -100  # sequence 2: no teacher response -> contributes nothing
    heads = {"student": randn(V, D), "teacher": randn(W, H)}
    return student, teacher, student_labels, teacher_labels, heads


def _cma_call(student, teacher, student_labels, teacher_labels, heads, proj, **kwargs):
    return dskd_cma_loss(
        student["logits"],
        student["hidden"],
        student["input_embeds"],
        student["target_embeds"],
        student_labels,
        teacher["logits"],
        teacher["hidden"],
        teacher["input_embeds"],
        teacher["target_embeds"],
        teacher_labels,
        student_head_weight_VD=heads["student"],
        teacher_head_weight_WH=heads["teacher"],
        query_projector=proj["query"],
        t2s_projector=proj["t2s"],
        s2t_projector=proj["s2t"],
        temperature=TEMPERATURE,
        **kwargs,
    )


def _cma_naive(student, teacher, student_labels, teacher_labels, heads, proj):
    """Per-sequence loops over response positions; std over all teacher response positions."""
    s_mask, t_mask = student_labels != -100, teacher_labels != -100
    key_all = torch.cat([teacher["input_embeds"], teacher["target_embeds"]], -1)
    key_std = key_all[t_mask].std()
    hidden_std = teacher["hidden"][t_mask].std()
    target_std = teacher["target_embeds"][t_mask].std()
    ce = kd = s2t = torch.zeros(())
    t2s_argmax = torch.full((B, S), -1)
    for b in range(B):
        si, ti = s_mask[b].nonzero().flatten(), t_mask[b].nonzero().flatten()
        if len(si) == 0 or len(ti) == 0:
            continue
        query = proj["query"](
            torch.cat([student["input_embeds"][b, si], student["target_embeds"][b, si]], -1)
        )
        key = key_all[b, ti] / key_std
        scores = query @ key.T / math.sqrt(2 * H)
        values = proj["t2s"](
            teacher["hidden"][b, ti] / hidden_std + teacher["target_embeds"][b, ti] / target_std
        )
        t2s_logits = torch.softmax(scores, -1) @ values @ heads["student"].T
        labels = student_labels[b, si]
        ce = ce + F.cross_entropy(t2s_logits, labels, reduction="sum")
        correct = t2s_logits.argmax(-1) == labels
        t2s_argmax[b, si] = t2s_logits.argmax(-1)
        kd = kd + (_kl(t2s_logits.detach(), student["logits"][b, si]) * correct).sum()
        s2t_hidden = torch.softmax(scores.T, -1) @ proj["s2t"](student["hidden"][b, si])
        s2t = s2t + _kl(teacher["logits"][b, ti], s2t_hidden @ heads["teacher"].T).sum()
    return (ce, kd, s2t), t2s_argmax


def _leaf_dict(d, grad):
    return {k: v.clone().requires_grad_(grad) for k, v in d.items()}


def _with_some_correct_labels(inputs):
    """Set every other student label to the t2s argmax so the correct-only KD mask is exercised."""
    student, teacher, student_labels, teacher_labels, heads = inputs
    with torch.no_grad():
        _, argmax = _cma_naive(
            student, teacher, student_labels, teacher_labels, heads, _projectors()
        )
    labels = student_labels.clone()
    pick = (argmax >= 0) & (torch.arange(S) % 2 == 0)
    labels[pick] = argmax[pick]
    return student, teacher, labels, teacher_labels, heads


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_cma_matches_naive_with_grad(chunk_size):
    student, teacher, student_labels, teacher_labels, heads = _with_some_correct_labels(
        _cma_inputs()
    )
    ours_s, ours_p = _leaf_dict(student, True), _projectors()
    ours = _cma_call(
        ours_s, teacher, student_labels, teacher_labels, heads, ours_p, chunk_size=chunk_size
    )
    ours.total.sum.backward()
    ref_s, ref_p = _leaf_dict(student, True), _projectors()
    (ce, kd, s2t), _ = _cma_naive(ref_s, teacher, student_labels, teacher_labels, heads, ref_p)
    (ce + kd + s2t).backward()
    assert float(kd.detach()) > 0  # the correct-only KD term is exercised
    for got, want in zip((ours.t2s_ce, ours.t2s_kd, ours.s2t_kd), (ce, kd, s2t), strict=True):
        assert_close(got.sum, want.detach())
    # sequence 2 has no teacher response: its 6 student positions are not counted
    assert int(ours.t2s_ce.count) == 4 + 4 and int(ours.s2t_kd.count) == 4 + 5
    assert int(ours.t2s_num_correct) == int((student_labels != -100)[:2, ::2].sum())
    ours_grads = [ours_s["logits"].grad, ours_s["hidden"].grad]
    ref_grads = [ref_s["logits"].grad, ref_s["hidden"].grad]
    for name in ("query", "t2s", "s2t"):
        ours_grads += [p.grad for p in ours_p[name].parameters()]
        ref_grads += [p.grad for p in ref_p[name].parameters()]
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert_close(a, b)


def test_cma_gradients_reach_all_three_projectors():
    student, teacher, student_labels, teacher_labels, heads = _cma_inputs(1)
    proj = _projectors()
    _cma_call(
        student, teacher, student_labels, teacher_labels, heads, proj, chunk_size=2
    ).total.sum.backward()
    for name, module in proj.items():
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0, name


def test_attention_rows_normalised_over_valid_teacher_positions():
    student, teacher, student_labels, teacher_labels, _ = _cma_inputs(2)
    s_mask, t_mask = student_labels != -100, teacher_labels != -100
    t2s, s2t = cross_model_attention(
        student["input_embeds"],
        student["target_embeds"],
        teacher["input_embeds"],
        teacher["target_embeds"],
        s_mask,
        t_mask,
        query_projector=_projectors()["query"],
    )
    assert t2s.shape == (B, S, T) and s2t.shape == (B, T, S)
    pair = s_mask[:, :, None] & t_mask[:, None, :]
    assert torch.all(t2s[~pair] == 0) and torch.all(s2t.transpose(1, 2)[~pair] == 0)
    has_teacher = s_mask & t_mask.any(-1, keepdim=True)
    assert_close(t2s.sum(-1)[has_teacher], torch.ones(int(has_teacher.sum())))
    assert torch.all(t2s.sum(-1)[~has_teacher] == 0)  # includes sequence 2 entirely
    has_student = t_mask & s_mask.any(-1, keepdim=True)
    assert_close(s2t.sum(-1)[has_student], torch.ones(int(has_student.sum())))


def test_cma_empty_student_mask_gives_zero_without_nan():
    student, teacher, student_labels, teacher_labels, heads = _cma_inputs(3)
    proj = _projectors()
    out = _cma_call(
        _leaf_dict(student, True),
        teacher,
        torch.full_like(student_labels, -100),
        teacher_labels,
        heads,
        proj,
    )
    for part in (out.t2s_ce, out.t2s_kd, out.s2t_kd, out.total):
        assert float(part.sum.detach()) == 0.0 and int(part.count) == 0
    out.total.sum.backward()
    assert all(
        torch.isfinite(p.grad).all()
        for m in proj.values()
        for p in m.parameters()
        if p.grad is not None
    )


def test_cma_bf16_inputs_finite():
    student, teacher, student_labels, teacher_labels, heads = _cma_inputs(4)
    student16 = {k: v.bfloat16() for k, v in student.items()}
    teacher16 = {k: v.bfloat16() for k, v in teacher.items()}
    heads16 = {k: v.bfloat16() for k, v in heads.items()}
    out = _cma_call(
        student16, teacher16, student_labels, teacher_labels, heads16, _projectors(), chunk_size=4
    )
    for part in (out.t2s_ce, out.t2s_kd, out.s2t_kd):
        assert part.sum.dtype == torch.float32 and torch.isfinite(part.sum)
    out.total.sum.backward()
