"""Shared helpers for vocabulary-sized losses: the (sum, count) result type, gathering response
rows, and a chunked, checkpointed row-wise reduction.

Why chunking: a loss over N response positions and a vocabulary of V entries builds several
N x V fp32 intermediates (softmax, log-softmax, sorted probabilities). With ``chunk_size`` set,
rows are processed ``chunk_size`` at a time and each chunk runs under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, so autograd keeps only the chunk's
inputs (the gathered logits, in their own dtype) and recomputes the fp32 intermediates one chunk
at a time during backward. Peak memory is then O(chunk_size x V) on top of the inputs.

Shape legend: B batch, S student positions, T teacher positions, V student vocab, W teacher vocab,
D student hidden, H teacher hidden, N gathered (response) rows, X any trailing shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class LossSum(NamedTuple):
    """A loss summed over positions, and the number of positions that entered the sum.

    ``sum`` is a 0-dim fp32 tensor (differentiable), ``count`` a 0-dim int64 tensor on the same
    device. The caller divides by the global count once, after any all-reduce.
    """

    sum: torch.Tensor
    count: torch.Tensor


def zero_loss(like: torch.Tensor) -> LossSum:
    """(0, 0) attached to ``like``'s graph, so ``backward`` still works on an empty batch."""
    # Sum of an empty view: exactly 0 even if ``like`` holds inf (0 * inf would be NaN), no copy.
    zero = like.narrow(-1, 0, 0).sum().float()
    return LossSum(zero, torch.zeros((), dtype=torch.long, device=like.device))


def response_mask(labels_BS: torch.Tensor) -> torch.Tensor:
    """Bool mask_BS of positions whose shifted next-token label is a response token."""
    return labels_BS != IGNORE_INDEX


def gather_rows(x_BSX: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_BSX`` where ``mask_BS`` is true, in row-major (b, s) order: x_NX."""
    return x_BSX[mask_BS]


def slice_vocab(logits_BSV: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Drop padded embedding rows (ids >= vocab_size) so they get no probability mass."""
    if vocab_size is None or vocab_size >= logits_BSV.shape[-1]:
        return logits_BSV
    return logits_BSV[..., :vocab_size]


def chunked_row_sum(
    fn: Callable[..., torch.Tensor],
    rows: Sequence[torch.Tensor],
    *,
    chunk_size: int | None,
) -> torch.Tensor:
    """Sum ``fn`` over row chunks: ``sum_c fn(*(r[c] for r in rows))``.

    Args:
        fn: maps row chunks (each ``n x ...``, same n) to a tensor of sums over those rows (any
            fixed shape, e.g. 0-dim, or a small vector of several sums).
        rows: tensors sharing their first dimension N.
        chunk_size: rows per chunk; ``None`` runs one unchunked, uncheckpointed call (the
            reference path, which keeps all intermediates for backward).
    Returns:
        The elementwise sum of ``fn``'s outputs over all chunks.
    """
    num_rows = rows[0].shape[0]
    if chunk_size is None or num_rows == 0:
        return fn(*rows)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    use_checkpoint = torch.is_grad_enabled()
    # split (not slicing in a loop): its backward concatenates the chunk gradients once, where
    # each slice's backward would allocate and add a zero-filled N-row gradient.
    chunked_rows = [r.split(chunk_size) for r in rows]
    total = None
    for chunk in zip(*chunked_rows, strict=True):
        # Non-reentrant checkpoint: saves only the chunk inputs (views of the gathered rows) and
        # recomputes the fp32 intermediates during backward. Chunk functions are deterministic
        # (no dropout), so the RNG state need not be saved and restored.
        part = (
            checkpoint(fn, *chunk, use_reentrant=False, preserve_rng_state=False)
            if use_checkpoint
            else fn(*chunk)
        )
        total = part if total is None else total + part
    return total
