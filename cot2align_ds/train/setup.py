"""Setting up a run: models and tokenizers, the objective, the data loader and both engines.

``Trainer`` (``loop.py``) calls these in order: ``load_models``, ``build_data``,
``build_engines``. Each returns a small record of what it built.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cot2align_ds.alignment.offsets import require_offsets
from cot2align_ds.alignment.pair_check import template_findings
from cot2align_ds.alignment.vocab_map import mined_vocab_map
from cot2align_ds.config import ConfigError, RunConfig
from cot2align_ds.data.collator import DistillCollator
from cot2align_ds.data.examples import Example, make_examples
from cot2align_ds.data.records import dev_records, train_records  # noqa: F401 (re-exported)
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.engine.ds_config import resolve_run_ds_configs
from cot2align_ds.models.loading import (
    check_vocab_fits,
    config_hidden_size,
    config_largest_param,
    embeddings_are_hidden_state_0,
    hidden_size_of,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from cot2align_ds.models.lora import apply_lora
from cot2align_ds.models.student_module import StudentWithProjectors, param_groups
from cot2align_ds.planning.sizing import config_block_params
from cot2align_ds.train.objective import ModelAccess, Objective
from cot2align_ds.train.schedule import cosine_with_floor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# What a run writes before training starts: a run that failed on bad input left only these, and
# rerunning the same command after fixing the input must not need --overwrite.
_RESTARTABLE = {"config.json", "vocab_map_cache"}


def require_writable_dir(output_dir: Path) -> None:
    """``output_dir`` is (or can become) a directory this process may write into."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir '{output_dir}' is a file; choose a directory")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir '{output_dir}': '{existing}' is a file; choose a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir '{output_dir}': '{existing}' is not writable; choose another"
        )


def make_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"output_dir '{output_dir}': cannot create it ({error.strerror}); choose another"
        ) from None


