"""Typed run configuration: pydantic models, YAML recipes, dotted ``--set`` overrides.

A run is described by one YAML file (a shipped recipe name from ``cot2align_ds/configs`` or a
path) plus ``section.key=value`` overrides. Everything is validated before any model loads:
unknown keys, wrong types and conflicting values raise ``ConfigError`` with one line that names
the key. The DeepSpeed JSON files own ZeRO/offload; this config owns batch sizes, precision,
clipping and the optimizer (see ``engine.ds_config``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cot2align_ds.errors import UserError
from cot2align_ds.methods import METHOD_NAMES, get_method


class ConfigError(UserError):
    """A user-facing configuration problem; the message is one line naming the key."""


class _Strict(BaseModel):
    # allow_inf_nan=False: every float field must be finite (``.inf`` or ``nan`` from a --set
    # would otherwise train, and can write non-finite weights).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraConfig(_Strict):
    """LoRA adapters (peft) on the student, as in the paper's settings B and C."""

    r: int = Field(256, ge=1)
    alpha: float = Field(8.0, gt=0.0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="the reference code's 0.1")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="None: peft's per-architecture defaults, as the reference code uses (query "
        "and value projections for Llama/Mistral/Qwen2, c_attn for GPT-2); 'all-linear' or a "
        "list of module names otherwise",
    )


class ModelSpec(_Strict):
    """Where a model comes from: a hub name / local directory, or a small architecture."""

    name_or_path: str | None = None
    tokenizer: str | None = Field(None, description="defaults to name_or_path")
    architecture: dict[str, Any] | None = Field(
        None, description="build from a config instead (model_type + kwargs); for tests/demo"
    )
    trust_remote_code: bool = False
    lora: LoraConfig | None = None
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None,
        description="attention kernel; null: transformers' default for the model (sdpa where "
        "supported). flash_attention_2 needs the flash-attn package and a GPU",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.name_or_path is None) == (self.architecture is None):
            raise ValueError("set exactly one of name_or_path or architecture")
        if self.architecture is not None and self.tokenizer is None:
            raise ValueError("a model built from 'architecture' needs 'tokenizer' (a path)")
        if self.architecture is not None and "model_type" not in self.architecture:
            raise ValueError("architecture needs a 'model_type' (e.g. gpt2, llama, qwen2)")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path  # type: ignore[return-value]


