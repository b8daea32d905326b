"""Chunked vs unchunked vocabulary-sized losses (ULD, forward KL): forward+backward time and peak
memory.

ours = the loss with ``chunk_size`` set (row chunks under non-reentrant activation
checkpointing); peer = the same loss with ``chunk_size=None`` (one dense pass that keeps every
fp32 intermediate for backward). Inputs are bf16 logits (as a bf16 model emits them) with every
position a response position; the student logits require grad.

Method: every measurement runs in a fresh subprocess (``python -m bench.bench_vocab_loss --child``)
pinned to 2 torch threads. The child builds the inputs (directly in bf16, no fp32 temporaries),
runs a tiny warm-up of the same loss (kernel and thread-pool initialisation), resets the kernel's
peak-RSS mark (``echo 5 > /proc/self/clear_refs``) and reads the current RSS as the baseline, runs
one full forward+backward, and reports its wall time and the peak RSS (VmHWM) above the baseline:
fp32 intermediates, tensors saved for backward, gathered rows and the logits' gradient. Where
clear_refs is unavailable it falls back to the ``getrusage(RUSAGE_SELF).ru_maxrss`` increase. Large CPU tensors are fresh mmaps that are touched when written, so the first
full run pays the same page faults as any later one and its time is a fair sample. Subprocesses
alternate ours / peer, ``repeats`` times per case; each row reports the medians. CPU timings are
indicative only: torch's CPU sort dominates ULD, and the machine may be shared.

Run: ``python -m bench.bench_vocab_loss [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# (loss, vocab, batch, positions): both sides use the same vocabulary size.
FULL_CASES = [
    ("forward_kl", 32_000, 2, 256),
    ("forward_kl", 151_936, 2, 256),
    ("uld", 32_000, 2, 256),
    ("uld", 151_936, 2, 64),  # torch's CPU sort makes 2 x 256 take minutes here
]
QUICK_CASES = [(loss, vocab, 2, 16) for loss, vocab, _, _ in FULL_CASES]


def _loss_call(loss: str, chunk_size: int | None):
    from cot2align_ds.losses.divergences import kd_divergence
    from cot2align_ds.losses.uld import uld_loss

    def call(student, teacher, labels):
        if loss == "uld":
            return uld_loss(student, teacher, labels, labels, chunk_size=chunk_size)
        return kd_divergence(student, teacher, labels != -100, kind=loss, chunk_size=chunk_size)

    return call


def _inputs(vocab: int, batch: int, positions: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = (batch, positions, vocab)
    # bf16 from the start: an fp32 temporary would raise the peak-RSS mark before the baseline.
    student = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(2)
    teacher = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(2)
    labels = torch.randint(0, vocab, (batch, positions), generator=gen)
    return student.requires_grad_(True), teacher, labels


def _forward_backward(call, student, teacher, labels) -> None:
    loss_sum, _ = call(student, teacher, labels)
    loss_sum.backward()
    student.grad = None


def _child(loss: str, vocab: int, batch: int, positions: int, chunk_size: int | None) -> dict:
    import torch

    from bench.memory import PeakRSS

    torch.set_num_threads(2)
    call = _loss_call(loss, chunk_size)
    _forward_backward(call, *_inputs(vocab, 1, 4, seed=1))  # warm-up, small
    student, teacher, labels = _inputs(vocab, batch, positions)
    with PeakRSS() as peak:
        start = time.perf_counter()
        _forward_backward(call, student, teacher, labels)
        elapsed_ms = (time.perf_counter() - start) * 1e3
    return {"ms": elapsed_ms, "mb": peak.mb}


def _spawn(loss: str, vocab: int, batch: int, positions: int, chunk_size: int | None) -> dict:
    command = [sys.executable, "-m", "bench.bench_vocab_loss", "--child", loss, str(vocab)]
    command += [str(batch), str(positions), str(chunk_size or 0)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case_rows(case: tuple, chunk_size: int, repeats: int) -> list[dict]:
    loss, vocab, batch, positions = case
    ours, peer = [], []
    for _ in range(repeats):  # interleaved: drift in machine load hits both sides alike
        ours.append(_spawn(loss, vocab, batch, positions, chunk_size))
        peer.append(_spawn(loss, vocab, batch, positions, None))
    name = f"{loss} V={vocab} {batch}x{positions} chunk={chunk_size} fwd+bwd"
    rows = []
    for key, unit, target in (
        ("ms", "ms", "ours <= 2.5x peer (recompute in backward)"),
        ("mb", "MB", "ours < peer"),
    ):
        rows.append(
            {
                "section": "vocab_loss",
                "case": f"{name} {'time' if unit == 'ms' else 'peak rss'}",
                "ours": round(statistics.median(r[key] for r in ours), 1),
                "peer": round(statistics.median(r[key] for r in peer), 1),
                "peer_name": "unchunked (chunk_size=None)",
                "unit": unit,
                "target": target,
            }
        )
    return rows


def run(quick: bool = False) -> list[dict]:
    """Bench rows for chunked (ours) vs unchunked (peer) ULD and forward KL."""
    cases = QUICK_CASES if quick else FULL_CASES
    chunk_size, repeats = (8, 1) if quick else (64, 3)
    rows = []
    for case in cases:
        rows += _case_rows(case, chunk_size, repeats)
    return rows


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=5, metavar=("LOSS", "V", "B", "S", "CHUNK"))
    args = parser.parse_args()
    if args.child:
        loss, vocab, batch, positions, chunk = args.child
        result = _child(loss, int(vocab), int(batch), int(positions), int(chunk) or None)
        print(json.dumps(result))
        return
    for row in run(quick=args.quick):
        ratio = row["ours"] / row["peer"] if row["peer"] else float("nan")
        print(
            f"{row['case']:<62} ours {row['ours']:>9.1f} {row['unit']:<2}  "
            f"peer {row['peer']:>9.1f} {row['unit']:<2}  ratio {ratio:5.2f}  [{row['target']}]"
        )


if __name__ == "__main__":
    _main()
