"""One training step of the real pair: Gemma-3 270M teacher (262,144-token vocabulary) into
SmolLM2-135M-Instruct (49,152), bf16, ZeRO-3 student + CPU-offloaded ZeRO-3 teacher, micro-batch
4 x up to 192 tokens (word problems long enough to fill it), on CPU.

Each case runs in a fresh child process (``--child``) that trains two steps and reports:
* ``peak_mb``: the process's peak host RSS (VmHWM) over everything: imports, both tokenizers,
  loading, engines and the two steps;
* ``step_peak_mb``: the peak of step 2 alone (the kernel's mark reset before it; step 1 also
  allocates the optimizer's states);
* ``step_s``: step 2's wall time;
* the resident memory after each phase (``phases``), which says what the peak is made of.

Peer: each method with its vocabulary losses unchunked (``distill.chunk_size`` unset) against
the same step with ``chunk_size`` 64 response positions; and a LoRA student (r 16) against the
full one for the CoT2Align step. Skipped (no rows) where the real models cannot be installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION = "real"
CHUNK = 64
# name: (method, CoT2Align, LoRA)
CASES = {
    "uld": ("uld", False, False),
    "mined": ("mined", False, False),
    "dskd_cma": ("dskd_cma", False, False),
    "uld+cot2align": ("uld", True, False),
    "dskd_cma+cot2align": ("dskd_cma", True, False),
    "dskd_cma+cot2align lora": ("dskd_cma", True, True),
}
QUICK_CASES = ("uld+cot2align",)


def _rss_mb() -> dict[str, float]:
    from bench.memory import status_kb

    return {
        "rss_mb": (status_kb("VmRSS") or 0) / 1024,
        "hwm_mb": (status_kb("VmHWM") or 0) / 1024,
    }


def _config(models: dict, root: Path, method: str, cot2align: bool, lora: bool, chunk) -> dict:
    from cot2align_ds.data.records import write_records
    from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split

    train = root / "train.jsonl"
    # Eight steps per problem: prompts of ~110 tokens, CoT answers reaching the 192-token limit.
    write_records(train, make_split(8, ArithmeticTaskSpec(num_steps=8), seed=0, prefix="bench"))
    student = {"name_or_path": str(models["smollm2-135m-instruct"])}
    if lora:
        student["lora"] = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
    return {
        "output_dir": str(root / "run"),
        "student": student,
        "teacher": {"name_or_path": str(models["gemma3-270m"])},
        "data": {
            "train_file": str(train),
            "template": "compact",
            "max_prompt_tokens": 128,
            "max_total_tokens": 192,
            "num_workers": 0,
            "cot_records": "all" if cot2align else "none",
        },
        "distill": {"method": method, "kd_rate": 0.5, "temperature": 1.0, "chunk_size": chunk},
        "cot2align": {"enabled": cot2align},
        "train": {"max_steps": 2, "micro_batch_size": 4, "precision": "bf16", "log_every": 1},
        "deepspeed": {"dist_timeout_s": 600},
    }


def child(name: str, chunked: bool) -> dict:
    """Train two steps of one case in this (fresh) process; memory and time as described."""
    started = time.perf_counter()
    from bench.memory import reset_peak
    from cot2align_ds.config import validate_config
    from cot2align_ds.models.real_models import ensure_real_models
    from cot2align_ds.train import loop

    phases = {"imports": _rss_mb()}
    models = ensure_real_models(install=False)
    method, cot2align, lora = CASES[name]
    measured: dict = {}
    original_step = loop.Trainer.train_step

    def measured_step(self, window, **kwargs):
        step = len(measured.get("steps", [])) + 1
        if step == 1:
            phases["engines built"] = _rss_mb()
        else:
            reset_peak()
        begun = time.perf_counter()
        result = original_step(self, window, **kwargs)
        measured.setdefault("steps", []).append({"s": time.perf_counter() - begun, **_rss_mb()})
        return result

    loop.Trainer.train_step = measured_step
    with tempfile.TemporaryDirectory(prefix="bench-real-") as root:
        config = _config(models, Path(root), method, cot2align, lora, CHUNK if chunked else None)
        loop.run_train(validate_config(config, f"bench {name}"))
    steps = measured["steps"]
    return {
        "step_s": steps[1]["s"],
        "step_peak_mb": steps[1]["hwm_mb"],
        "first_step_rss_after_mb": steps[0]["rss_mb"],
        "peak_mb": max(step["hwm_mb"] for step in steps),
        "phases": phases,
        "wall_s": time.perf_counter() - started,
    }


def _run_child(name: str, chunked: bool) -> dict:
    from cot2align_ds.engine.deepspeed_engines import RENDEZVOUS_VARS

    env = {key: value for key, value in os.environ.items() if key not in RENDEZVOUS_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "bench.bench_real", "--child", name]
    if chunked:
        command.append("--chunked")
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"bench real {name}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick: bool = False, cases: list[str] | None = None) -> list[dict]:
    from cot2align_ds.models.real_models import RealModelsUnavailable, ensure_real_models

    try:
        ensure_real_models()
    except RealModelsUnavailable as error:
        print(f"bench real: skipped ({error})", file=sys.stderr)
        return []
    rows = []
    results = {}
    for name in cases or (QUICK_CASES if quick else CASES):
        for chunked in (False, True):
            results[name, chunked] = _run_child(name, chunked)
    for name, chunked in results:
        if not chunked:
            continue
        ours, peer = results[name, True], results[name, False]
        for key, unit, label in (
            ("step_peak_mb", "MB", "peak host RSS during step 2"),
            ("peak_mb", "MB", "peak host RSS of the whole run"),
            ("step_s", "s", "step 2 time"),
        ):
            rows.append(
                {
                    "section": SECTION,
                    "case": f"{name}, chunk {CHUNK}: {label}",
                    "unit": unit,
                    "ours": ours[key],
                    "peer": peer[key],
                    "peer_name": "unchunked",
                    "target": "<= 4096 MB" if key == "peak_mb" else "report",
                }
            )
    lora, full = ("dskd_cma+cot2align lora", True), ("dskd_cma+cot2align", True)
    if lora in results and full in results:
        rows.append(
            {
                "section": SECTION,
                "case": "dskd_cma+cot2align, LoRA r16 student vs full: peak host RSS",
                "unit": "MB",
                "ours": results[lora]["peak_mb"],
                "peer": results[full]["peak_mb"],
                "peer_name": "full student",
                "target": "report",
            }
        )
    for (name, chunked), result in results.items():
        phases = ", ".join(f"{k} {v['rss_mb']:.0f}" for k, v in result["phases"].items())
        print(
            f"bench real {name} chunked={chunked}: RSS MB {phases}, after step 1 "
            f"{result['first_step_rss_after_mb']:.0f}, step 2 peak {result['step_peak_mb']:.0f}",
            file=sys.stderr,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(CASES))
    parser.add_argument("--chunked", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.chunked)))
        return
    from bench.run import print_table

    cases = args.cases.split(",") if args.cases else None
    rows = run(args.quick, cases)
    print_table([{"suite": SECTION, **row} for row in rows], {}, args.quick)


if __name__ == "__main__":
    main()