class DataConfig(_Strict):
    train_file: Path | None = None
    dev_file: Path | None = None
    hub_dataset: str | None = Field(
        None,
        description="a Hugging Face dataset (hub name, or a local folder datasets reads) "
        "instead of train_file / dev_file; its rows in any record shape",
    )
    hub_config: str | None = Field(None, description="the hub dataset's configuration name")
    train_split: str = "train"
    dev_split: str | None = Field(None, description="e.g. validation; evaluated during training")
    template: Literal["alpaca", "compact", "chat"] = Field(
        "alpaca",
        description="alpaca (the paper's prompts), compact (tiny models), or chat: each "
        "model's own chat template, teacher and student alike",
    )
    max_prompt_tokens: int = Field(256, gt=0)
    max_total_tokens: int = Field(512, gt=1)
    cot_records: Literal["none", "non_empty_input", "all"] = Field(
        "none", description="which records also train on their CoT view (needs a rationale)"
    )
    num_workers: int = Field(1, ge=0)
    prefetch_factor: int = Field(2, ge=1)
    prompt_truncation: Literal["left", "right"] = Field(
        "left",
        description="long prompts: keep the end, next to the answer (left) or the start, as "
        "the reference does (right, which can cut the response marker away)",
    )
    prompt_special_tokens: bool = Field(
        True, description="tokenize prompts with the tokenizer's BOS (the reference adds none)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.hub_dataset is not None and (self.train_file or self.dev_file):
            raise ValueError("set either hub_dataset or train_file / dev_file, not both")
        return self

    @model_validator(mode="after")
    def _lengths(self) -> DataConfig:
        if self.max_prompt_tokens >= self.max_total_tokens:
            raise ValueError("max_prompt_tokens must be smaller than max_total_tokens")
        return self


KDMethod = Literal[METHOD_NAMES]  # the method registry, ``methods.py``
Divergence = Literal[
    "forward_kl", "reverse_kl", "js", "skew_forward_kl", "skew_reverse_kl", "adaptive_kl"
]
Precision = Literal["fp32", "bf16", "fp16"]


class DistillConfig(_Strict):
    method: KDMethod = "uld"
    kd_rate: float = Field(0.5, ge=0.0, le=1.0, description="a in (1-a)*CE + a*(KD+OT)")
    temperature: float = Field(2.0, gt=0.0, description="KL-type divergences (vanilla KD, DSKD)")
    uld_temperature: float = Field(
        1.0, gt=0.0, description="ULD's softmax temperature; the reference code applies none (1)"
    )
    divergence: Divergence = "forward_kl"
    skew: float = Field(0.1, gt=0.0, lt=1.0, description="for the skewed KL divergences")
    chunk_size: int | None = Field(None, gt=0, description="response positions per chunk")
    mined_top_k: int | None = Field(None, ge=1, description="teacher top-k kept by MinED")
    mined_alignment: Literal["offsets", "dp", "dp_reference"] = Field(
        "offsets",
        description="MinED token alignment: character offsets (exact), DP over the target "
        "tokens, or the reference's DP over the input tokens, keeping a pair only where the "
        "vocabulary map sends the teacher's input id to the student's",
    )
    mined_projection: Literal["sum", "first"] = Field(
        "sum",
        description="MinED: teacher ids mapped to one student id pool their probability (sum) "
        "or only the first of them counts (first, the reference)",
    )
    dskd_std: Literal["response", "padded"] = Field(
        "response",
        description="DSKD-CMA key/value std over response positions, or over the whole padded "
        "tensor (the reference: it then depends on prompt lengths and padding)",
    )


class LayerPair(_Strict):
    """One OT layer pair: hidden_states indices (0 = embedding output, -1 = last layer)."""

    student: int
    teacher: int
    weight: float = Field(1.0, ge=0.0)


class CoT2AlignConfig(_Strict):
    """Sequence-level, layer-wise OT with Cross-CoT alignment (docs/method.md section 3)."""

    enabled: bool = False
    ot_weight: float = Field(
        0.25, ge=0.0, description="the reference divides the summed OT groups by 4"
    )
    cross_cot: bool = Field(True, description="the two Cross-CoT OT directions")
    main_weight: float = Field(1.0, ge=0.0, description="student main <-> teacher main")
    cross_std_cot_weight: float = Field(1.0, ge=0.0, description="student standard <-> teacher CoT")
    cross_cot_std_weight: float = Field(1.0, ge=0.0, description="student CoT <-> teacher standard")
    reference_compat: bool = Field(
        False, description="reproduce the reference code (student CoT <-> teacher standard is 0)"
    )
    cost: Literal["attention", "cosine", "euclidean"] = "attention"
    epsilon: float = Field(10.0, gt=0.0, description="kernel exp(-C/epsilon); reference: 10")
    num_iters: int = Field(100, ge=1)
    num_grad_iters: int = Field(
        10,
        ge=1,
        description="differentiated iterations of grad_mode truncated: equal to the unrolled "
        "gradient at epsilon 10; raise it at small epsilon (or use unrolled)",
    )
    grad_mode: Literal["truncated", "envelope", "unrolled"] = Field(
        "truncated",
        description="truncated: the reference's unrolled gradient at bounded memory (measured "
        "equal to 2e-5 in fp32); envelope: cheapest, ~0.5x that gradient at epsilon=10",
    )
    layer_pairs: list[LayerPair] = Field(
        default_factory=lambda: [LayerPair(student=0, teacher=0), LayerPair(student=-1, teacher=-1)]
    )
    memory_budget_mb: float | None = Field(None, gt=0.0, description="Sinkhorn batch chunking")
    max_marginal_error: float = Field(
        0.01,
        gt=0.0,
        description="tolerance on the plans' marginal L1 error: the adaptive budget (max_iters) "
        "iterates until it holds; training warns once (and in the run summary) when the logged "
        "plan still exceeds it",
    )
    max_iters: int | None = Field(
        2000,
        ge=1,
        description="adaptive budget: plans still off their marginals (max_marginal_error) after "
        "num_iters keep iterating, without autograd, up to this many iterations in all (at "
        "least num_iters; epsilon 0.001 on the attention cost needs about 1000-2000); plans "
        "within tolerance run exactly num_iters; null: always num_iters",
    )
    cross_cot_pooling: Literal["window", "micro_batch"] = Field(
        "window",
        description="Cross-CoT terms averaged over the CoT records of the accumulation window "
        "and all ranks (window), or per micro-batch and then over micro-batches (the reference)",
    )
    fuse_teacher_views: bool = Field(
        True,
        description="one teacher forward for the main and standard views (right-padded to the "
        "longer): the offloaded teacher's weights cross PCIe once per micro-batch, not twice",
    )
    fuse_student_views: bool = Field(
        True,
        description="one student forward for the main and standard views: ZeRO-3 sees the same "
        "module order every micro-batch, so its prefetch trace stays valid; costs the LM head "
        "on the standard view's positions, which two calls skip",
    )


class EvalConfig(_Strict):
    """Evaluation on the dev set during training, best-K checkpoints, early stopping."""

    every_steps: int | None = Field(None, ge=1)
    every_epoch: bool = False
    metric: Literal["exact_match", "rouge_l"] = "rouge_l"
    keep_best: int = Field(1, ge=0)
    early_stopping_patience: int | None = Field(None, ge=1, description="evaluations")
    max_records: int | None = Field(None, ge=1, description="evaluate a dev subset")
    greedy: bool = Field(
        True, description="greedy dev decoding (one deterministic pass); the reference samples"
    )
    seeds: list[int] = Field(default_factory=lambda: [10, 20, 30, 40, 50])
    max_new_tokens: int = Field(256, ge=1)
    max_length: int | None = Field(
        None, ge=2, description="cap on prompt + new tokens (the reference's max_length 512)"
    )
    no_repeat_ngram_size: int = Field(
        6, ge=0, description="dev decoding; the paper's test protocol uses 6, its dev runs 0"
    )
    batch_size: int = Field(8, ge=1)


class TrainConfig(_Strict):
    seed: int = 42
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    projector_lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    min_lr: float = Field(1e-7, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")
    precision: Precision = "bf16"
    log_every: int = Field(10, ge=1)
    max_skipped_steps: int = Field(
        10, ge=0, description="steps skipped for non-finite loss/gradients before the run stops"
    )
    save_every: int | None = Field(None, ge=1, description="resumable checkpoint every N steps")
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the student's layer activations in backward instead of keeping "
        "them (`cot2align plan` shows what it saves)",
    )
    keep_last: int = Field(2, ge=1, description="resumable checkpoints kept (rotation)")
    record_example_ids: bool = Field(
        False, description="audit: write the example ids of every step to examples_seen.*.jsonl"
    )

    @model_validator(mode="after")
    def _floor(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        return self


class TeacherSFTTrain(_Strict):
    """Overrides of ``train`` for ``cot2align sft-teacher``; a key left unset keeps the run's.

    The student's settings rarely suit the teacher: the paper's students train at 5e-4 (full) or
    1e-3 (LoRA), while a fully fine-tuned 1.8B teacher in the reference scripts trains at 2e-5.
    """

    seed: int | None = None
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)
    grad_accum: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0.0)
    weight_decay: float | None = Field(None, ge=0.0)
    min_lr: float | None = Field(None, ge=0.0)
    warmup_steps: int | None = Field(None, ge=0)
    grad_clip: float | None = Field(None, ge=0.0)
    precision: Precision | None = None


