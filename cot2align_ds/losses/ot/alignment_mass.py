"""How much of an OT plan's mass lies on position pairs whose tokens cover the same characters.

Legend: B problems, S student response positions, T teacher response positions.

Both tokenizers split the same answer text, so their character offsets say which (student,
teacher) token pairs are the "same piece of text". A plan that aligns the two sequences should
put its mass there; the uniform plan (what a very large epsilon gives) puts exactly the share of
such pairs among all pairs there. The two numbers side by side are the diagnostic.
"""

from __future__ import annotations

import numpy as np
import torch


def char_overlap(student_spans: np.ndarray, teacher_spans: np.ndarray) -> np.ndarray:
    """(S, T) bool: the two tokens' character spans overlap (end tokens, zero-width at the end
    of the text, overlap each other). Spans are (N, 2) half-open [start, end)."""
    s0, s1 = student_spans[:, None, 0], student_spans[:, None, 1]
    t0, t1 = teacher_spans[None, :, 0], teacher_spans[None, :, 1]
    overlap = (s0 < t1) & (t0 < s1)
    zero_width = (s0 == s1) & (t0 == t1) & (s0 == t0)
    return overlap | zero_width


def aligned_mass(
    plan_BST: torch.Tensor,
    aligned_BST: torch.Tensor,
    student_mask_BS: torch.Tensor,
    teacher_mask_BT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per problem: the plan's share of mass on aligned pairs, and the uniform plan's share (the
    aligned pairs among all real pairs). Problems without real pairs give 0 and 0."""
    real_BST = student_mask_BS[:, :, None] & teacher_mask_BT[:, None, :]
    aligned_BST = aligned_BST & real_BST
    plan_BST = plan_BST.float() * real_BST
    total_B = plan_BST.sum((1, 2))
    mass_B = (plan_BST * aligned_BST).sum((1, 2)) / total_B.clamp_min(1e-30)
    pairs_B = real_BST.sum((1, 2)).clamp_min(1)
    uniform_B = aligned_BST.sum((1, 2)) / pairs_B
    return torch.where(total_B > 0, mass_B, 0.0), uniform_B.to(mass_B.dtype)
