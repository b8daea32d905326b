"""ZeRO-3 student engine and ZeRO-3 CPU-offloaded teacher engine at world size 1, in process."""

from __future__ import annotations

import json

import pytest
import torch
from support import STUDENT_ARCH, is_partitioned, tiny_run_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from cot2align_ds.config import ModelSpec, validate_config
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.engine.ds_config import (
    load_ds_config,
    resolve_student_ds_config,
    resolve_teacher_ds_config,
)
from cot2align_ds.models.loading import load_causal_lm, load_tokenizer
from cot2align_ds.models.student_module import StudentWithProjectors, param_groups


def _teacher_ds():
    raw, path = load_ds_config("teacher_zero3_offload_cpu.json")
    return resolve_teacher_ds_config(
        raw, path, micro_batch_size=2, world_size=1, precision="fp32", hidden_size=48
    )


def test_offloaded_teacher_is_partitioned_and_matches_unsharded(workspace):
    dse.init_distributed(120)
    spec = ModelSpec(name_or_path=str(workspace["teacher"]))
    tokenizer = load_tokenizer(spec, "teacher")
    ds_config = _teacher_ds()
    assert ds_config["zero_optimization"]["offload_param"]["device"] == "cpu"
    with dse.zero3_loading(ds_config):
        teacher = load_causal_lm(spec, "teacher", tokenizer, "fp32")
    # Loaded straight into partitions: no rank ever holds a full copy.
    assert all(is_partitioned(p) for p in teacher.parameters())
    engine = dse.build_teacher_engine(teacher, ds_config)
    # Inference only: DeepSpeed's parameter-offload coordinator, never a torch optimizer.
    assert not isinstance(engine.optimizer, torch.optim.Optimizer)
    assert not any(p.requires_grad for p in teacher.parameters())
    reference = AutoModelForCausalLM.from_pretrained(workspace["teacher"]).eval()
    batch = tokenizer(
        ["Mia has 3 pens.", "Tom finds 2 cups and"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        ours = engine(**batch, output_hidden_states=True)
        theirs = reference(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[mask], theirs.logits[mask])
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    torch.testing.assert_close(ours.hidden_states[-1][mask], theirs.hidden_states[-1][mask])


def test_projectors_train_in_the_student_engine_at_their_own_lr(workspace):
    dse.init_distributed(120)
    spec = ModelSpec(architecture=STUDENT_ARCH, tokenizer=str(workspace["student_tok"]))
    tokenizer = load_tokenizer(spec, "student")
    raw, path = load_ds_config("student_zero3.json")
    ds_config = resolve_student_ds_config(
        raw,
        path,
        micro_batch_size=2,
        grad_accum=1,
        world_size=1,
        precision="fp32",
        grad_clip=1.0,
        hidden_size=32,
    )
    with dse.zero3_loading(ds_config):
        student = load_causal_lm(spec, "student", tokenizer, "fp32")
    torch.manual_seed(0)
    projector = torch.nn.Linear(32, 32)
    module = StudentWithProjectors(student, torch.nn.ModuleDict({"probe": projector}))
    groups = param_groups(module, lr=1e-3, projector_lr=5e-2, weight_decay=0.01)
    names = [group.pop("name") for group in groups]
    engine = dse.build_student_engine(module, ds_config, groups, [lambda _: 1.0] * len(groups))
    assert dict(zip(names, engine.get_lr(), strict=True))["projectors"] == 5e-2
    before = dse.gathered_state_dict(engine, prefix="projectors.")["probe.weight"]
    ids = torch.tensor(tokenizer(["Mia has 3 pens."])["input_ids"])
    out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    loss = (
        engine.module.projectors["probe"](out.hidden_states[-1]).pow(2).mean() + out.logits.mean()
    )
    engine.backward(loss)
    engine.step()
    after = dse.gathered_state_dict(engine, prefix="projectors.")["probe.weight"]
    assert not torch.allclose(before, after)


def test_uld_distillation_lowers_loss_and_saves_a_loadable_student(workspace, tmp_path):
    from cot2align_ds.train.loop import run_train

    config = validate_config(
        tiny_run_config(workspace, tmp_path / "run", train={"max_steps": 10, "lr": 5e-3})
    )
    result = run_train(config)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [row["loss/total"] for row in rows if "loss/total" in row]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert {"loss/ce", "loss/kd_uld", "tokens_per_s", "data_wait_share"} <= set(rows[-1])
    # The checkpoint is a plain Hugging Face model directory (safetensors).
    assert (result.model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    ids = torch.tensor([tokenizer("Tom has 2 cups.")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert (
        json.loads((tmp_path / "run" / "ds_teacher.json").read_text())["zero_optimization"][
            "offload_param"
        ]["device"]
        == "cpu"
    )


def test_mixed_dtype_module_is_one_line_error_naming_the_weight():
    """DeepSpeed's own check is a bare assertion deep in ZeRO-3 flattening."""
    import torch
    from torch import nn

    from cot2align_ds.engine.deepspeed_engines import EngineDtypeError, require_run_dtype

    module = nn.Sequential(nn.Linear(2, 2).to(torch.bfloat16), nn.Linear(2, 2))
    ds_config = {"bf16": {"enabled": True}}
    with pytest.raises(EngineDtypeError, match=r"2 weight\(s\) are float32 \(first: '1.weight'\)"):
        require_run_dtype(module, ds_config, "student")
    require_run_dtype(module.to(torch.bfloat16), ds_config, "student")
    with pytest.raises(EngineDtypeError, match="the run is float32"):
        require_run_dtype(module, {"bf16": {"enabled": False}}, "teacher")


PLACED = ["teacher_replicated.json", "teacher_zero3_persistent.json", "teacher_zero3_hpz.json"]


@pytest.mark.parametrize("placement", PLACED)
def test_every_teacher_placement_trains_the_same_steps(workspace, tmp_path, placement):
    """The placements ``cot2align plan`` compares change where the teacher's weights live, not
    what it computes: DSKD-CMA + CoT2Align (teacher logits, hidden states, embeddings and head)
    gives the default placement's per-step losses."""
    from cot2align_ds.train.loop import run_train

    def losses(name: str, teacher_config: str | None) -> list[float]:
        config = tiny_run_config(
            workspace,
            tmp_path / name,
            distill={"method": "dskd_cma", "kd_rate": 0.5, "temperature": 1.0},
            cot2align={"enabled": True, "num_iters": 10},
            data={**tiny_run_config(workspace, tmp_path)["data"], "cot_records": "all"},
            train={"max_steps": 2, "micro_batch_size": 4, "lr": 5e-3, "log_every": 1},
        )
        if teacher_config:
            config["deepspeed"]["teacher_config"] = teacher_config
        run_train(validate_config(config))
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(row)["loss/total"] for row in rows]

    reference = losses("default", None)
    torch.testing.assert_close(losses("placed", placement), reference, rtol=1e-5, atol=1e-6)


def test_a_persistent_zero3_teacher_is_gathered_once_and_kept(workspace):
    """``teacher_zero3_persistent.json``: loaded partitioned, gathered by the first traced
    forward, then kept whole (no gathers afterwards); the resident placement releases all but
    its small weights after every forward."""
    dse.init_distributed(60)
    spec = ModelSpec(name_or_path=str(workspace["teacher"]))
    tokenizer = load_tokenizer(spec, "teacher")
    ids = torch.tensor(tokenizer(["3 + 4 = 7", "2 * 5 = 10"], padding=True)["input_ids"])
    partitioned = {}
    for name in ("teacher_zero3_persistent.json", "teacher_zero3_resident.json"):
        raw, path = load_ds_config(name)
        ds = resolve_teacher_ds_config(
            raw, path, micro_batch_size=2, world_size=1, precision="fp32", hidden_size=64
        )
        with dse.zero3_loading(ds):
            model = load_causal_lm(spec, "teacher", tokenizer, "fp32")
        assert all(is_partitioned(p) for p in model.parameters())  # loaded partitioned
        engine = dse.build_teacher_engine(model, ds)
        counts = []
        with torch.no_grad():
            for _ in range(3):
                engine(input_ids=ids, use_cache=False)
                counts.append(sum(is_partitioned(p) for p in engine.module.parameters()))
        partitioned[name] = counts
    total = sum(1 for _ in model.parameters())
    # The first forward records the module trace and releases; from the second on, kept.
    assert partitioned["teacher_zero3_persistent.json"] == [total, 0, 0]
    # Resident ZeRO-3 keeps only weights under its persistence threshold (norms) gathered.
    small = sum(p.ds_numel <= 10 * 64 for p in model.parameters())
    assert 0 < small < total
    assert partitioned["teacher_zero3_resident.json"] == [total, total - small, total - small]