class TeacherSFTConfig(_Strict):
    """How ``cot2align sft-teacher`` fine-tunes the teacher (LoRA: ``teacher.lora``)."""

    train: TeacherSFTTrain = Field(default_factory=TeacherSFTTrain)


class DeepSpeedSection(_Strict):
    student_config: str = Field(
        "auto",
        description="the student engine's DeepSpeed JSON; auto: student_zero2.json when its "
        "per-GPU estimate fits the GPU, else student_zero3.json (see cot2align plan)",
    )
    teacher_config: str = "teacher_zero3_offload_cpu.json"
    dist_timeout_s: int = Field(1800, ge=10, description="process-group timeout")


class TeacherCacheConfig(_Strict):
    """Run the teacher once (``cot2align cache-teacher``) and train from its stored states."""

    path: Path | None = Field(
        None,
        description="a teacher cache directory: train reads the teacher's hidden states from "
        "it instead of running the teacher (no teacher engine; only its output head and input "
        "embedding are loaded); cache-teacher writes it",
    )
    batch_size: int = Field(8, ge=1, description="teacher rows per forward while building")
    shard_views: int = Field(256, ge=1, description="views per shard file (the resume unit)")


class TrackingConfig(_Strict):
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "disabled"
    project: str = "cot2align-ds"
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)


