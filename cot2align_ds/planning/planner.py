"""``cot2align plan``: estimate per-GPU and per-node CPU memory of a run before launching it,
from model sizes (``sizing.py``) and memory terms (``memory.py``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

from transformers import PretrainedConfig

from cot2align_ds.config import RunConfig, load_config
from cot2align_ds.engine.ds_config import (
    load_ds_config,
    resolve_run_ds_configs,
    resolve_teacher_ds_config,
)
from cot2align_ds.methods import get_method
from cot2align_ds.planning.memory import (
    Accelerator,
    MemoryPlan,
    PlanSetting,
    TeacherPlacement,
    build_plan,
    gib_text,
    memory_items,
    peak_bytes,
)
from cot2align_ds.planning.sizing import GIB, ModelSize, PlanError, model_size, spec_config


def _resolve_ds(
    run: RunConfig,
    world_size: int,
    student: ModelSize,
    teacher: ModelSize | None,
    gpus_per_node: int | None = None,
):
    resolved = resolve_run_ds_configs(
        run,
        world_size=world_size,
        student_hidden=student.hidden_size,
        teacher_hidden=teacher.hidden_size if teacher is not None else None,
        gpus_per_node=gpus_per_node,
        teacher_largest_param=teacher.largest_module_params if teacher is not None else None,
        student_block_params=student.block_params,
        teacher_block_params=teacher.block_params if teacher is not None else None,
    )
    return resolved.student, resolved.teacher


def estimate_memory(
    run_config: RunConfig,
    *,
    world_size: int,
    gpus_per_node: int,
    student_config: PretrainedConfig | None = None,
    teacher_config: PretrainedConfig | None = None,
    gradient_checkpointing: bool | None = None,
    accelerator: Accelerator = "cuda",
    gpu_mem_gb: float | None = None,
    cpu_mem_gb: float | None = None,
) -> MemoryPlan:
    """Estimate per-GPU and per-node CPU memory of ``run_config`` at ``world_size`` ranks.

    ``student_config`` / ``teacher_config`` replace the configs read from the run config's
    model specs (hub lookups, tokenizers). ``gradient_checkpointing=None`` reads
    ``train.gradient_checkpointing``. Capacities in
    GiB turn into warnings when the estimate exceeds them.
    """
    _check_topology(world_size, gpus_per_node)
    student_config = student_config or spec_config(run_config.student, "student")
    student = model_size(student_config)
    teacher = None
    if run_config.teacher is not None and get_method(run_config.distill.method).needs_teacher:
        teacher_config = teacher_config or spec_config(run_config.teacher, "teacher")
        teacher = model_size(teacher_config)
    if run_config.deepspeed.student_config == AUTO_STUDENT_CONFIG:
        options = dict(
            world_size=world_size, gpus_per_node=gpus_per_node, student_config=student_config,
            teacher_config=teacher_config, gradient_checkpointing=gradient_checkpointing,
            accelerator=accelerator,
        )  # fmt: skip
        peaks = {
            name: estimate_memory(with_student_config(run_config, name), **options).gpu_bytes
            for name in STUDENT_CONFIGS
        }
        choice = choose_student_config(peaks, accelerator, gpu_mem_gb)
        plan = estimate_memory(
            with_student_config(run_config, choice), **options, gpu_mem_gb=gpu_mem_gb,
            cpu_mem_gb=cpu_mem_gb,
        )  # fmt: skip
        plan.student_stages, plan.student_choice = peaks, choice
        return plan
    student_ds, teacher_ds = _resolve_ds(run_config, world_size, student, teacher, gpus_per_node)
    setting = PlanSetting(
        run_config,
        world_size,
        gpus_per_node,
        accelerator,
        2 if run_config.train.precision in ("bf16", "fp16") else 4,
        student_ds,
        teacher_ds,
    )
    if gradient_checkpointing is None:
        gradient_checkpointing = run_config.train.gradient_checkpointing
    plan = build_plan(setting, student, teacher, gradient_checkpointing)
    if teacher is not None:
        plan.teacher_cache = teacher_cache_estimate(run_config, plan, teacher, teacher_config)
    if teacher is not None and accelerator == "cuda":
        plan.placements = teacher_placements(setting, student, teacher, gradient_checkpointing)
        plan.recommended = recommend_placement(plan.placements, gpu_mem_gb, cpu_mem_gb)
    plan.warnings.extend(capacity_warnings(plan, gpu_mem_gb=gpu_mem_gb, cpu_mem_gb=cpu_mem_gb))
    return plan


AUTO_STUDENT_CONFIG = "auto"
# Student engines, least to most communication: ZeRO-2 keeps full weights on every GPU and
# partitions gradients and optimizer states; ZeRO-3 partitions the weights too and gathers each
# layer at every forward and backward.
STUDENT_CONFIGS = ("student_zero2.json", "student_zero3.json")


def with_student_config(run: RunConfig, name: str) -> RunConfig:
    return run.model_copy(
        update={"deepspeed": run.deepspeed.model_copy(update={"student_config": name})}
    )


def choose_student_config(
    peaks: dict[str, int], accelerator: Accelerator, gpu_mem_gb: float | None
) -> str:
    """``deepspeed.student_config: auto``: ZeRO-2 when its per-GPU peak fits in nine tenths of
    the GPU (80 GB unless told), else ZeRO-3. Without GPUs, ZeRO-3: every rank of a node then
    shares the host's memory, so each replicated copy ZeRO-2 keeps is paid once per rank."""
    zero2, zero3 = STUDENT_CONFIGS
    if accelerator != "cuda":
        return zero3
    capacity = (gpu_mem_gb or 80.0) * GIB * _USABLE_SHARE
    return zero2 if peaks[zero2] <= capacity else zero3


