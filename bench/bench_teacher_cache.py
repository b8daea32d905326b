"""The teacher cache against the live teacher: step time and peak memory per method on the
same batches, and what building the cache costs (tiny models, world size 1).

For each case, a run reading the teacher from its cache (``teacher_cache.path``: no teacher
engine, only the teacher's head and embedding loaded) against the same run with the live
teacher (ZeRO-3 inference engine, parameters offloaded to CPU): same data, seed and sampler,
so the batches are the same. Time: all trainers are alive in one process and their steps
alternate (``bench_breakdown.interleave``: a noisy neighbour hits every case alike); the first
steps of each (allocator growth, DataLoader worker start, ZeRO-3's first trace) are left out,
as they would otherwise weigh on a 12-step run far more than on a real one. Torch runs on one
thread, as in ``bench_breakdown`` whose teacher share motivated the target: on two cores the
DataLoader worker (which reads the cache) then has the other core. The two CoT2Align cases run
again on two threads, reported: there the live teacher forward parallelises better than the
student's smaller matmuls and the worker competes for the cores, so the ratio is higher.
Per case also the teacher phase alone: the live forward against the cached path (the output
head over the response positions, layer 0 from the embedding). Peak host memory comes from one
fresh child process per run (``bench_step`` explains why). The build rows time
``cot2align cache-teacher`` against one epoch of the live CoT2Align run over the same views
(what the cache replaces per epoch), and give the bytes stored per cached position.

Every case runs with the ZeRO-3 student (what ``student_config: auto`` picks without GPUs) and
the CoT2Align cases once more with the ZeRO-2 student. The cache removes the same teacher time
from both; the ratio differs because at world size 1 the ZeRO-3 engine still gathers and
releases every layer at every forward and backward, which makes the rest of the step longer.

The teacher is saved once (``from_config`` with the demo's teacher architecture) because a cache
is keyed by its weights file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_step import _config, _workspace

REPO_ROOT = Path(__file__).resolve().parents[1]
ZERO2 = " (ZeRO-2 student)"
# name: (method, CoT2Align on, student engine); CoT2Align cases train on the CoT-augmented data.
CASES = {
    "uld+cot2align": ("uld", True, "student_zero3.json"),
    "dskd_cma+cot2align": ("dskd_cma", True, "student_zero3.json"),
    "uld": ("uld", False, "student_zero3.json"),
    "mined": ("mined", False, "student_zero3.json"),
    "uld+cot2align" + ZERO2: ("uld", True, "student_zero2.json"),
    "dskd_cma+cot2align" + ZERO2: ("dskd_cma", True, "student_zero2.json"),
}
# Run once more on two threads, and in fresh processes for peak memory.
TWO_THREADS = ("uld+cot2align", "dskd_cma+cot2align")


def _save_teacher(ws: dict) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = ws["root"] / "teacher"
    if out.is_dir():
        return out
    tokenizer = AutoTokenizer.from_pretrained(ws["root"] / "teacher_tok")
    torch.manual_seed(0)
    arch = dict(ws["teacher_arch"])
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), **arch)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _run_config(ws: dict, out: Path, name: str, steps: int, cached: bool) -> dict:
    method, cot2align, student_engine = CASES[name]
    config = _config(ws, out, method, cot2align, steps, 1, cot_data=cot2align)
    config["teacher"] = {"name_or_path": str(ws["root"] / "teacher")}
    config["deepspeed"]["student_config"] = student_engine
    if cached:
        config["teacher_cache"] = {"path": str(_cache_path(ws, cot2align))}
    return config


def _cache_path(ws: dict, cot2align: bool) -> Path:
    return ws["root"] / ("cache_cot" if cot2align else "cache_plain")


def _out(ws: dict, name: str, cached: bool, kind: str) -> Path:
    slug = name.replace(ZERO2, "-zero2")
    return ws["root"] / f"{kind}-{slug}-{'cached' if cached else 'live'}"


def _trainer(ws: dict, name: str, cached: bool):
    from cot2align_ds.config import validate_config
    from cot2align_ds.engine import deepspeed_engines as dse
    from cot2align_ds.train.loop import Trainer

    out = _out(ws, name, cached, "steps")
    out.mkdir(parents=True, exist_ok=True)
    config = validate_config(_run_config(ws, out, name, 1000, cached))
    return Trainer(config, out, dse.init_distributed(300), None)


def _step_phases(ws: dict, names: list[str], steps: int, warmup: int, threads: int) -> dict:
    """(case, cached) -> the step's summed phases (``bench_breakdown.summarise``)."""
    from bench.bench_breakdown import StepCase, close, interleave, summarise

    live = {}
    try:
        for name in names:
            for cached in (True, False):
                live[name, cached] = StepCase(_trainer(ws, name, cached), name)
        samples = interleave(live, steps, warmup, threads)
    finally:
        close(live)
    return {key: summarise(runs) for key, runs in samples.items()}


def _peak_rss(ws: dict, name: str, steps: int, cached: bool) -> float:
    from bench.memory import PeakRSS
    from cot2align_ds.config import validate_config
    from cot2align_ds.train.loop import run_train

    config = validate_config(_run_config(ws, _out(ws, name, cached, "run"), name, steps, cached))
    with PeakRSS() as peak:
        run_train(config, overwrite=True)
    return peak.mb