# ``fidelity: reference``: the research code's behaviour wherever this project's default differs
# (docs/fidelity.md: each row, why the default differs, and its switch). Keys the config sets
# explicitly keep their values.
REFERENCE_SETTINGS: dict[str, dict[str, Any]] = {
    "data": {"prompt_truncation": "right", "prompt_special_tokens": False},
    "distill": {
        "mined_projection": "first",
        "mined_alignment": "dp_reference",
        "dskd_std": "padded",
    },
    "cot2align": {
        "reference_compat": True,
        "cross_cot_pooling": "micro_batch",
        "grad_mode": "unrolled",
        "max_iters": None,
    },
    "eval": {
        "greedy": False,
        "seeds": [10, 20, 30],
        "no_repeat_ngram_size": 0,
        "max_length": 512,
    },
}


class RunConfig(_Strict):
    fidelity: Literal["project", "reference"] = Field(
        "project",
        description="reference: the research code's behaviour wherever the defaults differ "
        "(docs/fidelity.md); keys set explicitly keep their values",
    )
    output_dir: Path = Path("runs/default")
    student: ModelSpec
    teacher: ModelSpec | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    cot2align: CoT2AlignConfig = Field(default_factory=CoT2AlignConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher_sft: TeacherSFTConfig = Field(default_factory=TeacherSFTConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)

    @model_validator(mode="before")
    @classmethod
    def _fidelity_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("fidelity") != "reference":
            return data
        data = dict(data)
        for section, values in REFERENCE_SETTINGS.items():
            given = data.get(section)
            if given is not None and not isinstance(given, dict):
                continue  # the section's own validation reports it
            data[section] = {**values, **(given or {})}
        return data

    @model_validator(mode="after")
    def _method_needs_teacher(self) -> RunConfig:
        needs_teacher = get_method(self.distill.method).needs_teacher
        if needs_teacher and self.teacher is None:
            raise ValueError(
                f"distill.method={self.distill.method} needs a teacher: set teacher.name_or_path"
            )
        if self.cot2align.enabled and not needs_teacher:
            raise ValueError("cot2align.enabled needs a base KD method: set distill.method")
        if self.cot2align.enabled and self.cot2align.cross_cot and self.data.cot_records == "none":
            raise ValueError(
                "cot2align.cross_cot needs CoT records: set data.cot_records to "
                "non_empty_input or all (and records with rationales: cot2align augment)"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def shipped_recipes() -> list[str]:
    folder = resources.files("cot2align_ds") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.is_file():
        recipe = resources.files("cot2align_ds") / "configs" / f"{name_or_path}.yaml"
        if not recipe.is_file():
            raise ConfigError(
                f"config '{name_or_path}': no such file and no shipped recipe of that name "
                f"(recipes: {', '.join(shipped_recipes())})"
            )
        return _parse_yaml(recipe.read_text(encoding="utf-8"), str(name_or_path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config '{path}': not UTF-8 text; save the file as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"config '{path}': cannot read it ({error.strerror})") from None
    return _parse_yaml(text, str(path))


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config '{where}'{line}: invalid YAML; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config '{where}': expected a mapping of sections at the top level")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"--set '{override}': expected section.key=value")
    dotted, raw_value = override.split("=", 1)
    keys = [key for key in dotted.strip().split(".") if key]
    if not keys:
        raise ConfigError(f"--set '{override}': empty key")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value
    _check_override_path(keys, dotted)
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _check_override_path(keys: list[str], dotted: str) -> None:
    """Reject unknown keys early, naming the full dotted key (free-form dicts excepted)."""
    model: type[BaseModel] | None = RunConfig
    for depth, key in enumerate(keys):
        if model is None:
            return
        fields = model.model_fields
        if key not in fields:
            prefix = ".".join(keys[:depth]) or "top level"
            raise ConfigError(
                f"--set {dotted}: unknown key '{key}' in {prefix}; known: {', '.join(fields)}"
            )
        model = _submodel(fields[key].annotation)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    candidates = getattr(annotation, "__args__", (annotation,))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _format_validation_error(error: ValidationError, where: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see `cot2align show-config`)"
    elif (
        "input" in first
        and first["type"] not in ("missing",)
        and not isinstance(first["input"], dict)
    ):
        message = f"{message} (got {first['input']!r})"
    more = len(error.errors()) - 1
    suffix = f" (+{more} more)" if more else ""
    return f"config '{where}': {key}: {message}{suffix}"


PER_METHOD_KEY = "per_method"


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe or YAML file, apply overrides, validate; raise ``ConfigError`` (one line).

    A recipe may carry ``per_method: {<method>: {<section>: {<key>: value}}}``: values that
    apply only when ``distill.method`` (after the overrides) is that method, as the reference
    scripts set some hyperparameters per method. An explicit ``--set`` of the same key wins.
    """
    data = _read_yaml(name_or_path)
    per_method = data.pop(PER_METHOD_KEY, None) or {}
    _check_per_method(per_method, str(name_or_path))
    user_keys = set()
    for override in overrides or []:
        apply_override(data, override)
        user_keys.add(override.split("=", 1)[0].strip())
    method = (data.get("distill") or {}).get("method", DistillConfig().method)
    for section, values in per_method.get(method, {}).items():
        for key, value in values.items():
            if f"{section}.{key}" not in user_keys:
                data.setdefault(section, {})[key] = value
    return validate_config(data, str(name_or_path))


def _check_per_method(per_method: Any, where: str) -> None:
    if not isinstance(per_method, dict) or not all(
        isinstance(sections, dict) and all(isinstance(v, dict) for v in sections.values())
        for sections in per_method.values()
    ):
        raise ConfigError(
            f"config '{where}': {PER_METHOD_KEY} must map methods to sections of keys"
        )
    unknown = sorted(set(per_method) - set(METHOD_NAMES))
    if unknown:
        raise ConfigError(
            f"config '{where}': {PER_METHOD_KEY}.{unknown[0]}: unknown method; known: "
            f"{', '.join(METHOD_NAMES)}"
        )


def validate_config(data: dict[str, Any], where: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, where)) from None


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")
