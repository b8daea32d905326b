"""Resolve a DeepSpeed JSON against the run config.

Ownership is split on purpose: the JSON (``ds_configs/``) owns ZeRO stage, offload and bucket
sizes; the run config owns micro-batch, accumulation, precision, clipping and the optimizer.
A key owned by the run config may be absent or ``"auto"`` in the JSON; any other value that
disagrees is a ``ConfigError``, never a silent override. Bucket sizes left ``"auto"`` are
derived from the model's hidden size (the rule transformers' DeepSpeed integration uses), except
the ZeRO-3 prefetch bucket, which holds one transformer block when the model's sizes are known.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot2align_ds.config import ConfigError, RunConfig

# Shipped with the package (the repository's top-level ds_configs/ links here).
_SHIPPED_DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
_RUN_CONFIG_OWNED = ("optimizer", "scheduler")


def find_ds_config(name_or_path: str) -> Path:
    """A path as given, else a file in ``./ds_configs`` or among the shipped ``ds_configs``."""
    candidates = [Path(name_or_path), Path("ds_configs") / name_or_path]
    candidates.append(_SHIPPED_DS_CONFIGS / name_or_path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"deepspeed config '{name_or_path}': not found (looked in ., ./ds_configs, "
        f"{_SHIPPED_DS_CONFIGS}); set deepspeed.student_config/teacher_config to a JSON file"
    )


# The sections this project reads or fills, with the JSON type each must have: a file of the
# wrong shape is one line here instead of a TypeError deep inside the resolution or DeepSpeed.
_SECTION_TYPES = {
    "zero_optimization": dict,
    "bf16": dict,
    "fp16": dict,
    "optimizer": dict,
    "scheduler": dict,
}
_ZERO_SECTION_TYPES = {"offload_param": dict, "offload_optimizer": dict, "stage": int}


def check_ds_schema(ds: Any, path: Path) -> dict[str, Any]:
    """The shape of a DeepSpeed JSON: an object whose known sections have the right types."""
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object, not a {_kind(ds)}")
    for key, kind in _SECTION_TYPES.items():
        if key in ds and not isinstance(ds[key], kind):
            raise ConfigError(f"{path}: '{key}' must be a JSON object, not a {_kind(ds[key])}")
    zero = ds.get("zero_optimization", {})
    for key, kind in _ZERO_SECTION_TYPES.items():
        value = zero.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            expected = "an integer" if kind is int else "a JSON object"
            raise ConfigError(
                f"{path}: 'zero_optimization.{key}' must be {expected}, not a {_kind(value)}"
            )
    return ds


def _kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def load_ds_config(name_or_path: str) -> tuple[dict[str, Any], Path]:
    path = find_ds_config(name_or_path)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the DeepSpeed config as UTF-8") from None
    return check_ds_schema(ds, path), path


def _settle(ds: dict[str, Any], key: str, value: Any, owner: str, path: Path) -> None:
    """Fill ``key`` with the run config's value, refusing a conflicting explicit value."""
    current = ds.get(key, "auto")
    if current != "auto" and current != value:
        raise ConfigError(
            f"{path}: '{key}'={current!r} conflicts with {owner}={value!r}; "
            f'set it to "auto" or remove it (the run config owns it)'
        )
    ds[key] = value


def _settle_precision(ds: dict[str, Any], precision: str, path: Path) -> None:
    for section, wanted in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        block = ds.setdefault(section, {})
        _settle(block, "enabled", wanted, "train.precision", path)


