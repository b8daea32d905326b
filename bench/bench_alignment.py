"""Token alignment between two tokenizers: character offsets vs MinED dynamic programming, and the
MinED vocabulary-map build in worker processes vs one process.

Rows:
- alignment throughput (sequence pairs/s) on the same pairs: ours = ``align_by_char_boundaries``
  on the cleaned spans; peer = ``mined_dp_align`` (DTW over edit distances) on the normalised
  token strings. Tokenization is done once beforehand and not timed (both methods need it).
- precision of the one-to-one pairs each method outputs: share whose two tokens have the same
  text (space markers stripped). Offsets pairs cover the same characters by construction.
- MinED map build time, parallel (all cores) vs ``num_workers=1``, same backend ("auto":
  rapidfuzz when installed, else numpy), no cache.

Data: synthetic arithmetic prompts with rationales (``cot2align_ds.data.synthetic``) tokenized by
the toy teacher (byte-level BPE) and student (Unigram); the vocabulary maps use larger
tokenizers trained on this Python's standard-library sources (byte-level BPE teacher, Metaspace
BPE student), so the numbers depend on the Python version. Medians of repeats.

Run: ``python -m bench.bench_alignment [--quick]``.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sysconfig
import time
from typing import Any

SECTION = "alignment"


def _pairs(num_texts: int) -> tuple[list[tuple[Any, Any]], list[tuple[list[str], list[str]]]]:
    """(student spans, teacher spans) and (student strings, teacher strings) per text."""
    from cot2align_ds.alignment.offsets import token_char_spans
    from cot2align_ds.alignment.vocab_map import normalized_vocab
    from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
    from cot2align_ds.models.toy_tokenizers import train_byte_bpe, train_unigram

    records = make_split(max(num_texts, 200), ArithmeticTaskSpec(num_steps=4), 0, "bench")
    texts = [
        f"### Instruction:\n{r.instruction}\n### Input:\n{r.input}\n### Response:\n"
        f"{r.rationale}\nTherefore, the answer is: {r.output}"
        for r in records
    ]
    teacher, student = train_byte_bpe(texts, 512), train_unigram(texts, 400)
    teacher_vocab, student_vocab = normalized_vocab(teacher), normalized_vocab(student)
    spans, strings = [], []
    for text in texts[:num_texts]:
        s, t = token_char_spans(student, text), token_char_spans(teacher, text)
        spans.append((s.spans_N2, t.spans_N2))
        strings.append(([student_vocab[i] for i in s.ids_N], [teacher_vocab[i] for i in t.ids_N]))
    return spans, strings


def _pairs_per_second(function, inputs: list[tuple], repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for first, second in inputs:
            function(first, second)
        rates.append(len(inputs) / (time.perf_counter() - start))
    return statistics.median(rates)


def _precision(aligned_S, student_strings: list[str], teacher_strings: list[str]) -> list[bool]:
    from cot2align_ds.alignment.mined_dp import strip_markers

    return [
        strip_markers(student_strings[i]) == strip_markers(teacher_strings[j])
        for i, j in enumerate(aligned_S.tolist())
        if j >= 0
    ]


def _python_dtw(student: list[str], teacher: list[str]) -> list[tuple[int, int]]:
    """Plain-Python MinED DTW (nested loops, plain Levenshtein): the usual implementation."""
    from cot2align_ds.alignment.mined_dp import strip_markers
    from cot2align_ds.alignment.vocab_map import levenshtein

    student = [strip_markers(token) for token in student]
    teacher = [strip_markers(token) for token in teacher]
    inf = float("inf")
    acc = [[inf] * (len(teacher) + 1) for _ in range(len(student) + 1)]
    acc[0][0] = 0
    for i, token_s in enumerate(student, start=1):
        row, above = acc[i], acc[i - 1]
        for j, token_t in enumerate(teacher, start=1):
            best = min(above[j - 1], above[j], row[j - 1])
            row[j] = levenshtein(token_s, token_t) + best
    i, j, path = len(student), len(teacher), []
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        moves = ((i - 1, j - 1), (i - 1, j), (i, j - 1))
        i, j = min(moves, key=lambda move: acc[move[0]][move[1]])
    return path[::-1]


def alignment_rows(num_texts: int, repeats: int) -> list[dict]:
    from cot2align_ds.alignment.mined_dp import mined_dp_align
    from cot2align_ds.alignment.offsets import align_by_char_boundaries

    spans, strings = _pairs(num_texts)
    num_tokens = sum(len(s) + len(t) for s, t in strings) / (2 * len(strings))
    ours = _pairs_per_second(align_by_char_boundaries, spans, repeats)
    peer = _pairs_per_second(mined_dp_align, strings, max(1, repeats // 2))
    ours_ok, peer_ok = [], []
    for (s_spans, t_spans), (s_strings, t_strings) in zip(spans, strings, strict=True):
        offsets = align_by_char_boundaries(s_spans, t_spans).aligned_teacher_pos_S
        ours_ok += _precision(offsets, s_strings, t_strings)
        dp = mined_dp_align(s_strings, t_strings).aligned_teacher_pos_S
        peer_ok += _precision(dp, s_strings, t_strings)
    python_inputs = strings[: max(2, len(strings) // 10)]
    python_dp = _pairs_per_second(_python_dtw, python_inputs, 1)
    return [
        _row(
            f"align {len(spans)} pairs (~{num_tokens:.0f} tokens/side): offsets vs DP",
            ours,
            peer,
            "MinED DP (mined_dp_align)",
            "pairs/s",
            "ours >= 5x peer; ours >= 5000 pairs/s (0.2 ms/pair)",
        ),
        _row(
            f"MinED DP {len(python_inputs)} pairs: vectorised vs plain Python",
            peer,
            python_dp,
            "plain-Python DTW + Levenshtein",
            "pairs/s",
            "ours >= 10x peer",
        ),
        _row(
            f"one-to-one pairs with identical text ({len(ours_ok)} vs {len(peer_ok)} pairs)",
            sum(ours_ok) / max(len(ours_ok), 1),
            sum(peer_ok) / max(len(peer_ok), 1),
            "MinED DP (mined_dp_align)",
            "share",
            "ours == 1.0",
        ),
    ]


def _stdlib_texts(max_chars: int) -> list[str]:
    texts, total = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as handle:
            texts.append(handle.read())
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


def _metaspace_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    special = ["<pad>", "<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False
    )
    model.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
    )  # fmt: skip


def vocab_map_rows(max_chars: int, vocab_sizes: tuple[int, int], repeats: int) -> list[dict]:
    from cot2align_ds.alignment.vocab_map import mined_vocab_map, resolve_backend
    from cot2align_ds.models.toy_tokenizers import train_byte_bpe

    texts = _stdlib_texts(max_chars)
    teacher = train_byte_bpe(texts, vocab_sizes[0])
    student = _metaspace_bpe(texts[::-1], vocab_sizes[1])
    workers = os.cpu_count() or 1
    times: dict[int, list[float]] = {workers: [], 1: []}
    for _ in range(repeats):  # interleaved: drift in machine load hits both alike
        for num_workers in times:
            start = time.perf_counter()
            mined_vocab_map(teacher, student, num_workers=num_workers)
            times[num_workers].append(time.perf_counter() - start)
    backend = resolve_backend("auto")
    return [
        _row(
            f"MinED map W={len(teacher)} V={len(student)} ({backend}): {workers} workers vs 1",
            statistics.median(times[workers]),
            statistics.median(times[1]),
            "one process (num_workers=1)",
            "s",
            "ours < peer when the cores are free",
        )
    ]


def _row(case: str, ours: float, peer: float, peer_name: str, unit: str, target: str) -> dict:
    return {
        "section": SECTION,
        "case": case,
        "ours": round(ours, 4),
        "peer": round(peer, 4),
        "peer_name": peer_name,
        "unit": unit,
        "target": target,
    }


def run(quick: bool = False) -> list[dict]:
    """Bench rows (see the module docstring)."""
    if quick:
        return alignment_rows(40, 3) + vocab_map_rows(300_000, (3000, 2000), 1)
    return alignment_rows(200, 5) + vocab_map_rows(1_500_000, (12000, 6000), 3)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(quick=args.quick):
        ratio = row["ours"] / row["peer"] if row["peer"] else float("nan")
        print(
            f"{row['case']:<66} ours {row['ours']:>10.4g} {row['unit']:<7} "
            f"peer {row['peer']:>10.4g} {row['unit']:<7} ratio {ratio:7.2f}  [{row['target']}]"
        )


if __name__ == "__main__":
    _main()
