"""Two CPU ranks (gloo) through real launchers: torchrun and the deepspeed launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support import STUDENT_ARCH, subprocess_env, tiny_run_config

pytestmark = pytest.mark.distributed
HERE = Path(__file__).resolve().parent
NO_DROPOUT = {**STUDENT_ARCH, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return subprocess_env()


def _torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    port = _port()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        *args,
    ]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, _failure(result)
    # DeepSpeed's CPU all-reduce workspace (~70 MB of RAM each) must not outlive the run.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return result


def _failure(result: subprocess.CompletedProcess) -> str:
    noise = ("Warning", "return func", "step/s", "warnings.warn")
    lines = [line for line in result.stderr.splitlines() if not any(n in line for n in noise)]
    return f"exit {result.returncode}:\n" + "\n".join(lines[-60:])


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss/total"] for row in rows if "loss/total" in row]


def _write_config(workspace, run_dir: Path, **train) -> Path:
    config = tiny_run_config(
        workspace,
        run_dir,
        student={"architecture": NO_DROPOUT, "tokenizer": str(workspace["student_tok"])},
        train={"max_steps": 4, "micro_batch_size": 4, "lr": 5e-3, **train},
    )
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def test_teacher_engine_at_world_size_2_equals_unsharded(workspace, tmp_path):
    out = tmp_path / "teacher_check.json"
    _torchrun([str(HERE / "teacher_check.py"), str(workspace["teacher"]), str(out)])
    for rank in range(2):
        result = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert result["world_size"] == 2 and result["partitioned"]
        assert result["max_logit_error"] < 1e-4 and result["max_hidden_error"] < 1e-4


def test_world_size_2_equals_world_size_1_with_accumulation_2(workspace, tmp_path):
    two_ranks = _write_config(workspace, tmp_path / "ws2", grad_accum=1)
    _torchrun(["-m", "cot2align_ds.cli", "train", "--config", str(two_ranks)])
    one_rank = _write_config(workspace, tmp_path / "ws1", grad_accum=2)
    _torchrun(["-m", "cot2align_ds.cli", "train", "--config", str(one_rank)], nproc=1)
    ws2, ws1 = _losses(tmp_path / "ws2"), _losses(tmp_path / "ws1")
    assert len(ws2) == len(ws1) == 4
    torch.testing.assert_close(torch.tensor(ws2), torch.tensor(ws1), rtol=2e-4, atol=2e-5)
    assert ws2[-1] < ws2[0]


# The launcher script installed next to this interpreter (a venv need not be on PATH).
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


@pytest.mark.skipif(not DEEPSPEED.is_file(), reason="deepspeed launcher not installed")
def test_deepspeed_launcher_runs_two_ranks(workspace, tmp_path):
    config = _write_config(workspace, tmp_path / "ds_launch", max_steps=2)
    env = _env()
    env["PATH"] = os.pathsep.join([str(DEEPSPEED.parent), env.get("PATH", "")])
    command = [
        str(DEEPSPEED),
        "--num_gpus",
        "2",
        f"--master_port={_port()}",
        "--module",
        "cot2align_ds.cli",
        "train",
        "--config",
        str(config),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_losses(tmp_path / "ds_launch")) == 2
    assert (tmp_path / "ds_launch" / "student" / "model.safetensors").is_file()


def test_cot2align_finishes_when_a_rank_has_no_cot_record(workspace, tmp_path):
    """One record with an input (so one CoT example), two without: at micro-batch 1 the ranks
    see CoT and non-CoT examples in different steps, and must still make the same forwards."""
    from cot2align_ds.data.records import read_records, write_records

    records = read_records(workspace["train"])[:3]
    records = [records[0]] + [
        r.model_copy(update={"input": "", "rationale": None}) for r in records[1:]
    ]
    train_file = tmp_path / "mixed.jsonl"
    write_records(train_file, records)
    config = tiny_run_config(
        workspace,
        tmp_path / "mixed",
        student={"architecture": NO_DROPOUT, "tokenizer": str(workspace["student_tok"])},
        train={"max_steps": 4, "micro_batch_size": 1, "lr": 5e-3},
    )
    config["data"].update(train_file=str(train_file), cot_records="non_empty_input")
    config["cot2align"] = {"enabled": True, "num_iters": 10}
    config["deepspeed"]["dist_timeout_s"] = 60
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(config))
    _torchrun(["-m", "cot2align_ds.cli", "train", "--config", str(path)], timeout=200)
    rows = [
        json.loads(line) for line in (tmp_path / "mixed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4
    # Across the steps some windows hold the CoT example and some do not.
    cross = [row["loss/ot_cross_std_cot"] for row in rows]
    assert all(torch.isfinite(torch.tensor(cross))) and max(cross) > 0 and min(cross) == 0


# (method, the student's tokenizer): vanilla KD and DSKD need the teacher's vocabulary.
CACHE_METHODS = {
    "uld": "student_tok",
    "mined": "student_tok",
    "dskd_cma": "student_tok",
    "vanilla_kd": "teacher_tok",
    "dskd": "teacher_tok",
}


def test_teacher_cache_built_and_read_by_two_ranks_trains_the_live_steps(workspace, tmp_path):
    """``cache-teacher`` on two ranks (each its share of the views, partitioned teacher), then
    every method with and without CoT2Align trained by two ranks from that cache: each run's
    per-step losses equal the live two-rank run's. One cache per view set (with and without the
    CoT views) serves every method; the runs of each kind share one launch."""
    from cot2align_ds.teacher_cache.store import completed_shards

    def config(name: str, method: str, cot2align: bool, cache: Path | None) -> Path:
        raw = tiny_run_config(
            workspace,
            tmp_path / name,
            student={
                "architecture": NO_DROPOUT,
                "tokenizer": str(workspace[CACHE_METHODS[method]]),
            },
            distill={"method": method, "kd_rate": 0.5, "temperature": 1.0},
            train={"max_steps": 3, "micro_batch_size": 4, "lr": 5e-3},
        )
        if cot2align:
            raw["cot2align"] = {"enabled": True, "num_iters": 20}
            raw["data"]["cot_records"] = "all"
        if cache is not None:
            raw["teacher_cache"] = {"path": str(cache), "shard_views": 16}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    caches = {c2a: tmp_path / f"cache_{'cot' if c2a else 'plain'}" for c2a in (True, False)}
    for cot2align, cache in caches.items():
        # DSKD-CMA reads the most teacher layers; its cache serves every method.
        build = config(f"build_{cot2align}", "dskd_cma", cot2align, cache)
        _torchrun(["-m", "cot2align_ds.cli", "cache-teacher", "--config", str(build)])
        ranks = {shard["file"].split("-")[1] for shard in completed_shards(cache)}
        assert ranks == {"r0", "r1"}  # each rank wrote its share
    runs = [(method, c2a) for method in CACHE_METHODS for c2a in (True, False)]
    names = {run: f"{run[0]}_{'c2a' if run[1] else 'plain'}" for run in runs}
    for kind in ("live", "cached"):
        paths = [
            config(f"{kind}_{names[run]}", *run, caches[run[1]] if kind == "cached" else None)
            for run in runs
        ]
        _torchrun([str(HERE / "train_each.py"), *map(str, paths)], timeout=600)
    for run in runs:
        live = _losses(tmp_path / f"live_{names[run]}")
        from_cache = _losses(tmp_path / f"cached_{names[run]}")
        assert len(live) == len(from_cache) == 3, names[run]
        torch.testing.assert_close(
            torch.tensor(from_cache), torch.tensor(live), rtol=1e-5, atol=1e-7, msg=names[run]
        )
