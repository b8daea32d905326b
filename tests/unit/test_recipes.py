"""Every shipped recipe validates, and the paper recipes say what docs/method.md section 5 says."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from cot2align_ds.config import load_config, shipped_recipes
from cot2align_ds.planning.planner import estimate_memory

PAPER = {
    # recipe: (student, teacher, method, kd_rate, lr, epochs, LoRA)
    "paper_A": (
        "openai-community/gpt2", "Qwen/Qwen1.5-1.8B", "dskd_cma", 0.5, 5e-4, 20, False,
    ),
    "paper_A_same": (
        "openai-community/gpt2", "openai-community/gpt2-xl", "vanilla_kd", 0.7, 5e-4, 20, False,
    ),
    "paper_B": (
        "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "mistralai/Mistral-7B-v0.1",
        "dskd_cma", 0.9, 1e-3, 10, True,
    ),
    "paper_B_same": (
        "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "meta-llama/Llama-2-7b-hf",
        "vanilla_kd", 0.55, 1e-3, 10, True,
    ),
    "paper_C": (
        "openai-community/gpt2-xl", "Qwen/Qwen2.5-7B-Instruct", "dskd_cma", 0.9, 1e-3, 10, True,
    ),
}  # fmt: skip
# kd_rate ranges of the reference scripts (docs/method.md section 5).
KD_RATE_RANGES = {
    "paper_A": (0.5, 0.5),
    "paper_A_same": (0.7, 0.7),
    "paper_B": (0.5, 0.9),
    "paper_B_same": (0.55, 0.6),
    "paper_C": (0.6, 0.9),
}

# The hub models' published configs, so the memory check runs offline.
HUB_CONFIGS = {
    "openai-community/gpt2": ("gpt2", {}),
    "openai-community/gpt2-xl": ("gpt2", {"n_embd": 1600, "n_layer": 48, "n_head": 25}),
    "Qwen/Qwen1.5-1.8B": (
        "qwen2",
        {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5504,
         "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
         "tie_word_embeddings": False},
    ),
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": (
        "llama",
        {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
         "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4},
    ),
    "mistralai/Mistral-7B-v0.1": (
        "mistral",
        {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    ),
    "meta-llama/Llama-2-7b-hf": (
        "llama",
        {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    ),
    "Qwen/Qwen2.5-7B-Instruct": (
        "qwen2",
        {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
         "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
         "tie_word_embeddings": False},
    ),
}  # fmt: skip


def test_paper_recipes_are_shipped():
    assert set(PAPER) <= set(shipped_recipes())


@pytest.mark.parametrize("recipe", shipped_recipes())
def test_every_shipped_recipe_validates(recipe):
    config = load_config(recipe)
    assert config.student is not None


@pytest.mark.parametrize("recipe", PAPER)
def test_paper_recipe_matches_the_settings_table(recipe):
    student, teacher, method, kd_rate, lr, epochs, lora = PAPER[recipe]
    config = load_config(recipe)
    assert config.student.name_or_path == student
    assert config.teacher.name_or_path == teacher
    assert config.distill.method == method
    assert config.distill.kd_rate == kd_rate
    low, high = KD_RATE_RANGES[recipe]
    assert low <= config.distill.kd_rate <= high
    assert (config.train.lr, config.train.epochs) == (lr, epochs)
    if lora:
        assert (config.student.lora.r, config.student.lora.alpha) == (256, 8)
    else:
        assert config.student.lora is None


# The reference scripts' per-method settings: (kd_rate, divergence) for every setting x method
# the recipe can run (different vocabularies: ULD, MinED, DSKD-CMA; same: vanilla KD, DSKD).
PER_METHOD = {
    "paper_A": {
        "uld": (0.5, "forward_kl"),
        "mined": (0.5, "forward_kl"),
        "dskd_cma": (0.5, "skew_reverse_kl"),
    },
    "paper_A_same": {"vanilla_kd": (0.7, "forward_kl"), "dskd": (0.7, "forward_kl")},
    "paper_B": {"uld": (0.5, "forward_kl"), "mined": (0.5, "forward_kl"), "dskd_cma": (0.9, "forward_kl")},
    "paper_B_same": {"vanilla_kd": (0.55, "forward_kl"), "dskd": (0.55, "forward_kl")},
    "paper_C": {"uld": (0.6, "forward_kl"), "mined": (0.6, "forward_kl"), "dskd_cma": (0.9, "forward_kl")},
}  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "method"), [(r, m) for r, methods in PER_METHOD.items() for m in methods]
)
def test_paper_recipes_resolve_the_reference_settings_per_method(recipe, method):
    config = load_config(recipe, [f"distill.method={method}"])
    assert (config.distill.kd_rate, config.distill.divergence) == PER_METHOD[recipe][method]
    # An explicit value always wins over the recipe's per-method one.
    explicit = load_config(recipe, [f"distill.method={method}", "distill.kd_rate=0.3"])
    assert explicit.distill.kd_rate == 0.3


def test_per_method_values_must_name_known_methods(tmp_path):
    from cot2align_ds.config import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("student: {name_or_path: s}\nper_method: {ulld: {distill: {kd_rate: 0.9}}}\n")
    with pytest.raises(ConfigError, match="per_method.ulld: unknown method"):
        load_config(path)


# Teacher fine-tuning in the reference (DSKD) scripts: 7B teachers with LoRA r 256, alpha 8,
# dropout 0.1 at lr 1e-3; the 1.8B teacher fully at lr 2e-5; 10 epochs, batch 32 each.
TEACHER_SFT = {
    "paper_A": (2e-5, None),
    "paper_A_same": (2e-5, None),
    "paper_B": (1e-3, (256, 8, 0.1)),
    "paper_B_same": (1e-3, (256, 8, 0.1)),
    "paper_C": (1e-3, (256, 8, 0.1)),
}


@pytest.mark.parametrize("recipe", PAPER)
def test_paper_teacher_sft_uses_the_teacher_settings_not_the_students(recipe, tmp_path):
    from cot2align_ds.runs import sft_teacher_config

    lr, lora = TEACHER_SFT[recipe]
    distill = load_config(recipe)
    run = sft_teacher_config(recipe, [], tmp_path / "teacher_sft")
    assert run.student.name_or_path == distill.teacher.name_or_path and run.teacher is None
    assert (run.train.lr, run.train.epochs) == (lr, 10)
    assert run.train.micro_batch_size * run.train.grad_accum * 8 == 32
    if lora is None:
        assert run.student.lora is None
    else:
        assert (run.student.lora.r, run.student.lora.alpha, run.student.lora.dropout) == lora
    # The student's own settings stay with distillation.
    assert distill.train.lr == PAPER[recipe][4]
    assert run.distill.method == "sft" and not run.cot2align.enabled


def test_teacher_sft_overrides_only_what_they_set(tmp_path):
    from cot2align_ds.config import ConfigError
    from cot2align_ds.runs import sft_teacher_config

    sets = ["teacher_sft.train.micro_batch_size=2", "teacher_sft.train.grad_accum=2"]
    run = sft_teacher_config("paper_B", sets, tmp_path)
    distill = load_config("paper_B")
    assert (run.train.micro_batch_size, run.train.grad_accum, run.train.lr) == (2, 2, 1e-3)
    assert run.train.weight_decay == distill.train.weight_decay
    with pytest.raises(ConfigError, match="teacher_sft.train"):
        load_config("paper_B", ["teacher_sft.train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="lr"):
        sft_teacher_config("paper_B", ["teacher_sft.train.lr=1e-9"], tmp_path)  # below min_lr


def test_teacher_sft_train_mirrors_train_fields():
    # The override section repeats a subset of TrainConfig's fields (optional, same bounds):
    # a renamed or retyped train field must not leave a stale override behind.
    from cot2align_ds.config import TeacherSFTTrain, TrainConfig

    for name, field in TeacherSFTTrain.model_fields.items():
        assert name in TrainConfig.model_fields, name
        assert field.default is None
        assert field.metadata == TrainConfig.model_fields[name].metadata, name


@pytest.mark.parametrize("recipe", PAPER)
def test_paper_recipe_common_settings(recipe):
    config = load_config(recipe)
    train, data = config.train, config.data
    assert train.micro_batch_size * train.grad_accum * 8 == 32  # 32 sequences on 8 GPUs
    assert (train.weight_decay, train.grad_clip, train.min_lr, train.warmup_steps) == (
        0.01,
        1.0,
        1e-7,
        0,
    )
    assert train.precision == "bf16" and train.projector_lr == 1e-3
    assert config.distill.temperature == 2.0
    assert (data.max_total_tokens, data.max_prompt_tokens, data.template) == (512, 256, "alpaca")
    assert str(data.train_file).startswith("data/dolly/")
    assert str(data.dev_file).startswith("data/dolly/")
    assert config.cot2align.enabled and data.cot_records == "non_empty_input"
    assert config.eval.metric == "rouge_l"
    assert str(config.output_dir) == f"runs/{recipe}"


@pytest.mark.parametrize("recipe", PAPER)
def test_paper_recipe_fits_8_gpus_of_80_gb_by_the_planner(recipe):
    config = load_config(recipe)
    configs = [
        AutoConfig.for_model(HUB_CONFIGS[spec.name_or_path][0], **HUB_CONFIGS[spec.name_or_path][1])
        for spec in (config.student, config.teacher)
    ]
    plan = estimate_memory(
        config,
        world_size=8,
        gpus_per_node=8,
        student_config=configs[0],
        teacher_config=configs[1],
        gpu_mem_gb=80,
        cpu_mem_gb=1024,
    )
    assert plan.warnings == [], plan.to_table()
