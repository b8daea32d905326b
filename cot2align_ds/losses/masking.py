"""``torch.where(mask, x, fill)`` with a cheaper backward, for masking padded positions.

Autograd's backward of ``where`` is another ``where`` over a broadcast boolean mask, which on CPU
is slower than multiplying by the same mask as floats; the OT loss masks its inputs and its
log-kernel on every call (``bench/bench_ot.py`` measures the loss end to end).
"""

from __future__ import annotations

import torch


def fill_masked(x: torch.Tensor, keep: torch.Tensor, fill: float) -> torch.Tensor:
    """``torch.where(keep, x, fill)``; ``keep`` is boolean and broadcastable to ``x``.

    Entries where ``keep`` is False may hold anything, NaN and inf included: they neither reach
    the output nor its gradient (the gradient there is exactly zero).
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.where(keep, x, fill)
    return _FillMasked.apply(x, keep, fill)


class _FillMasked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, fill):
        ctx.save_for_backward(keep)
        ctx.x_shape = x.shape
        return torch.where(keep, x, fill)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (keep,) = ctx.saved_tensors
        grad_x = grad_output * keep.to(grad_output.dtype)
        if grad_x.shape != ctx.x_shape:
            grad_x = grad_x.sum_to_size(ctx.x_shape)
        return grad_x, None, None
