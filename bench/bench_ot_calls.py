"""How to batch the OT groups of a micro-batch: per view (as training does), all in one, or none.

The CoT2Align objective solves 2 layer pairs x 3 views = 6 OT groups per micro-batch, with one
``multi_pair_ot_loss`` call per view over its layer pairs (``Objective._ot_sums``). The shapes are ragged the way real batches are: the main view aligns
CoT answers (long) on both sides, ``cross_std_cot`` a short standard student answer with the
teacher's CoT answer, ``cross_cot_std`` the reverse. Each row's answer length is drawn in
[20, 120] for CoT answers and [20, 40] for standard ones, then padded to the group's longest row
(with a different tokenizer on each side, so S != T). The layer pairs of a view share lengths,
so a per-view call pads nothing; one call for all six groups pads every group to the largest S
and T of all groups. The peer runs ``ot_loss`` per group (six solver launches). Rows: per view
vs per group (the target: training's choice must not lose to no batching) and all-in-one vs
per group (reported: why training does not batch across views). Both sides: forward + backward to the hidden states,
attention cost, epsilon 10, 100 iterations, truncated gradient (the defaults).

Time: torch pinned to one thread (see ``bench_ot``), one warm-up each, then ours and the peer
alternate ``repeats`` times on the same inputs; rows report the medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

SECTION = "ot_calls"
LAYER_PAIRS = 2
COT_LENGTHS = (20, 120)
STANDARD_LENGTHS = (20, 40)
# Different tokenizers cut the same answer into different numbers of tokens.
TEACHER_LENGTH_FACTOR = 0.85


def _lengths(generator, batch: int, bounds: tuple[int, int]):
    import torch

    low, high = bounds
    return torch.randint(low, high + 1, (batch,), generator=generator)


def _side(generator, lengths, hidden: int):
    import torch

    positions = int(lengths.max())
    hidden_BKD = torch.randn(len(lengths), positions, hidden, generator=generator)
    mask_BK = torch.arange(positions)[None, :] < lengths[:, None]
    return hidden_BKD, mask_BK


def make_groups(batch: int, hidden: int, seed: int = 0) -> list[tuple]:
    """The 6 OT groups of one micro-batch: (student, teacher, student mask, teacher mask, w)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    cot = _lengths(generator, batch, COT_LENGTHS)
    standard = _lengths(generator, batch, STANDARD_LENGTHS)
    # Both models see the same answer text: the teacher's length follows the student's.
    teacher_cot = (cot.float() * TEACHER_LENGTH_FACTOR).long().clamp_min(1)
    teacher_standard = (standard.float() * TEACHER_LENGTH_FACTOR).long().clamp_min(1)
    views = {  # (student answer lengths, teacher answer lengths)
        "main": (cot, teacher_cot),
        "cross_std_cot": (standard, teacher_cot),
        "cross_cot_std": (cot, teacher_standard),
    }
    groups = []
    for student_lengths, teacher_lengths in views.values():
        for _ in range(LAYER_PAIRS):
            student, student_mask = _side(generator, student_lengths, hidden)
            teacher, teacher_mask = _side(generator, teacher_lengths, hidden)
            groups.append((student, teacher, student_mask, teacher_mask, 1.0 / LAYER_PAIRS))
    return groups


def _with_grad(groups: list[tuple]) -> list[tuple]:
    return [
        (s.detach().requires_grad_(), t.detach().requires_grad_(), sm, tm, w)
        for s, t, sm, tm, w in groups
    ]


def batched_call(groups: list[tuple]) -> float:
    from cot2align_ds.losses.ot.loss import multi_pair_ot_loss

    result = multi_pair_ot_loss(_with_grad(groups))
    result.loss_sum.backward()
    return float(result.loss_sum.detach())


def per_view_calls(groups: list[tuple]) -> float:
    from cot2align_ds.losses.ot.loss import multi_pair_ot_loss

    groups, total = _with_grad(groups), 0.0
    for start in range(0, len(groups), LAYER_PAIRS):
        total = total + multi_pair_ot_loss(groups[start : start + LAYER_PAIRS]).loss_sum
    total.backward()
    return float(total.detach())


def separate_calls(groups: list[tuple]) -> float:
    from cot2align_ds.losses.ot.loss import ot_loss

    total = 0.0
    for s, t, sm, tm, w in _with_grad(groups):
        loss_sum, _ = ot_loss(s, t, sm, tm)
        total = total + w * loss_sum
    total.backward()
    return float(total.detach())


def _time(function: Callable[[list[tuple]], float], groups: list[tuple]) -> float:
    started = time.perf_counter()
    function(groups)
    return time.perf_counter() - started


_CALLS = {
    "per view": (per_view_calls, "< 1x"),
    "one padded call for all groups": (batched_call, "report"),
}


def compare(
    ours: Callable[[list[tuple]], float], batch: int, hidden: int, repeats: int
) -> tuple[float, float]:
    """Median seconds (ours, separate calls) for one configuration, alternating the two."""
    import torch

    groups = make_groups(batch, hidden)
    # Same loss either way, else the comparison is meaningless.
    torch.testing.assert_close(
        torch.tensor(ours(groups)), torch.tensor(separate_calls(groups)), rtol=1e-4, atol=0
    )
    ours_times, peer_times = [], []
    for _ in range(repeats):
        ours_times.append(_time(ours, groups))
        peer_times.append(_time(separate_calls, groups))
    return statistics.median(ours_times), statistics.median(peer_times)


def run(quick: bool = False, tiny: bool = False) -> list[dict]:
    import torch

    if tiny:
        configs, repeats = [(2, 16)], 1
    else:
        configs, repeats = [(8, 64), (8, 256)], (3 if quick else 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name, (call, target) in _CALLS.items():
            for batch, hidden in configs:
                ours, peer = compare(call, batch, hidden, repeats)
                case = f"{LAYER_PAIRS} pairs x 3 views, B={batch}, D={hidden}: {name}, fwd+bwd"
                rows.append(
                    {
                        "section": SECTION,
                        "case": case,
                        "unit": "ms",
                        "ours": ours * 1e3,
                        "peer": peer * 1e3,
                        "peer_name": "one ot_loss per group",
                        "target": target,
                    }
                )
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    import sys

    from bench.run import print_table

    quick = "--quick" in sys.argv
    rows = run(quick, tiny="--tiny" in sys.argv)
    print_table([{"suite": SECTION, **r} for r in rows], {}, quick)
