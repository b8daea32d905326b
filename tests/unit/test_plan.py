"""The memory planner: parameter counts against instantiated models and published sizes, how each
term scales (ZeRO partitioning, chunking, checkpointing, offload, OT), and the warnings."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from cot2align_ds.cli import app
from cot2align_ds.config import validate_config
from cot2align_ds.methods import projector_params
from cot2align_ds.planning.memory import (
    MemoryItem,
    activation_bytes,
    layer_activation_bytes,
    logits_bytes,
    peak_bytes,
)
from cot2align_ds.planning.planner import estimate_memory, run_plan
from cot2align_ds.planning.sizing import GIB, meta_model_size, model_size
from cot2align_ds.train.objective import Objective

# Small configs that exercise every field the formulas read (GQA, biases, tying, head_dim).
SMALL_CONFIGS = {
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 300}),
    "gpt2_untied_inner": (
        "gpt2",
        {"n_embd": 48, "n_layer": 3, "n_head": 4, "n_inner": 80, "vocab_size": 257,
         "tie_word_embeddings": False},
    ),
    "llama_gqa_bias": (
        "llama",
        {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 311,
         "attention_bias": True, "mlp_bias": True},
    ),
    "llama_tied_head_dim": (
        "llama",
        {"hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2,
         "num_attention_heads": 4, "head_dim": 24, "vocab_size": 199, "tie_word_embeddings": True},
    ),
    "mistral": (
        "mistral",
        {"hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256},
    ),
    "qwen2": (
        "qwen2",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 333,
         "tie_word_embeddings": False},
    ),
}  # fmt: skip

# The paper's models (docs/method.md section 5): their published configs and parameter counts.
PAPER_MODELS = {
    "gpt2": ("gpt2", {}, 124_439_808),
    "gpt2-xl": ("gpt2", {"n_embd": 1600, "n_layer": 48, "n_head": 25}, 1_557_611_200),
    "Qwen1.5-1.8B": (
        "qwen2",
        {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5504,
         "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
         "tie_word_embeddings": False},
        1_836_828_672,
    ),
    "TinyLlama-1.1B": (
        "llama",
        {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
         "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4},
        1_100_048_384,
    ),
    "Mistral-7B": (
        "mistral",
        {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
        7_241_732_096,
    ),
    "Llama-2-7B": (
        "llama",
        {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
        6_738_415_616,
    ),
    "Qwen2.5-7B": (
        "qwen2",
        {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
         "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
         "tie_word_embeddings": False},
        7_615_616_512,
    ),
}  # fmt: skip


def _config(model_type: str, kwargs: dict):
    return AutoConfig.for_model(model_type, **kwargs)


def _instantiated(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_config_field_counts_equal_instantiated_models(name):
    config = _config(*SMALL_CONFIGS[name])
    size = model_size(config)
    model = _instantiated(config)
    assert size.source == "config fields"
    assert size.num_params == sum(p.numel() for p in model.parameters())
    own = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    assert size.largest_module_params == max(own)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_model_counts_match_published_sizes_and_meta_instantiation(name):
    model_type, kwargs, published = PAPER_MODELS[name]
    config = _config(model_type, kwargs)
    assert model_size(config).num_params == published
    assert meta_model_size(config).num_params == published


def test_unknown_architectures_are_counted_on_the_meta_device():
    config = _config(
        "opt",
        {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "vocab_size": 120, "max_position_embeddings": 64, "word_embed_proj_dim": 32},
    )  # fmt: skip
    size = model_size(config)
    assert size.source == "meta instantiation"
    assert size.num_params == sum(p.numel() for p in _instantiated(config).parameters())
    assert (size.num_layers, size.hidden_size, size.intermediate_size) == (2, 32, 64)


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("gpt2", "all-linear"),
        ("llama_gqa_bias", "all-linear"),
        ("qwen2", ["q_proj", "v_proj"]),
        ("gpt2", None),  # peft's per-architecture default, the reference code's choice
        ("llama_gqa_bias", None),
    ],
)
def test_lora_counts_equal_peft(name, targets):
    config = _config(*SMALL_CONFIGS[name])
    peft_model = get_peft_model(_instantiated(config), LoraConfig(r=8, target_modules=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert model_size(config).lora_params(8, targets) == trainable


def test_activation_formula_is_34_sbh_for_a_gelu_mlp_and_checkpointing_keeps_inputs():
    gpt2 = model_size(_config("gpt2", {}))  # intermediate = 4 * hidden
    b, s, h = 4, 512, 768
    assert layer_activation_bytes(gpt2, b, s, 2) == 34 * s * b * h
    full = activation_bytes(gpt2, b, s, 2, checkpointing=False)
    checkpointed = activation_bytes(gpt2, b, s, 2, checkpointing=True)
    assert full == 12 * 34 * s * b * h
    assert checkpointed == 12 * 2 * s * b * h + 34 * s * b * h
    assert activation_bytes(gpt2, b, s, 4, checkpointing=False) == 2 * full  # fp32


def test_chunking_bounds_the_fp32_copies():
    common = {"batch": 4, "seq_len": 512, "vocab_size": 50000, "bytes_per_value": 2}
    full = logits_bytes(**common, fp32_copies=6, chunk_size=None, trainable=True)
    chunked = logits_bytes(**common, fp32_copies=6, chunk_size=256, trainable=True)
    assert full - chunked == 6 * (4 * 512 - 256) * 50000 * 4
    assert logits_bytes(**common, fp32_copies=6, chunk_size=10**6, trainable=True) == full


# -- whole plans --------------------------------------------------------------------------------


STUDENT = _config(*SMALL_CONFIGS["gpt2"])
BIG_STUDENT = _config("gpt2", {})
BIG_STUDENT_PARAMS = 124_439_808
TEACHER = _config(*PAPER_MODELS["Qwen1.5-1.8B"][:2])


def _run(**sections):
    data = {
        "student": {"name_or_path": "student-placeholder"},
        "teacher": {"name_or_path": "teacher-placeholder"},
        "distill": {"method": "uld"},
        "train": {"micro_batch_size": 4, "precision": "bf16"},
        # The memory terms under test are ZeRO-3's unless a test asks otherwise.
        "deepspeed": {"student_config": "student_zero3.json"},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return validate_config(data)


def _plan(
    run=None, *, world_size=8, gpus_per_node=8, student=BIG_STUDENT, teacher=TEACHER, **kwargs
):
    return estimate_memory(
        run or _run(),
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        student_config=student,
        teacher_config=teacher,
        **kwargs,
    )


def _item(plan, name):
    [item] = [item for item in plan.items if item.name == name]
    return item


def test_zero3_divides_student_states_by_the_world_size():
    one, eight = _plan(world_size=1, gpus_per_node=1), _plan(world_size=8)
    params = eight.student.num_params
    for name, per_param in (("weights", 2), ("gradients", 2), ("optimizer", 12)):
        assert _item(one, f"student {name}").gpu_bytes == params * per_param
        assert _item(eight, f"student {name}").gpu_bytes == params * per_param // 8
    teacher = _plan(_run(deepspeed={"teacher_config": "teacher_zero3_resident.json"}))
    assert _item(teacher, "teacher weights").gpu_bytes == teacher.teacher.num_params * 2 // 8


def test_zero3_keeps_parameters_gathered_within_the_reuse_distance():
    # Both JSONs set stage3_max_reuse_distance = stage3_max_live_parameters = 1e9 elements.
    plan = _plan()
    reduce_bucket = 768 * 768 * 2  # "auto" = hidden^2 elements, bf16
    student_buffers = _item(plan, "student ZeRO buffers").gpu_bytes
    assert student_buffers == plan.student.num_params * 2 + reduce_bucket  # all of GPT-2 stays
    capped = _plan(student=TEACHER)  # 1.84B > 1e9: at most 1e9 elements stay gathered
    assert _item(capped, "student ZeRO buffers").gpu_bytes == int(1e9) * 2 + 2048 * 2048 * 2
    # A forward-only teacher larger than the reuse distance keeps one module + the prefetch
    # bucket, one transformer block.
    prefetch = plan.teacher.block_params
    assert _item(plan, "teacher ZeRO buffers").gpu_bytes == (151936 * 2048 + prefetch) * 2
    small_teacher = _plan(teacher=BIG_STUDENT)
    assert _item(small_teacher, "teacher ZeRO buffers").gpu_bytes == BIG_STUDENT_PARAMS * 2


def test_optimizer_step_is_its_own_phase():
    plan = _plan()
    step = _item(plan, "optimizer step")
    share = plan.student.num_params // 8
    assert step.phase == "optimizer step" and step.gpu_bytes == 4 * share + 8 * share
    activations = sum(i.gpu_bytes for i in plan.items if i.phase == "forward/backward")
    assert activations > step.gpu_bytes
    steady = sum(i.gpu_bytes for i in plan.items if i.phase == "steady")
    assert plan.gpu_bytes == steady + activations  # the step's temporaries come after backward


def test_zero2_replicates_weights_and_partitions_the_rest():
    run = _run(deepspeed={"student_config": "student_zero2.json"})
    one, eight = _plan(run, world_size=1, gpus_per_node=1), _plan(run)
    assert _item(eight, "student weights").gpu_bytes == _item(one, "student weights").gpu_bytes
    for name in ("gradients", "optimizer"):
        assert (
            _item(eight, f"student {name}").gpu_bytes * 8 == _item(one, f"student {name}").gpu_bytes
        )


def test_lora_trains_adapters_only():
    lora = _plan(_run(student={"lora": {"r": 16}}))
    full = _plan()
    adapters = lora.student.lora_params(16, None)  # peft's default modules, the default
    assert _item(lora, "student optimizer").gpu_bytes == adapters * 12 // 8
    assert _item(lora, "student weights").gpu_bytes == (lora.student.num_params + adapters) * 2 // 8
    assert _item(lora, "student optimizer").gpu_bytes < _item(full, "student optimizer").gpu_bytes


def test_cpu_offloaded_teacher_lives_in_pinned_host_memory():
    offload = _plan()  # the default teacher config offloads parameters to CPU
    resident = _plan(_run(deepspeed={"teacher_config": "teacher_zero3_resident.json"}))
    partitions = offload.teacher.num_params * 2 // 8
    assert _item(offload, "teacher weights").gpu_bytes == 0
    assert _item(offload, "teacher weights").cpu_bytes == partitions * 8  # 8 ranks per node
    assert _item(resident, "teacher weights").cpu_bytes == 0
    nvme = _plan(_run(deepspeed={"teacher_config": "teacher_zero3_offload_nvme.json"}))
    assert _item(nvme, "teacher weights").cpu_bytes == 0
    assert _item(nvme, "teacher NVMe buffers").cpu_bytes > 0


def test_chunking_lowers_the_logits_term_and_the_total():
    plain, chunked = _plan(), _plan(_run(distill={"chunk_size": 128}))
    for name in ("student logits", "teacher logits"):
        assert _item(chunked, name).gpu_bytes < _item(plain, name).gpu_bytes
    assert chunked.gpu_bytes < plain.gpu_bytes
    assert plain.alternatives["distill.chunk_size=1024"] < plain.gpu_bytes


def test_gradient_checkpointing_lowers_activations():
    plain, checkpointed = _plan(), _plan(gradient_checkpointing=True)
    assert checkpointed.gpu_bytes < plain.gpu_bytes
    assert plain.alternatives["train.gradient_checkpointing=true"] == checkpointed.gpu_bytes


def test_ot_term_follows_the_gradient_mode_and_the_cot_views():
    no_ot = _plan()
    assert "OT buffers" not in [item.name for item in no_ot.items]
    main_only = {"enabled": True, "cross_cot": False}
    envelope = _plan(_run(cot2align={**main_only, "grad_mode": "envelope"}))
    unrolled = _plan(_run(cot2align={**main_only, "grad_mode": "unrolled"}))
    cross = _plan(_run(cot2align={"enabled": True}, data={"cot_records": "all"}))
    ot = [_item(plan, "OT buffers").gpu_bytes for plan in (envelope, unrolled, cross)]
    assert ot[0] < ot[1] and ot[0] < ot[2]
    # CoT records add a forward pass of each model (their standard view): twice the activations.
    doubled = _item(cross, "student activations").gpu_bytes
    assert doubled == 2 * _item(envelope, "student activations").gpu_bytes


def test_cross_views_hold_full_logits_only_where_the_loop_computes_them():
    main_only = _plan(_run(cot2align={"enabled": True, "cross_cot": False}))
    cot = {"cot2align": {"enabled": True}, "data": {"cot_records": "all"}}
    fused = _plan(_run(**cot))
    apart = _plan(_run(cot2align={"enabled": True, "fuse_teacher_views": False}, data=cot["data"]))
    # The student's standard-view pass computes its LM head on the last position only.
    for plan in (fused, apart):
        assert (
            _item(plan, "student logits").gpu_bytes == _item(main_only, "student logits").gpu_bytes
        )
    # One teacher call over both views holds both views' logits and a twice-as-tall working set.
    teacher_logits = _item(main_only, "teacher logits").gpu_bytes
    assert _item(apart, "teacher logits").gpu_bytes == teacher_logits
    assert teacher_logits < _item(fused, "teacher logits").gpu_bytes <= 2 * teacher_logits
    assert (
        _item(apart, "teacher activations").gpu_bytes
        < _item(fused, "teacher activations").gpu_bytes
    )


@pytest.mark.parametrize(
    ("method", "ot"), [("dskd", False), ("dskd_cma", True), ("uld", True), ("vanilla_kd", False)]
)
def test_projector_counts_equal_the_objectives_projectors(method, ot):
    run = _run(distill={"method": method}, cot2align={"enabled": ot, "cross_cot": False})
    objective = Objective(run.distill, run.cot2align)
    projectors = objective.build_projectors(48, 80)
    assert projector_params(method, ot, 48, 80) == sum(p.numel() for p in projectors.parameters())


def test_warnings_fire_only_above_capacity():
    plan = _plan()
    assert _plan(gpu_mem_gb=1000, cpu_mem_gb=10_000).warnings == []
    tight = _plan(gpu_mem_gb=plan.gpu_bytes / GIB * 0.9, cpu_mem_gb=plan.cpu_bytes / GIB * 0.9)
    assert len(tight.warnings) == 2
    assert tight.warnings[0].startswith("per-GPU estimate") and "--gpu-mem-gb" in tight.warnings[0]
    assert (
        "largest term: teacher logits" in tight.warnings[0]
        and "distill.chunk_size" in tight.warnings[0]
    )
    assert tight.warnings[1].startswith("per-node CPU estimate")
    assert all("warning: " + w in tight.to_table() for w in tight.warnings)


def test_peak_is_the_steady_terms_plus_the_largest_phase():
    items = [
        MemoryItem("a", 10, 1),
        MemoryItem("b", 5, 0, phase="forward/backward"),
        MemoryItem("c", 7, 0, phase="forward/backward"),
        MemoryItem("d", 9, 100, phase="optimizer step"),
    ]
    assert peak_bytes(items, lambda item: item.gpu_bytes) == 10 + 12
    assert peak_bytes(items, lambda item: item.cpu_bytes) == 1 + 100


def test_sft_plans_no_teacher_and_table_and_dict_agree():
    plan = _plan(_run(distill={"method": "sft"}), student=STUDENT)
    assert plan.teacher is None and not any("teacher" in item.name for item in plan.items)
    table, data = plan.to_table(), plan.to_dict()
    round_trip = json.loads(json.dumps(data))
    items = [MemoryItem(**item) for item in round_trip["items"]]
    assert round_trip["gpu_bytes"] == plan.gpu_bytes == peak_bytes(items, lambda i: i.gpu_bytes)
    assert table.splitlines()[0].startswith("memory plan: world size 8")
    [peak] = [line for line in table.splitlines() if line.startswith("peak")]
    assert f"{plan.gpu_bytes / GIB:.2f}" in peak and f"{plan.cpu_bytes / GIB:.2f}" in peak


def test_run_plan_reads_architecture_specs_and_prints(tmp_path, toy_student_tokenizer):
    toy_student_tokenizer.save_pretrained(tmp_path / "tok")
    architecture = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2}
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps(
            {
                "student": {"architecture": architecture, "tokenizer": str(tmp_path / "tok")},
                "distill": {"method": "sft"},
            }
        )
    )
    printed: list[str] = []
    plan = run_plan(
        str(config), ["train.precision=fp32"], world_size=2, gpus_per_node=2, echo=printed.append
    )
    assert plan.student.vocab_size == len(toy_student_tokenizer)
    assert plan.world_size == 2 and "student weights" in printed[0]
    as_json: list[str] = []
    run_plan(str(config), [], world_size=1, gpus_per_node=1, as_json=True, echo=as_json.append)
    assert json.loads(as_json[0])["world_size"] == 1


# Qwen2.5-0.5B and Qwen2.5-7B-Instruct, from their published configs.
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4)  # fmt: skip


@pytest.mark.parametrize(("student_type", "student"), [("qwen2", QWEN_05B), ("llama", TINYLLAMA)],
                         ids=["7B-to-0.5B", "7B-to-1.1B"])  # fmt: skip
def test_plan_compares_teacher_placements_for_a_7b_teacher_on_2_nodes(student_type, student):
    from transformers import AutoConfig

    from cot2align_ds.config import load_config
    from cot2align_ds.planning.planner import estimate_memory

    run = load_config("paper_C", ["distill.method=dskd_cma"])
    plan = estimate_memory(
        run, world_size=16, gpus_per_node=8,
        student_config=AutoConfig.for_model(student_type, **student),
        teacher_config=AutoConfig.for_model("qwen2", **QWEN_7B), gpu_mem_gb=80,
    )  # fmt: skip
    by_name = {p.name: p for p in plan.placements}
    assert list(by_name) == [
        "replicated", "zero3_persistent", "zero3_node", "zero3", "offload_cpu", "offload_nvme"
    ]  # fmt: skip
    gib = 1 << 30
    # A bf16 7.6B teacher: 14.2 GiB on every GPU replicated, /8 within a node, /16 partitioned.
    weights = plan.teacher.num_params * 2
    assert by_name["replicated"].gpu_bytes - by_name["zero3"].gpu_bytes > 0.8 * weights - gib
    assert (
        by_name["zero3"].gpu_bytes
        < by_name["zero3_node"].gpu_bytes
        < by_name["replicated"].gpu_bytes
    )
    # Offloaded: the node holds its 8 ranks' partitions, half the weights, in pinned memory.
    assert by_name["offload_cpu"].cpu_bytes >= by_name["zero3"].cpu_bytes + weights // 2
    # It fits 80 GB GPUs whole: no weights move per forward.
    assert plan.recommended == "replicated" and by_name["replicated"].traffic == "nothing"
    # Persistent ZeRO-3: the full copy plus this rank's partition; gathered once.
    persistent = by_name["zero3_persistent"]
    assert persistent.gpu_bytes == by_name["replicated"].gpu_bytes + weights // 16
    assert persistent.traffic.startswith("nothing after the first forward")
    assert (
        "across nodes" in by_name["zero3"].traffic
        and "within the node" in by_name["zero3_node"].traffic
    )
    table = plan.to_table()
    assert "replicated (recommended)" in table
    assert "recommended: deepspeed.teacher_config=teacher_replicated.json" in table
    # On 40 GB GPUs the full copy no longer fits: partitions within the node do.
    small = estimate_memory(
        run, world_size=16, gpus_per_node=8,
        student_config=AutoConfig.for_model(student_type, **student),
        teacher_config=AutoConfig.for_model("qwen2", **QWEN_7B), gpu_mem_gb=40,
    )  # fmt: skip
    assert small.recommended == "zero3_node"
    # The paper's students fit 80 GB GPUs with full weights: `auto` trains them with ZeRO-2.
    zero2, zero3 = (
        plan.student_stages["student_zero2.json"],
        plan.student_stages["student_zero3.json"],
    )
    assert plan.student_choice == "student_zero2.json" and zero2 < 0.9 * 80 * GIB
    # ZeRO-3 keeps up to 1e9 live elements gathered (stage3_max_live_parameters): a 0.5-1.1B
    # student is held whole anyway, so partitioning its weights saves little here.
    assert zero3 > 0.9 * zero2
    assert "student_config auto: student_zero2.json (per-GPU peak with student_zero2.json" in table


def test_auto_student_config_takes_zero3_where_zero2_does_not_fit():
    from cot2align_ds.planning.planner import choose_student_config

    run = _run(deepspeed={"student_config": "auto"})
    plan = _plan(run, world_size=16, gpus_per_node=8)
    zero2 = plan.student_stages["student_zero2.json"]
    fits = zero2 / GIB / 0.9 + 0.01
    assert _plan(run, world_size=16, gpus_per_node=8, gpu_mem_gb=fits).student_choice == (
        "student_zero2.json"
    )
    tight = _plan(run, world_size=16, gpus_per_node=8, gpu_mem_gb=fits - 0.05)
    assert tight.student_choice == "student_zero3.json"
    # The chosen plan is the one reported: its peak is ZeRO-3's.
    assert tight.gpu_bytes == tight.student_stages["student_zero3.json"]
    # Without GPUs, every rank shares the host: the partitioned engine.
    assert choose_student_config({"student_zero2.json": 1}, "cpu", None) == "student_zero3.json"


def test_plan_and_show_config_describe_the_same_job_by_default(tmp_path, toy_student_tokenizer):
    toy_student_tokenizer.save_pretrained(tmp_path / "tok")
    architecture = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2}
    run = {
        "student": {"architecture": architecture, "tokenizer": str(tmp_path / "tok")},
        "distill": {"method": "sft"},
        "train": {"precision": "fp32"},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(run))
    shown = CliRunner().invoke(app, ["show-config"])
    planned = CliRunner().invoke(app, ["plan", "--config", str(tmp_path / "run.yaml"), "--json"])
    assert shown.exit_code == 0 and planned.exit_code == 0, shown.output + planned.output
    student_json = shown.output.split("# student_deepspeed")[1].split("\n", 1)[1]
    student = json.loads(student_json.split("# teacher_deepspeed")[0])
    per_rank = student["train_micro_batch_size_per_gpu"] * student["gradient_accumulation_steps"]
    assert json.loads(planned.output)["world_size"] == 8
    assert student["train_batch_size"] == 8 * per_rank
    two_nodes = CliRunner().invoke(app, ["show-config", "--nodes", "2", "--gpus-per-node", "4"])
    assert f'"train_batch_size": {8 * per_rank}' in two_nodes.output
    one = CliRunner().invoke(app, ["show-config", "--world-size", "1"])
    assert f'"train_batch_size": {per_rank}' in one.output
    bad = CliRunner().invoke(app, ["plan", "--config", str(tmp_path / "run.yaml"), "--nodes", "0"])
    assert bad.exit_code == 2 and "--nodes" in bad.stderr


def test_zero3_prefetch_bucket_holds_one_transformer_block():
    """The "auto" prefetch bucket is one block of the model, not 0.9 h^2 (a few percent of a
    7B block), so the next layer's gather overlaps the current layer's compute."""
    from transformers import AutoConfig

    from cot2align_ds.config import load_config
    from cot2align_ds.engine.ds_config import load_ds_config, resolve_teacher_ds_config
    from cot2align_ds.planning.sizing import model_size

    size = model_size(AutoConfig.for_model("qwen2", **QWEN_7B))
    h, kv, inner = 3584, 4 * 128, 18944
    assert size.block_params == 2 * h * h + 2 * h * kv + 3 * h * inner  # attention + gated MLP
    raw, path = load_ds_config("teacher_zero3_resident.json")
    run = load_config("paper_C")
    common = dict(micro_batch_size=4, world_size=16, precision=run.train.precision, hidden_size=h)
    resolved = resolve_teacher_ds_config(raw, path, block_params=size.block_params, **common)
    assert resolved["zero_optimization"]["stage3_prefetch_bucket_size"] == size.block_params
    unsized = resolve_teacher_ds_config(raw, path, **common)
    assert unsized["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
