"""The teacher cache against the live teacher: step time and peak memory per method on the
same batches, and what building the cache costs (tiny models, world size 1).

For each case, a run reading the teacher from its cache (``teacher_cache.path``: no teacher
engine, only the teacher's head and embedding loaded) against the same run with the live
teacher (ZeRO-3 inference engine, parameters offloaded to CPU): same data, seed and sampler,
so the batches are the same and the inverse throughput ratio is the step-time ratio. Runs are
interleaved and repeated (medians). Peak host memory comes from one fresh child process per run
(``bench_step`` explains why). The build rows time ``cot2align cache-teacher`` against one
epoch of the live CoT2Align run over the same views (what the cache replaces per epoch), and
give the bytes stored per cached position.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_step import _config, _workspace

REPO_ROOT = Path(__file__).resolve().parents[1]
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
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


def _measure(ws: dict, name: str, steps: int, cached: bool) -> dict[str, float]:
    from bench.memory import PeakRSS
    from cot2align_ds.config import validate_config
    from cot2align_ds.train.loop import run_train

    slug = name.replace(ZERO2, "-zero2")
    out = ws["root"] / f"run-{slug}-{'cached' if cached else 'live'}"
    config = validate_config(_run_config(ws, out, name, steps, cached))
    with PeakRSS() as peak:
        run_train(config, overwrite=True)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"tokens_per_s": last["tokens_per_s"], "peak_rss_mb": peak.mb}


def _peak_in_child(root: Path, name: str, steps: int, cached: bool) -> float:
    environment = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
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
    steps, repeats = (4, 1) if quick else (12, 2)
    return_big_frees_to_the_os()
    with tempfile.TemporaryDirectory() as tmp:
        ws = _workspace(Path(tmp), 96 if quick else 400)
        _save_teacher(ws)
        build_s, index = _build(ws, cot2align=True)
        _build(ws, cot2align=False)
        # One-time costs (process group, thread pools) stay out of every measured case.
        _measure(ws, "uld", 1, cached=False)
        samples = {(name, cached): [] for name in CASES for cached in (True, False)}
        for _ in range(repeats):
            for name, cached in samples:
                samples[name, cached].append(_measure(ws, name, steps, cached))
        # The live CoT2Align run over one epoch of the same views, for the build's peer.
        epoch = _epoch_of_live_teacher(ws)
        peaks = {key: _peak_in_child(ws["root"], *key[:1], steps, key[1])
                 for key in samples if key[0] in ("uld+cot2align", "dskd_cma+cot2align")}  # fmt: skip
    speed = {
        key: statistics.median(s["tokens_per_s"] for s in runs) for key, runs in samples.items()
    }
    rows = []
    for name, (_, cot2align, _) in CASES.items():
        rows.append({
            "section": "teacher cache",
            "case": f"{name} step time, cached teacher vs live",
            "unit": "s/1k tok",
            "ours": 1000 / speed[name, True],
            "peer": 1000 / speed[name, False],
            "peer_name": "live teacher",
            "target": "<= 0.6x live" if cot2align else "report",
        })  # fmt: skip
    for (name, cached), peak in peaks.items():
        if cached:
            rows.append({
                "section": "teacher cache",
                "case": f"{name} peak host memory (fresh process), cached vs live",
                "unit": "MB",
                "ours": peak,
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
    print(json.dumps({"peak_rss_mb": _measure(ws, name, steps, cached)["peak_rss_mb"]}))


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
