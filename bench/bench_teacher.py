"""Teacher engine: ZeRO-3 with CPU parameter offload vs resident parameters.

CPU mode (default): the same Llama teacher (hidden 256, 4 layers; tiny: hidden 64, 2 layers,
random weights) built under ``zero3_loading`` and wrapped by ``build_teacher_engine`` with
``teacher_zero3_offload_cpu.json`` and with ``teacher_zero3_resident.json``; no-grad forward on
the same batch. Rows: forward seconds per 1k tokens and peak host RSS above a baseline (engine
build + forwards). Each configuration runs in its own child process (``--child``) so that one
engine's freed memory cannot hide the other's peak; the child starts with
``MALLOC_MMAP_THRESHOLD_=65536`` (big tensors are their own mmaps, returned when freed), resets
the kernel's peak mark (``/proc/self/clear_refs``) after imports and reports VmHWM - VmRSS. The
children run one after another (offload, resident; full mode adds resident, offload and takes
medians), so the time ratio is less interleaved than other suites': read it with that in mind.
On a CPU-only machine "offload to CPU" moves nothing across a bus; the row shows the bookkeeping
cost of the offload path, not the PCIe cost the GPU mode estimates.

GPU mode (``--gpu``, needs CUDA; never runs on the CPU dev machine): sizes from the issue, see
``gpu_rows``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SECTION = "teacher"
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "offload_cpu": "teacher_zero3_offload_cpu.json",
    "resident": "teacher_zero3_resident.json",
}
SIZES = {  # (hidden, layers, vocab, batch, sequence)
    "tiny": (64, 2, 512, 2, 32),
    "cpu": (256, 4, 4096, 8, 128),
}


def _llama(hidden: int, layers: int, vocab: int, intermediate: int | None = None) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate or 3 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": max(hidden // 64, 1),
        "num_key_value_heads": max(hidden // 64, 1),
        "max_position_embeddings": 4096,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }


def build_engine(config_name: str, architecture: dict, batch: int, precision: str) -> Any:
    """A teacher engine exactly as the Trainer builds one (zero.Init loading, then the engine)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cot2align_ds.engine import deepspeed_engines as dse
    from cot2align_ds.engine.ds_config import load_ds_config, resolve_teacher_ds_config
    from cot2align_ds.models.loading import torch_dtype

    raw, path = load_ds_config(config_name)
    ds = resolve_teacher_ds_config(
        raw,
        path,
        micro_batch_size=batch,
        world_size=1,
        precision=precision,
        hidden_size=architecture["hidden_size"],
    )
    kwargs = dict(architecture)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    with dse.zero3_loading(ds):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(precision))
    return dse.build_teacher_engine(model, ds)


def _forward_seconds(engine: Any, input_ids, repeats: int, synchronize=lambda: None) -> float:
    import torch

    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        return _median_seconds(
            lambda: engine(input_ids=input_ids, attention_mask=mask, use_cache=False),
            synchronize,
            repeats,
        )


