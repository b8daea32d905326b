"""The distillation run: build everything from a ``RunConfig``, train, save the student.

Data flows one way: records -> examples -> collator in DataLoader workers (both tokenizers)
-> teacher engine (no grad) + student engine -> objective -> DeepSpeed step -> logs.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cot2align_ds.alignment.offsets import require_offsets
from cot2align_ds.alignment.vocab_map import mined_vocab_map
from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.config import ConfigError, RunConfig, config_to_dict
from cot2align_ds.data.batch import DistillBatch, TokenSide
from cot2align_ds.data.collator import DistillCollator
from cot2align_ds.data.examples import Example, make_examples
from cot2align_ds.data.records import read_records
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.engine.ds_config import resolve_run_ds_configs
from cot2align_ds.errors import UserError
from cot2align_ds.methods import NORMALISERS
from cot2align_ds.models.loading import (
    check_vocab_fits,
    config_hidden_size,
    hidden_size_of,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from cot2align_ds.models.lora import apply_lora, save_lora_student
from cot2align_ds.models.student_module import StudentWithProjectors, param_groups
from cot2align_ds.run_dir import FINAL_MODEL_DIRNAME
from cot2align_ds.tracking import Tracker
from cot2align_ds.train import checkpointing as ckpt
from cot2align_ds.train.dev_eval import DevEvaluator
from cot2align_ds.train.fused_views import split_outputs, stack_views
from cot2align_ds.train.objective import (
    ModelAccess,
    ModelOutputs,
    Objective,
    StepOutputs,
    batch_normalisers,
)
from cot2align_ds.train.schedule import cosine_with_floor


class NonFiniteError(UserError):
    """Too many optimizer steps had non-finite loss or gradients."""


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    final_metrics: dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# What a run writes before training starts: a run that failed on bad input left only these, and
# rerunning the same command after fixing the input must not need --overwrite.
_RESTARTABLE = {"config.json", "vocab_map_cache"}


def check_output_dir(config: RunConfig, overwrite: bool) -> Path:
    output_dir = Path(config.output_dir)
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


def _head_positions(only_hidden: bool) -> dict:
    """Forward kwargs for a view whose logits no loss reads (Cross-CoT standard views feed only
    OT on hidden states): the LM head then runs on the last position alone. That saves its
    (rows, positions, vocab) matmul, which at Qwen2-0.5B shapes (vocab 151,936, hidden 896) is
    about a quarter of the forward's FLOPs (272M of ~990M per token)."""
    return {"logits_to_keep": 1} if only_hidden else {}