def check_output_dir(config: RunConfig, overwrite: bool) -> Path:
    output_dir = Path(config.output_dir)
    require_writable_dir(output_dir)
    used = output_dir.is_dir() and any(p.name not in _RESTARTABLE for p in output_dir.iterdir())
    if used and not overwrite:
        raise ConfigError(
            f"output_dir '{output_dir}' is not empty; pass --overwrite or choose another directory"
        )
    return output_dir


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` that can start its next epoch ``skip_batches`` batches in.

    Skipping in the sampler means the skipped examples are never tokenized or collated.
    """

    def __init__(self, *args, micro_batch_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batch_size = micro_batch_size
        self.skip_batches = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip_batches = self.skip_batches * self.micro_batch_size, 0
        return iter(indices[skip:])


class _ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def build_loader(
    config: RunConfig, examples: list[Example], collator: DistillCollator, ctx: dse.DistContext
) -> tuple[DataLoader, ResumableSampler]:
    sampler = ResumableSampler(
        _ExampleDataset(examples),
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=config.train.seed,
        drop_last=False,
        micro_batch_size=config.train.micro_batch_size,
    )
    workers = config.data.num_workers
    loader = DataLoader(
        sampler.dataset,
        batch_size=config.train.micro_batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=workers,
        prefetch_factor=config.data.prefetch_factor if workers else None,
        persistent_workers=workers > 0,
        # Page-locked batches: the step's non_blocking copies to the GPU overlap the previous
        # step instead of waiting on a staging copy.
        pin_memory=ctx.device.type == "cuda",
        drop_last=True,
        # Its own generator: creating an iterator must not draw from the global RNG, or a run
        # resumed mid-epoch would see different dropout masks from the uninterrupted one.
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    if len(loader) < config.train.grad_accum:
        raise ConfigError(
            f"data.train_file: {len(examples)} examples give {len(loader)} micro-batches per rank, "
            f"fewer than train.grad_accum={config.train.grad_accum}; add data or shrink the batch"
        )
    return loader, sampler


@dataclass
class Models:
    """The loaded models: the student wrapped with its projectors, the teacher (None for SFT),
    their tokenizers, the objective, and the resolved DeepSpeed configs of both engines."""

    student_tokenizer: object
    teacher_tokenizer: object | None
    student_module: StudentWithProjectors
    teacher_model: nn.Module | None
    objective: Objective
    student_ds: dict
    teacher_ds: dict | None
    # ``teacher_cache.path``: the teacher's states come from the cache; no teacher model.
    teacher_cache: object | None = None


def _local_size() -> int:
    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)


def auto_student_config(config: RunConfig, ctx: dse.DistContext) -> str:
    """``deepspeed.student_config: auto`` on this machine: the planner's choice for this GPU's
    memory (``planner.choose_student_config``); ZeRO-3 without GPUs. Every rank decides alike."""
    from cot2align_ds.planning.planner import STUDENT_CONFIGS, estimate_memory
    from cot2align_ds.planning.sizing import GIB

    if ctx.device.type != "cuda":
        return STUDENT_CONFIGS[-1]
    capacity = torch.cuda.get_device_properties(ctx.device).total_memory / GIB
    plan = estimate_memory(
        config, world_size=ctx.world_size, gpus_per_node=_local_size(), gpu_mem_gb=capacity
    )
    return plan.student_choice


def load_models(config: RunConfig, ctx: dse.DistContext) -> Models:
    precision = config.train.precision
    student_tokenizer = load_tokenizer(config.student, "student")
    teacher_tokenizer = teacher_model = None
    if config.distill.method != "sft":
        assert config.teacher is not None
        teacher_tokenizer = load_tokenizer(config.teacher, "teacher")
    if config.deepspeed.student_config == "auto":  # run_train resolved it already
        config.deepspeed.student_config = auto_student_config(config, ctx)
    vocab_map = _vocab_map(config, ctx, teacher_tokenizer, student_tokenizer)
    objective = Objective(config.distill, config.cot2align, teacher_to_student_vocab_W=vocab_map)
    cached = None
    if objective.needs_teacher and config.teacher_cache.path is not None:
        from cot2align_ds.teacher_cache.build import CachedTeacher

        cached = CachedTeacher(config)
    needs_teacher = objective.needs_teacher and cached is None
    ds = resolve_run_ds_configs(
        config,
        world_size=ctx.world_size,
        student_hidden=config_hidden_size(config.student, "student"),
        teacher_hidden=config_hidden_size(config.teacher, "teacher") if needs_teacher else None,
        gpus_per_node=_local_size(),
        teacher_largest_param=(
            config_largest_param(config.teacher, "teacher") if needs_teacher else None
        ),
        student_block_params=config_block_params(config.student, "student"),
        teacher_block_params=config_block_params(config.teacher, "teacher")
        if needs_teacher
        else None,
    )
    dse.require_nvme_io(ds.student, "student")
    if needs_teacher:
        dse.require_nvme_io(ds.teacher, "teacher")
        with dse.zero3_loading(ds.teacher):
            teacher_model = load_causal_lm(config.teacher, "teacher", teacher_tokenizer, precision)
    with dse.zero3_loading(ds.student):
        student = load_causal_lm(config.student, "student", student_tokenizer, precision)
    check_vocab_fits(student, student_tokenizer, "student")
    if teacher_model is not None:
        check_vocab_fits(teacher_model, teacher_tokenizer, "teacher")
    # Adapters and projectors are built after the model and in fp32 by default; DeepSpeed
    # flattens every trainable tensor into one buffer per dtype and wants the run's dtype.
    dtype = torch_dtype(precision)
    if config.train.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and with ZeRO-3's gathered parameters.
        options = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):  # the transformers 5 name
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        student.config.use_cache = False
    if config.student.lora is not None:
        student = apply_lora(student, config.student.lora, dtype=dtype)
    if config.cot2align.enabled and teacher_model is not None:
        check_layer_pairs(config, {"student": student, "teacher": teacher_model})
    if config.cot2align.enabled and cached is not None:
        check_layer_pairs(config, {"student": student})  # the teacher's: run_layout
    teacher_hidden = hidden_size_of(teacher_model) if teacher_model is not None else 0
    if cached is not None:
        teacher_hidden = cached.hidden_size
    projectors = objective.build_projectors(hidden_size_of(student), teacher_hidden)
    projectors.to(dtype)
    return Models(
        student_tokenizer,
        teacher_tokenizer,
        StudentWithProjectors(student, projectors),
        teacher_model,
        objective,
        ds.student,
        ds.teacher,
        cached,
    )


def check_layer_pairs(config: RunConfig, models: dict[str, nn.Module]) -> None:
    """Every OT layer pair indexes an existing hidden state of its model (L layers give L + 1
    hidden states: the embedding output, then each layer), found here rather than at step 1."""
    for index, pair in enumerate(config.cot2align.layer_pairs):
        for role, model in models.items():
            layers = getattr(model.config, "num_hidden_layers", None)
            if not isinstance(layers, int):
                continue
            position = getattr(pair, role)
            if not -(layers + 1) <= position <= layers:
                raise ConfigError(
                    f"cot2align.layer_pairs[{index}].{role}={position}: the {role} has "
                    f"{layers} layers, so hidden-state indices run from {-(layers + 1)} to "
                    f"{layers}"
                )


def _vocab_map(config: RunConfig, ctx, teacher_tokenizer, student_tokenizer) -> torch.Tensor | None:
    """MinED's teacher->student vocabulary map: rank 0 builds and caches, the rest read it."""
    if config.distill.method != "mined":
        return None
    cache_dir = Path(config.output_dir) / "vocab_map_cache"
    vocab_map = None
    for turn in ("main", "others"):
        if (turn == "main") == ctx.is_main:
            vocab_map = mined_vocab_map(teacher_tokenizer, student_tokenizer, cache_dir=cache_dir)
        dse.barrier()
    return torch.from_numpy(vocab_map).long()


@dataclass
class Data:
    examples: list[Example]
    loader: DataLoader
    sampler: ResumableSampler
    steps_per_epoch: int
    total_steps: int


def build_data(config: RunConfig, models: Models, ctx: dse.DistContext) -> Data:
    if config.data.train_file is None and config.data.hub_dataset is None:
        raise ConfigError(
            "data.train_file is not set; point it at a JSONL file of records (or set "
            "data.hub_dataset)"
        )
    objective = models.objective
    if objective.alignment == "offsets":
        # The collator aligns by character offsets: a slow tokenizer has none.
        require_offsets(models.student_tokenizer)
        require_offsets(models.teacher_tokenizer)
    tokenizers = {"student": models.student_tokenizer}
    if models.teacher_tokenizer is not None:
        tokenizers["teacher"] = models.teacher_tokenizer
    problems, warnings = template_findings(tokenizers, config.data.template)
    if problems:
        raise ConfigError(f"data.template: {problems[0]}")
    if ctx.is_main:
        for warning in warnings:
            print(f"warning: data.template: {warning}", file=sys.stderr)
    records = train_records(config)
    examples = make_examples(
        records, template=config.data.template, cot_records=config.data.cot_records
    )
    wants_cot = config.cot2align.enabled and config.data.cot_records != "none"
    if wants_cot and not any(example.is_cot for example in examples):
        raise ConfigError(
            f"data.train_file '{config.data.train_file}': cot2align.enabled with "
            f"data.cot_records={config.data.cot_records}, but no record gets a CoT view (none "
            "has a 'rationale'); run cot2align augment first, or set data.cot_records: none"
        )
    collator = DistillCollator(
        models.student_tokenizer,
        models.teacher_tokenizer,
        max_prompt_tokens=config.data.max_prompt_tokens,
        max_total_tokens=config.data.max_total_tokens,
        prompt_cut=config.data.prompt_truncation,
        prompt_special_tokens=config.data.prompt_special_tokens,
        cot_views=objective.needs_cross_views,
        alignment=objective.alignment,
        char_alignment=config.cot2align.enabled,
        vocab_map=objective.teacher_to_student_W if objective.alignment == "dp_reference" else None,
    )
    if models.teacher_cache is not None:
        collator = models.teacher_cache.collator(collator)
    loader, sampler = build_loader(config, examples, collator, ctx)
    steps_per_epoch = len(loader) // config.train.grad_accum
    total_steps = config.train.max_steps or steps_per_epoch * config.train.epochs
    return Data(examples, loader, sampler, steps_per_epoch, total_steps)


@dataclass
class Engines:
    student: object  # the DeepSpeed training engine around ``StudentWithProjectors``
    teacher: object | None  # the inference-only DeepSpeed engine, None without a teacher
    device: torch.device
    access: ModelAccess | None  # what DSKD reads from both models beyond their outputs
    group_names: list[str]  # optimizer parameter groups, in the engine's order


def build_engines(config: RunConfig, models: Models, total_steps: int) -> Engines:
    train = config.train
    groups = param_groups(
        models.student_module,
        lr=train.lr,
        projector_lr=train.projector_lr,
        weight_decay=train.weight_decay,
    )
    lambdas = [
        cosine_with_floor(g["lr"], train.min_lr, total_steps, train.warmup_steps) for g in groups
    ]
    group_names = [g.pop("name") for g in groups]
    student = dse.build_student_engine(models.student_module, models.student_ds, groups, lambdas)
    teacher = None
    if models.teacher_model is not None:
        teacher = dse.build_teacher_engine(models.teacher_model, models.teacher_ds)
    access = model_access(student, teacher) if teacher is not None else None
    if models.teacher_cache is not None:
        access = cached_model_access(student, models.teacher_cache, dse.engine_device(student))
    return Engines(student, teacher, dse.engine_device(student), access, group_names)


def model_access(student_engine, teacher_engine) -> ModelAccess:
    student = student_engine.module.student
    teacher = teacher_engine.module
    return ModelAccess(
        student_embed=lambda ids: student.get_input_embeddings()(ids),
        teacher_embed=lambda ids: teacher.get_input_embeddings()(ids),
        student_head_weight=lambda: dse.gathered_copy(student.get_output_embeddings().weight),
        teacher_head_weight=lambda: dse.gathered_copy(teacher.get_output_embeddings().weight),
        teacher_embeddings_in_hidden=embeddings_are_hidden_state_0(teacher.config),
        student_embeddings_in_hidden=embeddings_are_hidden_state_0(student.config)
        and type(student.get_input_embeddings()) is torch.nn.Embedding,
    )


def cached_model_access(student_engine, cached, device: torch.device) -> ModelAccess:
    """``model_access`` for a run reading the teacher from its cache: its loaded head and
    embedding on this rank's device."""
    student = student_engine.module.student
    heads = cached.heads.to(device)
    return ModelAccess(
        student_embed=lambda ids: student.get_input_embeddings()(ids),
        teacher_embed=lambda ids: heads.embed(ids),
        student_head_weight=lambda: dse.gathered_copy(student.get_output_embeddings().weight),
        teacher_head_weight=lambda: heads.head.weight,
        teacher_embeddings_in_hidden=cached.embeddings_in_hidden,
        student_embeddings_in_hidden=embeddings_are_hidden_state_0(student.config)
        and type(student.get_input_embeddings()) is torch.nn.Embedding,
    )