def _cached_views_seconds(
    arch: dict, views: int, sequence: int, device: str, precision: str, synchronize
) -> float:
    """What a run reading the teacher from ``cot2align cache-teacher``'s cache does per
    micro-batch instead of the teacher's forward: one memory-mapped safetensors read per view
    (its last-layer states; a Llama-style teacher's layer 0 is its embedding lookup, redone),
    the copy to the device, the embedding lookup and the output head. After the warm-up read
    the shard is in the page cache, as it is from the second epoch on when it fits in memory."""
    import tempfile

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cot2align_ds.models.loading import torch_dtype

    dtype, hidden, vocab = torch_dtype(precision), arch["hidden_size"], arch["vocab_size"]
    head = torch.randn(vocab, hidden, dtype=dtype, device=device) * 0.02
    embedding = torch.nn.Embedding(vocab, hidden, device=device, dtype=dtype)
    ids = torch.randint(0, vocab, (views, sequence), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard.safetensors"
        save_file({f"v{i}": torch.randn(sequence, hidden, dtype=dtype) for i in range(views)},
                  str(shard))  # fmt: skip

        def attach() -> None:
            with safe_open(str(shard), framework="pt") as states:
                last = torch.stack([states.get_tensor(f"v{i}") for i in range(views)])
            last = last.to(device)
            with torch.no_grad():
                embedding(ids)
                last @ head.T

        return _median_seconds(attach, synchronize)


def _median_seconds(work, synchronize, repeats: int = 3) -> float:
    """Median wall time of ``work()`` over ``repeats`` calls after one warm-up call (which pays
    for allocator growth and hook setup)."""
    times = []
    for index in range(repeats + 1):
        synchronize()
        started = time.perf_counter()
        work()
        synchronize()
        if index:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def child(config_key: str, size: str, repeats: int) -> dict[str, float]:
    """Build one engine and time its forward; runs in its own process (see module doc)."""
    import torch

    from bench.memory import PeakRSS
    from cot2align_ds.engine import deepspeed_engines as dse

    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(1)  # see bench_ot: stable per-core numbers on a shared machine
    dse.init_distributed(300)
    hidden, layers, vocab, batch, sequence = SIZES[size]
    input_ids = torch.randint(
        0, vocab, (batch, sequence), generator=torch.Generator().manual_seed(0)
    )
    with PeakRSS() as peak:
        engine = build_engine(CONFIGS[config_key], _llama(hidden, layers, vocab), batch, "fp32")
        seconds = _forward_seconds(engine, input_ids, repeats)
    return {"seconds": seconds, "tokens": batch * sequence, "rss_mb": peak.mb}


def _run_child(config_key: str, size: str, repeats: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "bench.bench_teacher", "--child", config_key, "--size", size]
    done = subprocess.run(
        [*command, "--repeats", str(repeats)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"teacher bench child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_rows(quick: bool, tiny: bool) -> list[dict]:
    size = "tiny" if tiny else "cpu"
    repeats = 2 if tiny else (4 if quick else 8)
    order = ["offload_cpu", "resident"] if tiny or quick else ["offload_cpu", "resident"] * 2
    samples: dict[str, list[dict[str, float]]] = {key: [] for key in CONFIGS}
    for key in order:
        samples[key].append(_run_child(key, size, repeats))
    median = {
        key: {m: statistics.median(run[m] for run in runs) for m in runs[0]}
        for key, runs in samples.items()
    }
    hidden, layers, *_ = SIZES[size]
    model = f"llama h{hidden} x{layers}"
    offload, resident = median["offload_cpu"], median["resident"]
    return [
        {
            "section": SECTION,
            "case": f"{model} forward, CPU offload vs resident",
            "unit": "s/1k tok",
            "ours": 1000 * offload["seconds"] / offload["tokens"],
            "peer": 1000 * resident["seconds"] / resident["tokens"],
            "peer_name": "resident",
            "target": "report",
        },
        {
            "section": SECTION,
            "case": f"{model} peak host RSS delta, CPU offload vs resident",
            "unit": "MB",
            "ours": offload["rss_mb"],
            "peer": resident["rss_mb"],
            "peer_name": "resident",
            "target": "report",
        },
    ]


# -- GPU mode -------------------------------------------------------------------------------------
# Dense bf16 peak FLOP/s by device name substring (first match wins; datasheet, no sparsity).
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
GPU_STUDENT = {  # ~0.5B (Qwen2-0.5B shapes)
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
GPU_TEACHER = _llama(4096, 32, 32000, intermediate=11008)  # ~7B (Llama-2-7B shapes)
GPU_TEACHER["num_attention_heads"] = GPU_TEACHER["num_key_value_heads"] = 32
GPU_BATCH, GPU_SEQUENCE = 8, 512
# The GPU mode's code at toy sizes on CPU, fp32 (``gpu_rows(dry_run=True)``): the tests run it,
# so the mode is exercised end to end on machines without a GPU.
DRY_RUN_STUDENT = {
    **GPU_STUDENT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 512,
}
DRY_RUN_TEACHER = _llama(64, 2, 512)
DRY_RUN_BATCH, DRY_RUN_SEQUENCE = 2, 32


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


def host_to_device_bandwidth(num_bytes: int = 1 << 30, device: str = "cuda") -> float:
    """Bytes/s of one pinned host -> device copy (what an offloaded teacher streams per forward).
    On ``device="cpu"`` (dry run) a host-to-host copy."""
    import torch

    on_gpu = device == "cuda"
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=on_gpu)
    target = torch.empty_like(host, device=device)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    target.copy_(host, non_blocking=True)  # warm-up
    sync()
    started = time.perf_counter()
    target.copy_(host, non_blocking=True)
    sync()
    return num_bytes / (time.perf_counter() - started)


def gpu_rows(dry_run: bool = False) -> list[dict]:
    """One CoT2Align step's pieces at the issue's sizes, bf16: the offloaded ~7B teacher's forward
    (one view alone, and one call over the main and cross views); the ~0.5B ZeRO-3 student's
    forward + backward + step on the main view and on the cross view (LM head on the last
    position, and on all for comparison); the OT loss on 8 x (20-120)-position answers at the
    student width. Weights are random (zero.Init).
    ``dry_run``: the same steps on CPU at toy sizes in fp32 (no timing claim; tests run it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.bench_ot_calls import batched_call, make_groups
    from cot2align_ds.engine import deepspeed_engines as dse
    from cot2align_ds.engine.ds_config import load_ds_config, resolve_student_ds_config
    from cot2align_ds.models.loading import torch_dtype

    dse.init_distributed(1800)
    if dry_run:
        device, precision, sync = "cpu", "fp32", lambda: None
        teacher_arch, student_arch = DRY_RUN_TEACHER, DRY_RUN_STUDENT
        batch, sequence, copy_bytes = DRY_RUN_BATCH, DRY_RUN_SEQUENCE, 1 << 24
    else:
        device, precision, sync = "cuda", "bf16", torch.cuda.synchronize
        teacher_arch, student_arch = GPU_TEACHER, GPU_STUDENT
        batch, sequence, copy_bytes = GPU_BATCH, GPU_SEQUENCE, 1 << 30
    ids = torch.randint(0, teacher_arch["vocab_size"], (batch, sequence), device=device)
    teacher = build_engine(CONFIGS["offload_cpu"], teacher_arch, batch, precision)
    teacher_params = sum(p.ds_numel for p in teacher.module.parameters())
    teacher_s = _forward_seconds(teacher, ids, repeats=3, synchronize=sync)
    # CoT2Align runs the main and standard views through the teacher as one call
    # (cot2align.fuse_teacher_views): the weights cross the bus once for both.
    both_views_s = _forward_seconds(teacher, torch.cat([ids, ids]), repeats=3, synchronize=sync)
    cached_s = _cached_views_seconds(teacher_arch, 2 * batch, sequence, device, precision, sync)
    bandwidth = host_to_device_bandwidth(copy_bytes, device)
    weight_bytes = torch_dtype(precision).itemsize
    pcie_bound_s = teacher_params * weight_bytes / bandwidth  # every weight crosses the bus once

    raw, path = load_ds_config("student_zero3.json")
    ds = resolve_student_ds_config(
        raw, path, micro_batch_size=batch, grad_accum=1, world_size=1, precision=precision,
        grad_clip=1.0, hidden_size=student_arch["hidden_size"],
    )  # fmt: skip
    kwargs = dict(student_arch)
    with dse.zero3_loading(ds):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(kwargs.pop("model_type"), **kwargs), dtype=torch_dtype(precision)
        )
    student = dse.build_student_engine(
        model, ds, [{"params": list(model.parameters()), "lr": 1e-5}], [lambda _: 1.0]
    )
    student_params = sum(p.ds_numel for p in student.module.parameters())
    student_ids = ids % student_arch["vocab_size"]

    def train_step(loss_of) -> None:
        student.backward(loss_of())
        student.step()

    def cross_view_loss(**head):
        # The Cross-CoT standard view: only its hidden states enter a loss (OT), and the
        # objective keeps its logits in the graph with weight zero.
        out = student(input_ids=student_ids, output_hidden_states=True, **head)
        return out.hidden_states[-1].float().square().mean() + 0.0 * out.logits.float().sum()

    main_loss = lambda: student(input_ids=student_ids, labels=student_ids).loss  # noqa: E731
    student_s = _median_seconds(lambda: train_step(main_loss), sync)
    headless_s = _median_seconds(
        lambda: train_step(lambda: cross_view_loss(logits_to_keep=1)), sync
    )
    full_head_s = _median_seconds(lambda: train_step(cross_view_loss), sync)

    groups = make_groups(8, student_arch["hidden_size"])
    groups = [tuple(t.to(device) if torch.is_tensor(t) else t for t in g) for g in groups]
    ot_s = _median_seconds(lambda: batched_call(groups), sync)

    # A CoT2Align step: one teacher forward over both views, the student's main pass and its
    # cross-view pass (LM head on the last position), one OT.
    step_s = both_views_s + student_s + headless_s + ot_s
    tokens_per_s = 2 * batch * sequence / step_s
    name = "CPU dry run" if dry_run else torch.cuda.get_device_name()
    peak = peak_flops(name)
    if dry_run:
        memory, capacity = "-", "-"
    else:
        memory = torch.cuda.max_memory_allocated() / 1e9
        capacity = torch.cuda.get_device_properties(0).total_memory / 1e9
    row = {"section": SECTION, "target": "report"}
    return [
        {**row, "case": f"GPU {name}: student tokens/s (CoT2Align step)", "unit": "tok/s",
         "ours": tokens_per_s, "peer": "-", "peer_name": "-"},
        {**row, "case": "student MFU (6 N tokens/s / peak bf16)", "unit": "fraction",
         "ours": 6 * student_params * tokens_per_s / peak if peak else "-",
         "peer": 1.0, "peer_name": f"peak {peak:.3g} FLOP/s" if peak else "unknown GPU"},
        {**row, "case": "OT time per step", "unit": "s", "ours": ot_s, "peer": step_s,
         "peer_name": "whole step", "target": "< 0.005 s"},
        {**row, "case": "offloaded teacher forward vs PCIe bound", "unit": "s", "ours": teacher_s,
         "peer": pcie_bound_s,
         "peer_name": f"{teacher_params * weight_bytes / 1e9:.1f} GB / {bandwidth / 1e9:.1f} GB/s",
         "target": ">= 80% of bound (ratio <= 1.25)"},
        {**row, "case": "both views' teacher states from a teacher cache (read, copy, head) "
         "vs the offloaded teacher's forward", "unit": "s", "ours": cached_s,
         "peer": both_views_s, "peer_name": "offloaded forward", "target": "report"},
        {**row, "case": "one offloaded-teacher forward for both views vs one per view",
         "unit": "s", "ours": both_views_s, "peer": 2 * teacher_s, "peer_name": "two forwards",
         "target": "< 1x"},
        {**row, "case": "student cross-view pass, LM head on the last position vs on all",
         "unit": "s", "ours": headless_s, "peer": full_head_s, "peer_name": "full LM head",
         "target": "< 1x"},
        {**row, "case": "peak GPU memory", "unit": "GB", "ours": memory, "peer": capacity,
         "peer_name": "device total"},
    ]  # fmt: skip


def run(quick: bool = False, tiny: bool = False, gpu: bool = False) -> list[dict]:
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("bench teacher --gpu needs CUDA; this machine has none")
        return gpu_rows()
    return cpu_rows(quick, tiny)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(CONFIGS))
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.repeats)))
        return
    from bench.run import print_table

    rows = run(args.quick, tiny=args.tiny, gpu=args.gpu)
    print_table([{"suite": SECTION, **r} for r in rows], {}, args.quick)


if __name__ == "__main__":
    main()