def _fill_buckets(
    zero: dict[str, Any],
    hidden_size: int,
    world_size: int = 1,
    largest_param: int | None = None,
    block_params: int | None = None,
) -> None:
    square = hidden_size * hidden_size
    auto_values = {
        "reduce_bucket_size": square,
        "allgather_bucket_size": square,
        # One transformer block ahead: the next layer's gather overlaps this layer's compute.
        # The hidden-size rule (0.9 h^2) prefetches a few percent of a block for a 7B model.
        "stage3_prefetch_bucket_size": block_params or int(0.9 * square),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in auto_values.items():
        if zero.get(key) == "auto":
            zero[key] = value
    offload = zero.get("offload_param") or {}
    if offload.get("buffer_size") == "auto":
        offload["buffer_size"] = nvme_buffer_elements(hidden_size, world_size, largest_param)


# Below this an NVMe read is dominated by per-request cost.
_MIN_NVME_BUFFER = 1 << 20


def nvme_buffer_elements(hidden_size: int, world_size: int, largest_param: int | None) -> int:
    """Elements per NVMe swap buffer: each buffer holds one rank's partition of one parameter
    (DeepSpeed swaps ``ds_tensor``, ``ceil(numel / world_size)`` elements), so it must fit the
    largest parameter's partition, not the whole parameter. Without the model's sizes, the
    embedding of a 152k vocabulary at ``hidden_size`` stands in for the largest parameter."""
    largest = largest_param if largest_param is not None else 152_064 * hidden_size
    return max(-(-largest // world_size), _MIN_NVME_BUFFER)


def resolve_student_ds_config(
    raw: dict[str, Any],
    path: Path,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    precision: str,
    grad_clip: float,
    hidden_size: int,
    block_params: int | None = None,
) -> dict[str, Any]:
    ds = copy.deepcopy(raw)
    for key in _RUN_CONFIG_OWNED:
        if key in ds:
            raise ConfigError(f"{path}: remove '{key}'; the run config's train section owns it")
    _settle(ds, "train_micro_batch_size_per_gpu", micro_batch_size, "train.micro_batch_size", path)
    _settle(ds, "gradient_accumulation_steps", grad_accum, "train.grad_accum", path)
    global_batch = micro_batch_size * grad_accum * world_size
    _settle(ds, "train_batch_size", global_batch, "micro_batch*grad_accum*world_size", path)
    _settle(ds, "gradient_clipping", grad_clip, "train.grad_clip", path)
    _settle_precision(ds, precision, path)
    _fill_buckets(ds.setdefault("zero_optimization", {}), hidden_size, block_params=block_params)
    return ds


def resolve_teacher_ds_config(
    raw: dict[str, Any],
    path: Path,
    *,
    micro_batch_size: int,
    world_size: int,
    precision: str,
    hidden_size: int,
    gpus_per_node: int | None = None,
    largest_param: int | None = None,
    block_params: int | None = None,
) -> dict[str, Any]:
    """Inference-only: no optimizer, accumulation 1. ZeRO stage 3 (partitioned, optionally
    offloaded, or partitioned within a node: ``zero_hpz_partition_size``, "auto" = the GPUs of
    a node) or stage 0 (a full copy on every GPU: no gathers at all)."""
    ds = copy.deepcopy(raw)
    for key in (*_RUN_CONFIG_OWNED, "gradient_clipping"):
        if key in ds:
            raise ConfigError(f"{path}: remove '{key}'; the teacher engine never trains")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") not in (0, 3):
        raise ConfigError(
            f"{path}: teacher configs use zero_optimization.stage 3 (partitioned) or 0 "
            "(replicated on every GPU)"
        )
    if zero.get("zero_hpz_partition_size") == "auto":
        zero["zero_hpz_partition_size"] = min(gpus_per_node or world_size, world_size)
    _settle(ds, "train_micro_batch_size_per_gpu", micro_batch_size, "train.micro_batch_size", path)
    _settle(ds, "gradient_accumulation_steps", 1, "teacher accumulation (always 1)", path)
    ds["train_batch_size"] = micro_batch_size * world_size
    _settle_precision(ds, precision, path)
    _fill_buckets(zero, hidden_size, world_size, largest_param, block_params)
    return ds


@dataclass(frozen=True)
class RunDeepSpeedConfigs:
    """Both engines' resolved DeepSpeed configs for a run (teacher None for SFT runs)."""

    student: dict[str, Any]
    student_path: Path
    teacher: dict[str, Any] | None = None
    teacher_path: Path | None = None


def resolve_run_ds_configs(
    run: RunConfig,
    *,
    world_size: int,
    student_hidden: int,
    teacher_hidden: int | None,
    gpus_per_node: int | None = None,
    teacher_largest_param: int | None = None,
    student_block_params: int | None = None,
    teacher_block_params: int | None = None,
) -> RunDeepSpeedConfigs:
    """Resolve the run's student and (when ``teacher_hidden`` is given) teacher JSON."""
    train = run.train
    if run.deepspeed.student_config == "auto":
        raise ValueError("deepspeed.student_config 'auto' is resolved by the planner first")
    raw, student_path = load_ds_config(run.deepspeed.student_config)
    student = resolve_student_ds_config(
        raw,
        student_path,
        micro_batch_size=train.micro_batch_size,
        grad_accum=train.grad_accum,
        world_size=world_size,
        precision=train.precision,
        grad_clip=train.grad_clip,
        hidden_size=student_hidden,
        block_params=student_block_params,
    )
    if teacher_hidden is None:
        return RunDeepSpeedConfigs(student, student_path)
    raw, teacher_path = load_ds_config(run.deepspeed.teacher_config)
    teacher = resolve_teacher_ds_config(
        raw,
        teacher_path,
        micro_batch_size=train.micro_batch_size,
        world_size=world_size,
        precision=train.precision,
        hidden_size=teacher_hidden,
        gpus_per_node=gpus_per_node,
        largest_param=teacher_largest_param,
        block_params=teacher_block_params,
    )
    return RunDeepSpeedConfigs(student, student_path, teacher, teacher_path)
