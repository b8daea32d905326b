"""Student next-token CE against a plain per-position loop."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cot2align_ds.losses.cross_entropy import cross_entropy_loss

B, S, V = 3, 7, 11


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=gen) * 3
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, :3] = -100  # prompt
    labels[1, :] = -100  # a sequence with no response position
    labels[2, 5:] = -100  # padding
    return logits, labels


def _naive(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    total, count = torch.zeros(()), 0
    for b in range(labels.shape[0]):
        for s in range(labels.shape[1]):
            if labels[b, s] != -100:
                total = total - torch.log_softmax(logits[b, s].float(), -1)[labels[b, s]]
                count += 1
    return total, count


def _loss_and_grad(fn, logits, labels):
    leaf = logits.clone().requires_grad_(True)
    loss, count = fn(leaf, labels)
    loss.backward()
    return loss.detach(), count, leaf.grad


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 100])
def test_matches_naive_with_grad(chunk_size):
    logits, labels = _inputs()
    ours = _loss_and_grad(
        lambda x, y: cross_entropy_loss(x, y, chunk_size=chunk_size), logits, labels
    )
    ref = _loss_and_grad(_naive, logits, labels)
    assert_close(ours[0], ref[0])
    assert int(ours[1]) == ref[1] == int((labels != -100).sum())
    assert_close(ours[2], ref[2])


def test_empty_mask_gives_zero_and_backward_works():
    logits = torch.randn(2, 4, V, requires_grad=True)
    labels = torch.full((2, 4), -100)
    loss, count = cross_entropy_loss(logits, labels, chunk_size=2)
    assert float(loss.detach()) == 0.0 and int(count) == 0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_bf16_finite_and_close_to_fp32():
    logits, labels = _inputs(1)
    loss16, _ = cross_entropy_loss(logits.bfloat16(), labels, chunk_size=3)
    loss32, _ = cross_entropy_loss(logits.bfloat16().float(), labels)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert_close(loss16, loss32)