class Trainer:
    """Owns the engines, the loader and the objective for one run."""

    def __init__(
        self, config: RunConfig, output_dir: Path, ctx: dse.DistContext, resume_tag: str | None
    ) -> None:
        self.config = config
        self.output_dir = output_dir
        self.ctx = ctx
        seed_everything(config.train.seed)
        self._load_models()
        self._build_data()
        self._build_engines()
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.skipped_steps = 0
        self.dev = self._dev_evaluator()
        if resume_tag is not None:
            self._resume(resume_tag)
        self.tracker = Tracker(
            output_dir,
            is_main_process=self.ctx.is_main,
            wandb_mode=config.tracking.wandb_mode,
            project=config.tracking.project,
            run_name=config.tracking.run_name or output_dir.name,
            group=config.tracking.group,
            tags=config.tracking.tags,
            config=config_to_dict(config),
        )

    # -- setup ----------------------------------------------------------------------------------
    def _load_models(self) -> None:
        cfg = self.config
        precision = cfg.train.precision
        self.student_tokenizer = load_tokenizer(cfg.student, "student")
        self.teacher_tokenizer = None
        self.teacher_model = None
        if cfg.distill.method != "sft":
            assert cfg.teacher is not None
            self.teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher")
        self.objective = Objective(
            cfg.distill, cfg.cot2align, teacher_to_student_vocab_W=self._vocab_map()
        )
        needs_teacher = self.objective.needs_teacher
        ds = resolve_run_ds_configs(
            cfg,
            world_size=self.ctx.world_size,
            student_hidden=config_hidden_size(cfg.student, "student"),
            teacher_hidden=config_hidden_size(cfg.teacher, "teacher") if needs_teacher else None,
        )
        self.student_ds, self.teacher_ds = ds.student, ds.teacher
        if needs_teacher:
            with dse.zero3_loading(self.teacher_ds):
                self.teacher_model = load_causal_lm(
                    cfg.teacher, "teacher", self.teacher_tokenizer, precision
                )
        with dse.zero3_loading(self.student_ds):
            student = load_causal_lm(cfg.student, "student", self.student_tokenizer, precision)
        check_vocab_fits(student, self.student_tokenizer, "student")
        if self.teacher_model is not None:
            check_vocab_fits(self.teacher_model, self.teacher_tokenizer, "teacher")
        # Adapters and projectors are built after the model and in fp32 by default; DeepSpeed
        # flattens every trainable tensor into one buffer per dtype and wants the run's dtype.
        dtype = torch_dtype(precision)
        if cfg.student.lora is not None:
            student = apply_lora(student, cfg.student.lora, dtype=dtype)
        teacher_hidden = hidden_size_of(self.teacher_model) if self.teacher_model else 0
        projectors = self.objective.build_projectors(hidden_size_of(student), teacher_hidden)
        projectors.to(dtype)
        self.student_module = StudentWithProjectors(student, projectors)

    def _vocab_map(self) -> torch.Tensor | None:
        """MinED's teacher->student vocabulary map: rank 0 builds and caches, the rest read it."""
        if self.config.distill.method != "mined":
            return None
        cache_dir = Path(self.config.output_dir) / "vocab_map_cache"
        vocab_map = None
        for turn in ("main", "others"):
            if (turn == "main") == self.ctx.is_main:
                vocab_map = mined_vocab_map(
                    self.teacher_tokenizer, self.student_tokenizer, cache_dir=cache_dir
                )
            dse.barrier()
        return torch.from_numpy(vocab_map).long()

    def _build_data(self) -> None:
        cfg = self.config
        if cfg.data.train_file is None:
            raise ConfigError("data.train_file is not set; point it at a JSONL file of records")
        if self.objective.alignment == "offsets":
            # The collator aligns by character offsets: a slow tokenizer has none.
            require_offsets(self.student_tokenizer)
            require_offsets(self.teacher_tokenizer)
        records = read_records(cfg.data.train_file)
        self.examples = make_examples(
            records, template=cfg.data.template, cot_records=cfg.data.cot_records
        )
        collator = DistillCollator(
            self.student_tokenizer,
            self.teacher_tokenizer,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_total_tokens=cfg.data.max_total_tokens,
            cot_views=self.objective.needs_cross_views,
            alignment=self.objective.alignment,
        )
        self.loader, self.sampler = build_loader(cfg, self.examples, collator, self.ctx)
        steps_per_epoch = len(self.loader) // cfg.train.grad_accum
        self.total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
        self.steps_per_epoch = steps_per_epoch

    def _build_engines(self) -> None:
        train = self.config.train
        groups = param_groups(
            self.student_module,
            lr=train.lr,
            projector_lr=train.projector_lr,
            weight_decay=train.weight_decay,
        )
        lambdas = [
            cosine_with_floor(g["lr"], train.min_lr, self.total_steps, train.warmup_steps)
            for g in groups
        ]
        self.group_names = [g.pop("name") for g in groups]
        self.student_engine = dse.build_student_engine(
            self.student_module, self.student_ds, groups, lambdas
        )
        self.teacher_engine = None
        if self.teacher_model is not None:
            self.teacher_engine = dse.build_teacher_engine(self.teacher_model, self.teacher_ds)
        self.device = dse.engine_device(self.student_engine)
        self.access = self._model_access() if self.teacher_engine else None

    def _model_access(self) -> ModelAccess:
        student = self.student_engine.module.student
        teacher = self.teacher_engine.module
        return ModelAccess(
            student_embed=lambda ids: student.get_input_embeddings()(ids),
            teacher_embed=lambda ids: teacher.get_input_embeddings()(ids),
            student_head_weight=lambda: dse.gathered_copy(student.get_output_embeddings().weight),
            teacher_head_weight=lambda: dse.gathered_copy(teacher.get_output_embeddings().weight),
        )

    # -- one optimizer step ---------------------------------------------------------------------
    def _batches(self):
        """Micro-batches forever, tracking (epoch, batch_in_epoch) for exact resume."""
        self.sampler.skip_batches = self.batch_in_epoch
        while True:
            self.sampler.set_epoch(self.epoch)
            for batch in self.loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _forward_student(self, side: TokenSide, only_hidden: bool = False) -> ModelOutputs:
        output = self.student_engine(
            input_ids=side.input_ids,
            attention_mask=side.attention_mask,
            output_hidden_states=self.objective.needs_hidden_states,
            **_head_positions(only_hidden),
        )
        return ModelOutputs(output.logits, getattr(output, "hidden_states", None))

    @torch.no_grad()
    def _forward_teacher(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, only_hidden: bool = False
    ) -> ModelOutputs:
        output = self.teacher_engine(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=self.objective.needs_hidden_states,
            use_cache=False,
            **_head_positions(only_hidden),
        )
        return ModelOutputs(output.logits, getattr(output, "hidden_states", None))

    def _window_counts(self, window: list[DistillBatch]) -> dict[str, torch.Tensor]:
        """Global counts of the window as device scalars (no host sync)."""
        counts = torch.stack([batch_normalisers(batch) for batch in window]).sum(0)
        counts = dse.all_reduce_sum(counts.to(self.device, torch.float32))
        # Each rank's backward is averaged over ranks and accumulation steps by DeepSpeed;
        # scaling the normaliser down by that factor makes the gradient the global mean.
        scale = self.ctx.world_size * self.config.train.grad_accum
        # An empty term (no CoT record anywhere) divides a zero sum by 1/scale: still zero.
        counts = counts.clamp_min(1.0) / scale
        return dict(zip(NORMALISERS, counts.unbind(), strict=True))

    def _forward_teacher_views(self, sides: list[TokenSide]) -> list[ModelOutputs]:
        """The teacher on the main view and, for Cross-CoT, the standard view: one fused call
        (``fused_views.py``) or one call each, the standard view's LM head on one position."""
        if len(sides) > 1 and self.config.cot2align.fuse_teacher_views:
            return split_outputs(self._forward_teacher(*stack_views(sides)), sides)
        return [
            self._forward_teacher(side.input_ids, side.attention_mask, only_hidden=index > 0)
            for index, side in enumerate(sides)
        ]

    def _forward_all(self, batch: DistillBatch) -> StepOutputs:
        """The same forward calls on every rank, whatever the batch holds (ZeRO-3 lockstep)."""
        standard = batch.standard if self.objective.needs_cross_views else None
        teacher = teacher_standard = None
        if self.teacher_engine is not None:
            sides = [batch.teacher] + ([standard.teacher] if standard is not None else [])
            teacher, *rest = self._forward_teacher_views(sides)
            teacher_standard = rest[0] if rest else None
        student = self._forward_student(batch.student)
        student_standard = None
        if standard is not None:
            student_standard = self._forward_student(standard.student, only_hidden=True)
        return StepOutputs(student, teacher, student_standard, teacher_standard)

    def train_step(
        self, window: list[DistillBatch], log: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One optimizer step over an accumulation window: the summed per-term values and, when
        ``log``, OT plan diagnostics of the window's last micro-batch."""
        counts = self._window_counts(window)
        totals: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, torch.Tensor] = {}
        projectors = self.student_engine.module.projectors
        for index, batch in enumerate(window):
            batch = batch.to(self.device)
            outputs = self._forward_all(batch)
            last = log and index == len(window) - 1
            loss = self.objective(batch, outputs, projectors, self.access, counts, diagnostics=last)
            self.student_engine.backward(loss.total)
            self.student_engine.step()
            for name, value in loss.terms.items():
                totals[name] = totals.get(name, 0.0) + value
            totals["total"] = totals.get("total", 0.0) + loss.total.detach()
            diagnostics.update(loss.diagnostics)
        return totals, diagnostics

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.config.train
        batches = self._batches()
        tokens = 0
        wait_s = step_s = 0.0
        last: dict[str, float] = {}
        self.student_engine.train()
        with self.tracker.progress(self.total_steps - self.step) as bar:
            for step in range(self.step + 1, self.total_steps + 1):
                started = time.perf_counter()
                window = [next(batches) for _ in range(cfg.grad_accum)]
                fetched = time.perf_counter()
                self._audit(step, window)
                log_now = step % cfg.log_every == 0 or step == self.total_steps
                values, diagnostics = self.train_step(window, log=log_now)
                self.step = step
                self._check_skipped(step)
                tokens += sum(int(b.student.attention_mask.sum()) for b in window)
                wait_s += fetched - started
                step_s += time.perf_counter() - started
                if log_now:
                    last = self._log(step, values, diagnostics, tokens, wait_s, step_s)
                    tokens, wait_s, step_s = 0, 0.0, 0.0
                bar.update(1, {k: last[k] for k in ("loss/total",) if k in last})
                stop = self.dev is not None and self.dev.due(step) and self._evaluate_dev(step)
                if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                    self.save_checkpoint()
                if stop:
                    self.tracker.summary({"early_stop_step": step})
                    break
        model_dir = self.save()
        self.tracker.close()
        return TrainResult(self.output_dir, model_dir, self.total_steps, last)

    def _log(self, step, values, diagnostics, tokens, wait_s, step_s) -> dict[str, float]:
        reduced = torch.stack([v.float() for v in values.values()])
        # Sums of per-rank shares of the global mean: the all-reduce gives the global mean.
        shares = self.config.train.grad_accum * self.ctx.world_size
        reduced = dse.all_reduce_sum(reduced.to(self.device)) / shares
        metrics = {f"loss/{k}": float(v) for k, v in zip(values, reduced.tolist(), strict=True)}
        for name, lr in zip(self.group_names, self.student_engine.get_lr(), strict=True):
            metrics[f"lr/{name}"] = float(lr)
        grad_norm = dse.global_grad_norm(self.student_engine)
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        metrics["tokens_per_s"] = tokens * self.ctx.world_size / max(step_s, 1e-9)
        metrics["data_wait_share"] = wait_s / max(step_s, 1e-9)
        metrics["epoch"] = step / max(self.steps_per_epoch, 1)
        metrics["skipped_steps"] = float(self.skipped_steps)
        metrics.update({k: float(v) for k, v in diagnostics.items()})
        metrics.update(dse.peak_memory_mb())
        # A skipped step's NaN loss is reported by _check_skipped; JSON cannot carry NaN.
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        self.tracker.log(metrics, step)
        return metrics

    def _dev_evaluator(self) -> DevEvaluator | None:
        cfg = self.config
        if cfg.data.dev_file is None or not (cfg.eval.every_steps or cfg.eval.every_epoch):
            return None
        return DevEvaluator(
            cfg.eval,
            read_records(cfg.data.dev_file),
            self.student_tokenizer,
            template=cfg.data.template,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            output_dir=self.output_dir,
            is_main=self.ctx.is_main,
            steps_per_epoch=self.steps_per_epoch,
        )

    def _evaluate_dev(self, step: int) -> bool:
        """Dev evaluation (all ranks), best-K checkpoints; returns whether to stop early."""
        self.student_engine.eval()
        metrics = self.dev.evaluate(self.student_engine.module.student, step)
        self.student_engine.train()
        self.tracker.log(metrics, step)
        if self.dev.should_keep(metrics):
            # Best-K live apart from the resumable checkpoints so the two rotations never clash.
            root, tag = self.output_dir / "best_checkpoints", ckpt.tag_for(step)
            dse.save_checkpoint(self.student_engine, root, tag)
            self.dev.register_checkpoint(step, root / tag)
        dse.barrier()
        doomed = self.dev.paths_to_delete()
        if self.ctx.is_main:
            for path in doomed:
                shutil.rmtree(path, ignore_errors=True)
        return self.dev.should_stop

    def _check_skipped(self, step: int) -> None:
        """DeepSpeed skips an update whose gradients are non-finite; count them and give up
        after ``train.max_skipped_steps`` rather than train on garbage."""
        skipped = int(self.student_engine.skipped_steps)
        if skipped > self.skipped_steps:
            self.skipped_steps = skipped
            self.tracker.summary({"skipped_step": step, "skipped_steps_total": skipped})
        limit = self.config.train.max_skipped_steps
        if skipped > limit:
            raise NonFiniteError(
                f"stopping at step {step}: {skipped} steps had non-finite loss or gradients "
                f"(limit train.max_skipped_steps={limit}); lower train.lr or check the data"
            )

    # -- resumable checkpoints ------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.ctx.world_size,
            "micro_batch_size": self.config.train.micro_batch_size,
            "grad_accum": self.config.train.grad_accum,
            "dev_eval": self.dev.state_dict() if self.dev is not None else None,
        }

    def save_checkpoint(self) -> None:
        root, tag = ckpt.checkpoint_root(self.output_dir), ckpt.tag_for(self.step)
        dse.save_checkpoint(self.student_engine, root, tag)
        rng_file = root / tag / f"rng-rank{self.ctx.rank}.json"
        write_text_atomic(rng_file, json.dumps(ckpt.rng_state()))
        dse.barrier()  # every rank's files are on disk before the checkpoint counts as complete
        if self.ctx.is_main:
            ckpt.write_marker(root, tag, self._trainer_state())
            ckpt.rotate(root, self.config.train.keep_last)
        dse.barrier()

    def _resume(self, tag: str) -> None:
        root = ckpt.checkpoint_root(self.output_dir)
        state = ckpt.read_marker(root, tag)
        for key in ("world_size", "micro_batch_size", "grad_accum"):
            if state[key] != self._trainer_state()[key]:
                raise ckpt.ResumeError(
                    f"checkpoint {tag} was written with {key}={state[key]}, this run has "
                    f"{self._trainer_state()[key]}; resume with the same setting"
                )
        dse.load_checkpoint(self.student_engine, root, tag)
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        if self.dev is not None and state.get("dev_eval"):
            self.dev.load_state_dict(state["dev_eval"])
        rng = json.loads((root / tag / f"rng-rank{self.ctx.rank}.json").read_text())
        ckpt.set_rng_state(rng)

    def _audit(self, step: int, window: list[DistillBatch]) -> None:
        if not self.config.train.record_example_ids:
            return
        path = self.output_dir / f"examples_seen.rank{self.ctx.rank}.jsonl"
        with path.open("a", encoding="utf-8") as handle:
            ids = [example_id for batch in window for example_id in batch.ids]
            handle.write(json.dumps({"step": step, "ids": ids}) + "\n")

    def _write_ds_configs(self) -> None:
        write_text_atomic(
            self.output_dir / "ds_student.json", json.dumps(self.student_ds, indent=2)
        )
        if self.teacher_model is not None:
            text = json.dumps(self.teacher_ds, indent=2)
            write_text_atomic(self.output_dir / "ds_teacher.json", text)

    def save(self) -> Path:
        model_dir = self.output_dir / FINAL_MODEL_DIRNAME
        state = dse.gathered_state_dict(self.student_engine, prefix="student.")
        projectors = dse.gathered_state_dict(self.student_engine, prefix="projectors.")
        if self.ctx.is_main:
            self._write_ds_configs()
            model_dir.mkdir(parents=True, exist_ok=True)
            student = self.student_module.student
            if self.config.student.lora is not None:
                adapter_dir = self.output_dir / "student_adapter"
                save_lora_student(student, state, adapter_dir, model_dir)
                self.student_tokenizer.save_pretrained(adapter_dir)
            else:
                student.save_pretrained(model_dir, state_dict=state, safe_serialization=True)
            self.student_tokenizer.save_pretrained(model_dir)
            if projectors:
                dse.save_safetensors(projectors, self.output_dir / "projectors.safetensors")
        dse.barrier()
        return model_dir


def run_train(
    config: RunConfig, *, overwrite: bool = False, resume: str | None = None
) -> TrainResult:
    """Train; ``resume``: "auto" (newest complete checkpoint, if any) or a checkpoint tag."""
    ctx = dse.init_distributed(config.deepspeed.dist_timeout_s)
    output_dir = Path(config.output_dir)
    tag = ckpt.find_resume_tag(output_dir, resume) if resume else None
    if resume is None:
        check_output_dir(config, overwrite)
    dse.barrier()  # every rank has checked before rank 0 writes anything
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "config.json", json.dumps(config_to_dict(config), indent=2))
        if tag is not None:
            step = ckpt.read_marker(ckpt.checkpoint_root(output_dir), tag)["step"]
            for name in ["metrics.jsonl", *(p.name for p in output_dir.glob("examples_seen.*"))]:
                ckpt.truncate_jsonl_steps(output_dir / name, step)
    dse.barrier()
    trainer = Trainer(config, output_dir, ctx, tag)
    return trainer.train()
