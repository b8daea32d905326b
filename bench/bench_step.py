"""End-to-end distillation step on tiny models (world size 1, ZeRO-3 student + offloaded teacher).

For each method: student tokens/s over the timed steps (setup excluded), the share of step
time spent waiting for the DataLoader (alignment and tokenization run in worker processes, so
this should stay small), and the peak host memory of the whole run (engines, teacher, steps)
above the process's memory when the run started (``bench.memory.PeakRSS``; big frees go back to
the OS, and a warm-up run takes the one-time costs). DataLoader workers are separate processes
and are not counted. Time is measured in this process (runs interleaved); memory in one fresh child process per case
(``--memory-child``), since in a shared process a later run reuses pages an earlier one freed
(measured: 17-63 MB per run with six runs in one process, 1-2 MB with eight; 96-152 MB in a
fresh process each).
Peers: each base KD method against SFT on the standard records, and each "+ CoT2Align" against
its base method on the same CoT-augmented batches (target from the issue: at most 2.2x the base
step, since CoT2Align adds two forward passes for the cross views and the OT loss); also, per
student token, against the base on standard records alone. Same models, same seed, runs
interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# name: (method, CoT2Align on, trains on the CoT-augmented data). "on CoT data" is the base
# method on exactly CoT2Align's batches (standard and CoT records, no OT, no cross views): the
# peer for the "at most 2.2x its base method's step", since CoT2Align adds the two
# cross-view forwards and OT to those same batches. The base on standard records alone is a
# cheaper peer (shorter rows, half the records) and is reported next to it.
CASES = {
    "sft": ("sft", False, False),
    "uld": ("uld", False, False),
    "mined": ("mined", False, False),
    "dskd_cma": ("dskd_cma", False, False),
    "uld on CoT data": ("uld", False, True),
    "dskd_cma on CoT data": ("dskd_cma", False, True),
    "uld+cot2align": ("uld", True, True),
    "dskd_cma+cot2align": ("dskd_cma", True, True),
}
PEERS = {
    "uld": "sft",
    "mined": "sft",
    "dskd_cma": "sft",
    "uld+cot2align": "uld on CoT data",
    "dskd_cma+cot2align": "dskd_cma on CoT data",
}
# The same CoT2Align cases against the base on standard records only (report).
STANDARD_DATA_PEERS = {"uld+cot2align": "uld", "dskd_cma+cot2align": "dskd_cma"}


def _workspace(root: Path, num_records: int) -> dict[str, Path]:
    from cot2align_ds.data.records import write_records
    from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
    from cot2align_ds.experiments.pipeline import TEACHER_ARCHITECTURE, tokenizer_corpus
    from cot2align_ds.models.toy_tokenizers import train_byte_bpe, train_unigram

    records = make_split(num_records, ArithmeticTaskSpec(), seed=0, prefix="bench")
    write_records(root / "train.jsonl", records)
    corpus = tokenizer_corpus(records, "compact")
    train_byte_bpe(corpus, 600).save_pretrained(root / "teacher_tok")
    train_unigram(corpus, 400).save_pretrained(root / "student_tok")
    return {"root": root, "teacher_arch": TEACHER_ARCHITECTURE}


def _config(
    ws: dict, out: Path, method: str, cot2align: bool, steps: int, workers: int, cot_data: bool
) -> dict:
    config = {
        "output_dir": str(out),
        "student": {
            "architecture": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4},
            "tokenizer": str(ws["root"] / "student_tok"),
        },
        "data": {
            "train_file": str(ws["root"] / "train.jsonl"),
            "template": "compact",
            "max_prompt_tokens": 160,
            "max_total_tokens": 224,
            "num_workers": workers,
            "cot_records": "all" if cot_data else "none",
        },
        "distill": {"method": method, "temperature": 1.0},
        "cot2align": {"enabled": cot2align},
        "train": {
            "max_steps": steps,
            "micro_batch_size": 16,
            "precision": "fp32",
            "log_every": steps,
        },
        "deepspeed": {"dist_timeout_s": 300},
    }
    if method != "sft":
        config["teacher"] = {
            "architecture": ws["teacher_arch"],
            "tokenizer": str(ws["root"] / "teacher_tok"),
        }
    return config


def _measure(ws, root: Path, name: str, steps: int, workers: int) -> dict[str, float]:
    from bench.memory import PeakRSS
    from cot2align_ds.config import validate_config
    from cot2align_ds.train.loop import run_train

    method, cot2align, cot_data = CASES[name]
    out = root / f"run-{name.replace(' ', '_')}"
    config = validate_config(_config(ws, out, method, cot2align, steps, workers, cot_data))
    with PeakRSS() as peak:
        run_train(config, overwrite=True)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "tokens_per_s": last["tokens_per_s"],
        "data_wait_share": last["data_wait_share"],
        "peak_rss_mb": peak.mb,
    }


def _peak_memory_in_child(root: Path, name: str, steps: int) -> float:
    """Peak host RSS (MB) of one run of ``name`` in a fresh process, above its post-import RSS."""
    from cot2align_ds.engine.deepspeed_engines import RENDEZVOUS_VARS

    environment = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    command = [sys.executable, "-m", "bench.bench_step", "--memory-child", name, str(root)]
    command += ["--steps", str(steps)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=True
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def run(quick: bool = False) -> list[dict]:
    from bench.memory import return_big_frees_to_the_os

    os.environ.setdefault("WANDB_MODE", "disabled")
    steps, repeats = (6, 1) if quick else (16, 2)
    return_big_frees_to_the_os()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws = _workspace(root, 400)
        # One-time costs (process group, JIT ops, thread pools) stay out of every measured case.
        _measure(ws, root, "dskd_cma+cot2align", 1, workers=1)
        samples: dict[str, list[dict]] = {name: [] for name in CASES}
        for _ in range(repeats):  # interleaved: each repeat runs every case once
            for name in CASES:
                samples[name].append(_measure(ws, root, name, steps, workers=1))
        # In this process a later run reuses pages an earlier one freed: exact peaks need a
        # fresh process per case.
        peaks = {name: _peak_memory_in_child(root, name, steps) for name in CASES}
    medians = {
        name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
        for name, runs in samples.items()
    }
    for name, peak in peaks.items():
        medians[name]["peak_rss_mb"] = peak
    rows = []
    # CoT2Align vs its base: the same batches on both sides (same data, seed and sampler), so
    # the inverse throughput ratio is the step-time ratio. Against the base on standard data
    # the batches differ (no CoT records there): read that one per main-view student token.
    time_rows = [(name, peer, f"{name} step time") for name, peer in PEERS.items()]
    time_rows += [
        (name, peer, f"{name} time per student token vs the base on standard data")
        for name, peer in STANDARD_DATA_PEERS.items()
    ]
    for name, peer, case in time_rows:
        on_same_batches = PEERS.get(name) == peer and "cot2align" in name
        rows.append(
            {
                "section": "step",
                "case": case,
                "unit": "s/1k tok",
                "ours": 1000 / medians[name]["tokens_per_s"],
                "peer": 1000 / medians[peer]["tokens_per_s"],
                "peer_name": peer,
                "target": "<= 2.2x base" if on_same_batches else "report",
            }
        )
    for name, peer in {"sft": None, **PEERS}.items():
        rows.append(
            {
                "section": "step",
                "case": f"{name} peak host memory (fresh process, above its start)",
                "unit": "MB",
                "ours": medians[name]["peak_rss_mb"],
                "peer": medians[peer]["peak_rss_mb"] if peer else "-",
                "peer_name": peer or "-",
                "target": "report",
            }
        )
    for name in CASES:
        rows.append(
            {
                "section": "step",
                "case": f"{name} data-wait share",
                "unit": "share",
                "ours": medians[name]["data_wait_share"],
                "peer": 1.0,
                "peer_name": "whole step",
                "target": "small",
            }
        )
    return rows


def _memory_child(name: str, root: Path, steps: int) -> None:
    from bench.memory import return_big_frees_to_the_os

    os.environ.setdefault("WANDB_MODE", "disabled")
    return_big_frees_to_the_os()
    ws = {"root": root, "teacher_arch": _teacher_architecture()}
    sub = root / "memory"
    sub.mkdir(exist_ok=True)
    result = _measure(ws, sub, name, steps, workers=1)
    print(json.dumps({"peak_rss_mb": result["peak_rss_mb"]}))


def _teacher_architecture() -> dict:
    from cot2align_ds.experiments.pipeline import TEACHER_ARCHITECTURE

    return TEACHER_ARCHITECTURE


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "ROOT"))
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child[0], Path(args.memory_child[1]), args.steps)
    else:
        from bench.run import print_table

        print_table([{"suite": "step", **r} for r in run(args.quick)], {}, args.quick)