# Teacher placements, in order of preference (the first that fits is recommended): a full copy
# per GPU moves nothing per forward; ZeRO-3 with every weight persistent is loaded partitioned
# (through zero.Init, as large checkpoints are), gathers once at the first forward and then moves
# nothing, for one extra partition per GPU; partitions within a node (hpZ) gather over NVLink
# only; ZeRO-3 across all ranks gathers the whole model over the network every forward; offload
# fetches it from host memory or NVMe as well.
PLACEMENTS = (
    ("replicated", "teacher_replicated.json"),
    ("zero3_persistent", "teacher_zero3_persistent.json"),
    ("zero3_node", "teacher_zero3_hpz.json"),
    ("zero3", "teacher_zero3_resident.json"),
    ("offload_cpu", "teacher_zero3_offload_cpu.json"),
    ("offload_nvme", "teacher_zero3_offload_nvme.json"),
)
# Headroom for fragmentation and what the estimate does not see.
_USABLE_SHARE = 0.9


def teacher_placements(
    setting: PlanSetting, student: ModelSize, teacher: ModelSize, checkpointing: bool
) -> list[TeacherPlacement]:
    """The run's per-GPU and per-node peaks with each shipped teacher placement."""
    out = []
    weights = teacher.num_params * setting.bytes_per_value
    nodes = max(setting.world_size // setting.gpus_per_node, 1)
    for name, json_name in PLACEMENTS:
        if name == "zero3_node" and nodes == 1:
            continue  # the same as zero3 on one node
        raw, path = load_ds_config(json_name)
        teacher_ds = resolve_teacher_ds_config(
            raw, path, micro_batch_size=setting.run.train.micro_batch_size,
            world_size=setting.world_size, precision=setting.run.train.precision,
            hidden_size=teacher.hidden_size, gpus_per_node=setting.gpus_per_node,
            largest_param=teacher.largest_module_params, block_params=teacher.block_params,
        )  # fmt: skip
        variant = replace(setting, teacher_ds=teacher_ds)
        items = memory_items(
            variant, student, teacher, checkpointing, setting.run.distill.chunk_size
        )
        out.append(
            TeacherPlacement(
                name,
                json_name,
                peak_bytes(items, lambda item: item.gpu_bytes),
                peak_bytes(items, lambda item: item.cpu_bytes),
                _traffic(name, weights, setting.world_size, setting.gpus_per_node, nodes),
            )
        )
    return out


def teacher_cache_estimate(
    run: RunConfig, plan: MemoryPlan, teacher: ModelSize, teacher_config: PretrainedConfig
) -> dict:
    """What ``cot2align cache-teacher`` would store (bytes per cached position; at most
    views x data.max_total_tokens of them when the training file is readable) and the run's
    peaks when it trains from the cache: every teacher term replaced by its output head and
    input embedding (``teacher_cache.heads``)."""
    from cot2align_ds.planning.memory import MemoryItem
    from cot2align_ds.teacher_cache.build import needed_layers

    value = 2 if run.train.precision in ("bf16", "fp16") else 4
    hidden_states = int(teacher_config.get_text_config().num_hidden_layers) + 1
    layers = needed_layers(run, hidden_states)
    per_position = len(layers) * teacher.hidden_size * value
    heads = 2 * teacher.vocab_size * teacher.hidden_size * value
    items = [item for item in plan.items if not item.name.startswith("teacher ")]
    items.append(MemoryItem("teacher head + embedding", heads, 0, "loaded alone"))
    estimate = {
        "bytes_per_position": per_position,
        "layers": len(layers),
        "gpu_bytes": peak_bytes(items, lambda item: item.gpu_bytes),
        "cpu_bytes": peak_bytes(items, lambda item: item.cpu_bytes),
    }
    views = _training_views(run)
    if views:
        estimate["views"] = views
        estimate["disk_bytes_at_most"] = views * run.data.max_total_tokens * per_position
    return estimate


def _training_views(run: RunConfig) -> int | None:
    """Teacher views of the training file (each record's main view, and its CoT and standard
    views where CoT2Align trains on them); None when the file cannot be read."""
    from cot2align_ds.data.examples import make_examples
    from cot2align_ds.data.records import read_records
    from cot2align_ds.errors import UserError

    if run.data.train_file is None or not run.data.train_file.is_file():
        return None
    try:
        records = read_records(run.data.train_file)
    except UserError:
        return None
    examples = make_examples(records, template=run.data.template, cot_records=run.data.cot_records)
    cross = run.cot2align.enabled and run.cot2align.cross_cot
    return len(examples) + (sum(e.is_cot for e in examples) if cross else 0)


def _traffic(name: str, weights: int, world: int, per_node: int, nodes: int) -> str:
    if name == "replicated":
        return "nothing"
    if name == "zero3_persistent":
        gathered = weights * (world - 1) // world
        return f"nothing after the first forward ({gib_text(gathered)} GiB gathered once)"
    if name == "zero3_node":
        return f"{gib_text(weights * (per_node - 1) // per_node)} GiB within the node"
    gathered = weights * (world - 1) // world
    across = weights * (nodes - 1) // nodes
    text = f"{gib_text(gathered)} GiB gathered ({gib_text(across)} GiB across nodes)"
    if name == "offload_cpu":
        return f"{text} + {gib_text(weights // world)} GiB host->GPU"
    if name == "offload_nvme":
        return f"{text} + {gib_text(weights // world)} GiB NVMe->GPU"
    return text


def recommend_placement(
    placements: list[TeacherPlacement], gpu_mem_gb: float | None, cpu_mem_gb: float | None
) -> str | None:
    """The first placement (the least traffic) that fits the given capacities (80 GB GPUs
    unless told), keeping a tenth of each free."""
    gpu_capacity = (gpu_mem_gb or 80.0) * GIB * _USABLE_SHARE
    cpu_capacity = None if cpu_mem_gb is None else cpu_mem_gb * GIB * _USABLE_SHARE
    for placement in placements:
        fits_cpu = cpu_capacity is None or placement.cpu_bytes <= cpu_capacity
        if placement.gpu_bytes <= gpu_capacity and fits_cpu:
            return placement.name
    return None


def _check_topology(world_size: int, gpus_per_node: int) -> None:
    if world_size < 1 or gpus_per_node < 1:
        raise PlanError(f"world size {world_size} and GPUs per node {gpus_per_node} must be >= 1")
    if world_size % gpus_per_node and world_size > gpus_per_node:
        raise PlanError(
            f"world size {world_size} is not a multiple of {gpus_per_node} GPUs per node"
        )


def capacity_warnings(
    plan: MemoryPlan, *, gpu_mem_gb: float | None, cpu_mem_gb: float | None
) -> list[str]:
    """One line per exceeded capacity, naming the biggest term and a knob that shrinks it."""
    warnings = []
    if gpu_mem_gb is not None and plan.accelerator == "cuda" and plan.gpu_bytes > gpu_mem_gb * GIB:
        top = max(plan.items, key=lambda item: item.gpu_bytes)
        warnings.append(
            f"per-GPU estimate {gib_text(plan.gpu_bytes)} GiB exceeds --gpu-mem-gb {gpu_mem_gb:g}; "
            f"largest term: {top.name} ({gib_text(top.gpu_bytes)} GiB){_hint(top.name)}"
        )
    if cpu_mem_gb is not None and plan.host_bytes > cpu_mem_gb * GIB:
        top = max(plan.items, key=lambda item: item.cpu_bytes)
        warnings.append(
            f"per-node CPU estimate {gib_text(plan.host_bytes)} GiB exceeds --cpu-mem-gb {cpu_mem_gb:g}; "
            f"largest term: {top.name} ({gib_text(top.cpu_bytes)} GiB){_hint(top.name)}"
        )
    return warnings


_HINTS = {
    "student logits": "distill.chunk_size",
    "teacher logits": "distill.chunk_size",
    "student activations": "train.gradient_checkpointing=true or a smaller train.micro_batch_size",
    "OT buffers": "cot2align.memory_budget_mb or cot2align.grad_mode=envelope",
    "teacher weights": "a teacher_zero3_offload_* DeepSpeed config or more ranks",
    "student optimizer": "more ranks (ZeRO-3) or student.lora",
}


def _hint(name: str) -> str:
    return f"; try {_HINTS[name]}" if name in _HINTS else ""


def run_plan(
    config: str,
    overrides: list[str],
    *,
    world_size: int,
    gpus_per_node: int,
    gpu_mem_gb: float | None = None,
    cpu_mem_gb: float | None = None,
    gradient_checkpointing: bool | None = None,
    as_json: bool = False,
    echo: Callable[[str], None] = print,
) -> MemoryPlan:
    """``cot2align plan``: load and validate the config, estimate, print a table (or JSON)."""
    run = load_config(config, overrides)
    plan = estimate_memory(
        run,
        world_size=world_size,
        gpus_per_node=min(gpus_per_node, world_size),
        gradient_checkpointing=gradient_checkpointing,
        gpu_mem_gb=gpu_mem_gb,
        cpu_mem_gb=cpu_mem_gb,
    )
    echo(json.dumps(plan.to_dict(), indent=2) if as_json else plan.to_table())
    return plan