def _peak_in_child(root: Path, name: str, steps: int, cached: bool) -> float:
    from cot2align_ds.engine.deepspeed_engines import RENDEZVOUS_VARS

    environment = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    command = [sys.executable, "-m", "bench.bench_teacher_cache", "--memory-child", name,
               str(root), str(steps), "cached" if cached else "live"]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=True
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def _build(ws: dict, cot2align: bool) -> tuple[float, dict]:
    from cot2align_ds.config import validate_config
    from cot2align_ds.teacher_cache.build import build_teacher_cache

    name = "uld+cot2align" if cot2align else "uld"
    config = validate_config(_run_config(ws, ws["root"] / "build", name, 1, cached=True))
    started = time.perf_counter()
    index = build_teacher_cache(config, log=lambda _: None)
    return time.perf_counter() - started, index


def run(quick: bool = False) -> list[dict]:
    from bench.memory import return_big_frees_to_the_os

    os.environ.setdefault("WANDB_MODE", "disabled")
    steps, warmup, memory_steps = (3, 1, 4) if quick else (16, 3, 12)
    return_big_frees_to_the_os()
    with tempfile.TemporaryDirectory() as tmp:
        ws = _workspace(Path(tmp), 96 if quick else 400)
        _save_teacher(ws)
        build_s, index = _build(ws, cot2align=True)
        _build(ws, cot2align=False)
        one_thread = _step_phases(ws, list(CASES), steps, warmup, threads=1)
        two_threads = _step_phases(ws, list(TWO_THREADS), steps, warmup, threads=2)
        # The live CoT2Align run over one epoch of the same views, for the build's peer.
        epoch = _epoch_of_live_teacher(ws)
        peaks = {(name, cached): _peak_in_child(ws["root"], name, memory_steps, cached)
                 for name in TWO_THREADS for cached in (True, False)}  # fmt: skip
    rows = []
    for name, (_, cot2align, _) in CASES.items():
        rows.append(_step_row(one_thread, name, "<= 0.6x live" if cot2align else "report"))
    for name in TWO_THREADS:
        rows.append(_step_row(two_threads, name, "report", suffix=", two threads"))
    for name in CASES:
        cached, live = one_thread[name, True], one_thread[name, False]
        rows.append({
            "section": "teacher cache",
            "case": f"{name} teacher phase per step: cached outputs vs live forward",
            "unit": "s/step",
            "ours": cached["teacher_fwd"] / cached["steps"],
            "peer": live["teacher_fwd"] / live["steps"],
            "peer_name": "live teacher",
            "target": "report",
        })  # fmt: skip
    for name in TWO_THREADS:
        rows.append({
            "section": "teacher cache",
            "case": f"{name} peak host memory (fresh process), cached vs live",
            "unit": "MB",
            "ours": peaks[name, True],
            "peer": peaks[name, False],
            "peer_name": "live teacher",
            "target": "report",
        })  # fmt: skip
    rows.append({
        "section": "teacher cache",
        "case": f"cache build ({index['num_views']} views) vs one live epoch's teacher forwards",
        "unit": "s",
        "ours": build_s,
        "peer": epoch,
        "peer_name": "live epoch (whole steps)",
        "target": "report",
    })  # fmt: skip
    rows.append({
        "section": "teacher cache",
        "case": "cache bytes per cached teacher position (layers x hidden x dtype)",
        "unit": "bytes",
        "ours": index["bytes"] / max(index["tokens"], 1),
        "peer": "-",
        "peer_name": "-",
        "target": "report",
    })  # fmt: skip
    return rows


def _step_row(phases: dict, name: str, target: str, suffix: str = "") -> dict:
    """Time per student token (the batches are the same, so this is the step-time ratio)."""
    return {
        "section": "teacher cache",
        "case": f"{name} step time, cached teacher vs live{suffix}",
        "unit": "s/1k tok",
        "ours": phases[name, True]["per_1k_tokens"],
        "peer": phases[name, False]["per_1k_tokens"],
        "peer_name": "live teacher",
        "target": target,
    }


def _epoch_of_live_teacher(ws: dict) -> float:
    """Wall time of one epoch of the live CoT2Align run (the cache build replaces its teacher
    forwards in every later epoch)."""
    from cot2align_ds.config import validate_config
    from cot2align_ds.train.loop import run_train

    out = ws["root"] / "run-epoch"
    config = _run_config(ws, out, "uld+cot2align", 1, cached=False)
    config["train"].pop("max_steps")
    config["train"].update(epochs=1, log_every=10_000)
    started = time.perf_counter()
    run_train(validate_config(config), overwrite=True)
    return time.perf_counter() - started


def _memory_child(name: str, root: Path, steps: int, cached: bool) -> None:
    from bench.bench_step import _teacher_architecture
    from bench.memory import return_big_frees_to_the_os

    os.environ.setdefault("WANDB_MODE", "disabled")
    return_big_frees_to_the_os()
    ws = {"root": root, "teacher_arch": _teacher_architecture()}
    print(json.dumps({"peak_rss_mb": _peak_rss(ws, name, steps, cached)}))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=4, metavar=("CASE", "ROOT", "STEPS", "MODE"))
    args = parser.parse_args()
    if args.memory_child:
        name, root, steps, mode = args.memory_child
        _memory_child(name, Path(root), int(steps), mode == "cached")
    else:
        from bench.run import print_table

        print_table([{"suite": "teacher_cache", **r} for r in run(args.quick)], {}, args.quick)
