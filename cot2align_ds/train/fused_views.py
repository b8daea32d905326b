"""One forward call for several views of a micro-batch (CoT2Align's teacher views).

Legend: V views, B_v rows and L_v positions of view v, N = sum B_v rows, L = max L_v.

CoT2Align needs the teacher's outputs on the main view and on the standard view of the CoT rows.
Two calls would double ZeRO-3's per-call parameter traffic: every forward gathers each layer's
shards (all-gather across ranks) and, for the CPU-offloaded teacher, moves the whole teacher over
PCIe (about 15 GB per call for a 7.6B teacher in bf16). So the views are stacked along the batch,
right-padded to the longest view, and run as one call; each view's outputs are then the rows and
positions it owns. Right padding under the attention mask leaves every real position's outputs
as in a call of its own (causal attention only looks left; position ids count from 0 on every
row), so the losses see the same numbers up to float summation order. The student keeps two
calls: it is resident, and its standard view skips the LM head, which one call could not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cot2align_ds.data.batch import TokenSide
from cot2align_ds.train.objective import ModelOutputs


def stack_views(sides: list[TokenSide]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of every view as one (N, L) batch, right-padded.

    Padded positions get id 0 under attention mask 0: never attended to, never a target.
    """
    width = max(side.input_ids.shape[1] for side in sides)

    def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.pad(tensor, (0, width - tensor.shape[1])) for tensor in tensors])

    return (
        stacked([side.input_ids for side in sides]),
        stacked([side.attention_mask for side in sides]),
    )


def split_outputs(fused: ModelOutputs, sides: list[TokenSide]) -> list[ModelOutputs]:
    """Each view's (B_v, L_v, ...) slices of a forward over ``stack_views(sides)``."""
    parts, start = [], 0
    for side in sides:
        rows, length = side.input_ids.shape
        end = start + rows

        def own(tensor: torch.Tensor, start=start, end=end, length=length) -> torch.Tensor:
            return tensor[start:end, :length]

        hidden = None
        if fused.hidden_states is not None:
            hidden = tuple(own(state) for state in fused.hidden_states)
        parts.append(ModelOutputs(own(fused.logits), hidden))
        start = end
    return parts
