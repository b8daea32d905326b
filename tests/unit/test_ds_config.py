import json
from pathlib import Path

import pytest

from cot2align_ds.config import ConfigError
from cot2align_ds.engine.ds_config import (
    load_ds_config,
    resolve_student_ds_config,
    resolve_teacher_ds_config,
)

DS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
STUDENT_CONFIGS = sorted(p.name for p in DS_DIR.glob("student_*.json"))
TEACHER_CONFIGS = sorted(p.name for p in DS_DIR.glob("teacher_*.json"))


def _student(raw, path, **overrides):
    kwargs = dict(
        micro_batch_size=4,
        grad_accum=2,
        world_size=2,
        precision="bf16",
        grad_clip=1.0,
        hidden_size=64,
    )
    kwargs.update(overrides)
    return resolve_student_ds_config(raw, path, **kwargs)


def _no_auto_left(tree) -> bool:
    if isinstance(tree, dict):
        return all(_no_auto_left(value) for value in tree.values())
    return tree != "auto"


@pytest.mark.parametrize("name", STUDENT_CONFIGS)
@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("grad_accum", [1, 4])
def test_student_configs_resolve(name, world_size, grad_accum):
    raw, path = load_ds_config(name)
    ds = _student(raw, path, world_size=world_size, grad_accum=grad_accum)
    assert ds["train_batch_size"] == 4 * grad_accum * world_size
    assert ds["gradient_accumulation_steps"] == grad_accum
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert _no_auto_left(ds)


@pytest.mark.parametrize("name", TEACHER_CONFIGS)
@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_teacher_configs_resolve(name, world_size):
    raw, path = load_ds_config(name)
    ds = resolve_teacher_ds_config(
        raw, path, micro_batch_size=4, world_size=world_size, precision="fp32", hidden_size=64
    )
    assert ds["zero_optimization"]["stage"] == (0 if name == "teacher_replicated.json" else 3)
    if "zero_hpz_partition_size" in raw["zero_optimization"]:
        assert ds["zero_optimization"]["zero_hpz_partition_size"] == world_size  # 1 node here
    assert ds["train_batch_size"] == 4 * world_size
    assert "optimizer" not in ds
    assert _no_auto_left(ds)


def test_default_teacher_offloads_params_to_cpu():
    raw, _ = load_ds_config("teacher_zero3_offload_cpu.json")
    assert raw["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_conflicting_micro_batch_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {}}))
    raw, path = load_ds_config(str(path))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu.*conflicts with train"):
        _student(raw, path)


def test_equal_explicit_value_is_accepted(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}))
    raw, path = load_ds_config(str(path))
    assert _student(raw, path)["gradient_clipping"] == 1.0


def test_precision_conflict_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    raw, path = load_ds_config(str(path))
    with pytest.raises(ConfigError, match="train.precision"):
        _student(raw, path, precision="fp32")


def test_optimizer_in_json_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    raw, path = load_ds_config(str(path))
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        _student(raw, path)


def test_teacher_must_be_zero3(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    raw, path = load_ds_config(str(path))
    with pytest.raises(ConfigError, match="stage 3"):
        resolve_teacher_ds_config(
            raw, path, micro_batch_size=1, world_size=1, precision="fp32", hidden_size=8
        )


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_ds_config("nope.json")
    path = tmp_path / "bad.json"
    path.write_text("{")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_ds_config(str(path))


@pytest.mark.parametrize(("world_size", "expected"), [(1, 544_997_376), (16, 34_062_336)])
def test_nvme_buffers_hold_one_ranks_partition_of_the_largest_weight(world_size, expected):
    """DeepSpeed swaps each rank's partition (``ds_tensor``) through the buffers: sized for the
    largest weight's partition (Qwen2.5-7B's 152,064 x 3,584 embedding) at any world size."""
    raw, path = load_ds_config("teacher_zero3_offload_nvme.json")
    ds = resolve_teacher_ds_config(
        raw, path, micro_batch_size=1, world_size=world_size, precision="bf16",
        hidden_size=3584, largest_param=152_064 * 3584,
    )  # fmt: skip
    assert ds["zero_optimization"]["offload_param"]["buffer_size"] == expected


def test_nvme_offload_without_async_io_is_one_line():
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from cot2align_ds.engine.deepspeed_engines import NvmeOffloadError, require_nvme_io

    raw, _ = load_ds_config("teacher_zero3_offload_nvme.json")
    require_nvme_io(load_ds_config("teacher_zero3_offload_cpu.json")[0], "teacher")  # no NVMe
    if AsyncIOBuilder().is_compatible(verbose=False):
        require_nvme_io(raw, "teacher")  # builds here: nothing to say
        return
    with pytest.raises(NvmeOffloadError, match="async_io op cannot be built") as info:
        require_nvme_io(raw, "teacher")
    assert "deepspeed.teacher_config" in str(info.value) and "\n" not in str(info.value)
