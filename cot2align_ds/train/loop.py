"""The distillation run: build everything from a ``RunConfig``, train, save the student.

Data flows one way: records -> examples -> collator in DataLoader workers (both tokenizers)
-> teacher engine (no grad) + student engine -> objective -> DeepSpeed step -> logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cot2align_ds import run_dir as rundir
from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.config import RunConfig, config_to_dict
from cot2align_ds.data.batch import DistillBatch, TokenSide
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.errors import Preempted, UserError
from cot2align_ds.methods import NORMALISERS, get_method
from cot2align_ds.tracking import Tracker
from cot2align_ds.train import checkpointing as ckpt
from cot2align_ds.train.dev_eval import DevEvaluator
from cot2align_ds.train.fused_views import split_outputs, stack_views
from cot2align_ds.train.objective import (
    ModelOutputs,
    StepOutputs,
    batch_normalisers,
)
from cot2align_ds.train.setup import (
    auto_student_config,
    build_data,
    build_engines,
    check_output_dir,
    dev_records,
    load_models,
    make_output_dir,
    seed_everything,
)


class NonFiniteError(UserError):
    """Too many optimizer steps had non-finite loss or gradients."""


# SLURM sends USR1 ahead of the time limit (``--signal``) and TERM at a preemption or the limit.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While active, ``STOP_SIGNALS`` are recorded (not fatal): the loop checkpoints at the next
    step boundary and stops. Outside the main thread nothing is installed."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {
        sig: signal.signal(sig, lambda signum, _: received.append(signum)) for sig in STOP_SIGNALS
    }
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    final_metrics: dict[str, float]


def _head_positions(only_hidden: bool) -> dict:
    """Forward kwargs for a view whose logits no loss reads (Cross-CoT standard views feed only
    OT on hidden states): the LM head then runs on the last position alone. That saves its
    (rows, positions, vocab) matmul, which at Qwen2-0.5B shapes (vocab 151,936, hidden 896) is
    about a quarter of the forward's FLOPs (272M of ~990M per token)."""
    return {"logits_to_keep": 1} if only_hidden else {}


class Trainer:
    """One run, read top-down: build (``setup.py``), one optimizer step (``train_step``), the
    loop (``train``); resumable checkpoints and the final save live in ``checkpointing.py``."""

    def __init__(
        self, config: RunConfig, output_dir: Path, ctx: dse.DistContext, resume_tag: str | None
    ) -> None:
        self.config = config
        self.output_dir = output_dir
        self.ctx = ctx
        seed_everything(config.train.seed)
        self.models = load_models(config, ctx)
        self.objective = self.models.objective
        data = build_data(config, self.models, ctx)
        self.loader, self.sampler = data.loader, data.sampler
        self.steps_per_epoch, self.total_steps = data.steps_per_epoch, data.total_steps
        engines = build_engines(config, self.models, self.total_steps)
        self.student_engine, self.teacher_engine = engines.student, engines.teacher
        self.device, self.access, self.group_names = (
            engines.device,
            engines.access,
            engines.group_names,
        )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.skipped_steps = 0
        self._warned_plan = False
        self.stop_signals: list[int] = []  # filled by ``stop_signals()`` while training
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
            resume=resume_tag is not None,
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

    def _forward_student(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, only_hidden: bool = False
    ) -> ModelOutputs:
        output = self.student_engine(
            input_ids=input_ids,
            attention_mask=attention_mask,
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
        cached = self.models.teacher_cache
        if cached is not None:
            teacher = ModelOutputs(*cached.outputs(batch.teacher))
            if standard is not None:
                teacher_standard = ModelOutputs(*cached.outputs(standard.teacher))
        elif self.teacher_engine is not None:
            sides = [batch.teacher] + ([standard.teacher] if standard is not None else [])
            teacher, *rest = self._forward_teacher_views(sides)
            teacher_standard = rest[0] if rest else None
        student_standard = None
        # One call when there are two views: a second call before the backward would change
        # the module order ZeRO-3 traced, and it drops its prefetch plan at every mismatch.
        if standard is not None and self.config.cot2align.fuse_student_views:
            sides = [batch.student, standard.student]
            fused = self._forward_student(*stack_views(sides))
            student, student_standard = split_outputs(fused, sides)
        else:
            student = self._forward_student(batch.student.input_ids, batch.student.attention_mask)
            if standard is not None:
                student_standard = self._forward_student(
                    standard.student.input_ids, standard.student.attention_mask, only_hidden=True
                )
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
                if step < self.total_steps and self._stop_requested():
                    self._stop_for_requeue(step)
                if stop:
                    self.tracker.summary({"early_stop_step": step})
                    break
        model_dir = self.save()
        self.tracker.close()
        return TrainResult(self.output_dir, model_dir, self.total_steps, last)

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal (one scalar all-reduce per step: the ranks stop at
        the same boundary, whichever of them the signal reached)."""
        if self.ctx.world_size == 1:
            return bool(self.stop_signals)
        flag = torch.tensor([float(bool(self.stop_signals))], device=self.device)
        return bool(dse.all_reduce_sum(flag).item() > 0)

    def _stop_for_requeue(self, step: int) -> None:
        cfg = self.config.train
        if not (cfg.save_every and step % cfg.save_every == 0):
            self.save_checkpoint()
        tag = rundir.tag_for(step)
        self.tracker.summary({"preempted_at_step": step})
        self.tracker.close()
        raise Preempted(
            f"stopped at step {step} on a preemption notice; checkpoint {tag} is complete: "
            "rerun with --resume auto (the SLURM script requeues the job)"
        )

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
        self._check_plan(step, metrics.get("ot/marginal_error"))
        metrics.update(dse.peak_memory_mb())
        # A skipped step's NaN loss is reported by _check_skipped; JSON cannot carry NaN.
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        self.tracker.log(metrics, step)
        return metrics

    def _check_plan(self, step: int, marginal_error: float | None) -> None:
        """Say once when the OT plans stop short of their marginals: the loss then measures a
        plan that does not transport the sequences onto each other."""
        limit = self.config.cot2align.max_marginal_error
        if marginal_error is None or not marginal_error > limit or self._warned_plan:
            return
        self._warned_plan = True
        self.tracker.warn(
            f"step {step}: the OT plan's marginal error is {marginal_error:.3g} "
            f"(cot2align.max_marginal_error={limit:g}); raise cot2align.max_iters or "
            "cot2align.epsilon"
        )
        self.tracker.summary({"ot/marginal_error_warning_step": step})

    def _dev_evaluator(self) -> DevEvaluator | None:
        cfg = self.config
        if not (cfg.eval.every_steps or cfg.eval.every_epoch):
            return None
        records = dev_records(cfg)
        if records is None:
            return None
        return DevEvaluator(
            cfg.eval,
            records,
            self.models.student_tokenizer,
            template=cfg.data.template,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            prompt_cut=cfg.data.prompt_truncation,
            prompt_special_tokens=cfg.data.prompt_special_tokens,
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
        self.tracker.table("eval/completions", self.dev.samples, step)
        if self.dev.should_keep(metrics):
            # Best-K live apart from the resumable checkpoints so the two rotations never clash.
            root, tag = self.output_dir / "best_checkpoints", rundir.tag_for(step)
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

    # -- checkpoints --------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.ctx.world_size,
            "micro_batch_size": self.config.train.micro_batch_size,
            "grad_accum": self.config.train.grad_accum,
            "student_config": self.config.deepspeed.student_config,
            "dev_eval": self.dev.state_dict() if self.dev is not None else None,
        }

    def _require_finite_weights(self, what: str) -> None:
        """Never write non-finite weights: not over a good checkpoint, not as the model."""
        count, names = dse.non_finite_parameters(self.student_engine)
        if count:
            example = f" (e.g. {names[0]})" if names else ""
            raise NonFiniteError(
                f"step {self.step}: {count} weight tensor(s) are non-finite{example}; {what} not "
                "written (earlier checkpoints are untouched); lower train.lr or check the data"
            )

    def save_checkpoint(self) -> None:
        self._require_finite_weights(f"checkpoint {rundir.tag_for(self.step)}")
        ckpt.save_resumable(
            self.student_engine,
            self.output_dir,
            self._trainer_state(),
            self.ctx,
            keep_last=self.config.train.keep_last,
        )

    def _resume(self, tag: str) -> None:
        state = ckpt.restore(
            self.student_engine, self.output_dir, tag, self._trainer_state(), self.ctx
        )
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        if self.dev is not None and state.get("dev_eval"):
            self.dev.load_state_dict(state["dev_eval"])

    def save(self) -> Path:
        self._require_finite_weights("the final model")
        return ckpt.save_final_model(
            self.student_engine, self.models, self.config, self.output_dir, self.ctx
        )

    def _audit(self, step: int, window: list[DistillBatch]) -> None:
        if not self.config.train.record_example_ids:
            return
        path = self.output_dir / f"examples_seen.rank{self.ctx.rank}.jsonl"
        with path.open("a", encoding="utf-8") as handle:
            ids = [example_id for batch in window for example_id in batch.ids]
            handle.write(json.dumps({"step": step, "ids": ids}) + "\n")


def run_train(
    config: RunConfig, *, overwrite: bool = False, resume: str | None = None
) -> TrainResult:
    """Train; ``resume``: "auto" (newest complete checkpoint, if any) or a checkpoint tag."""
    ctx = dse.init_distributed(config.deepspeed.dist_timeout_s)
    output_dir = Path(config.output_dir)
    tag = rundir.find_resume_tag(output_dir, resume) if resume else None
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if resume == "auto" and tag is None and restarts > 0:
        raise rundir.ResumeError(
            f"restart {restarts} of SLURM job {os.environ.get('SLURM_JOB_ID', '?')} found no "
            f"complete checkpoint in {rundir.checkpoint_root(output_dir)}; refusing to start over "
            "into the same directory: set train.save_every, or start a new job"
        )
    step = None
    if resume is None:
        check_output_dir(config, overwrite)
    elif tag is not None:
        # A checkpoint's ZeRO stage decides how it loads: "auto" keeps the one it was written
        # with; an explicit JSON must match it (checked with the layout below).
        saved = rundir.read_marker(rundir.checkpoint_root(output_dir), tag)
        if config.deepspeed.student_config == "auto" and "student_config" in saved:
            config.deepspeed.student_config = saved["student_config"]
    if config.deepspeed.student_config == "auto":
        config.deepspeed.student_config = auto_student_config(config, ctx)
    if config.teacher_cache.path is not None and get_method(config.distill.method).needs_teacher:
        from cot2align_ds.teacher_cache.build import check_run_cache

        check_run_cache(config)  # refused before anything is written
    if tag is not None:
        # Refused before anything is written: the directory keeps describing its checkpoint.
        layout = {
            "world_size": ctx.world_size,
            "micro_batch_size": config.train.micro_batch_size,
            "grad_accum": config.train.grad_accum,
            "student_config": config.deepspeed.student_config,
        }
        step = rundir.check_resumable(output_dir, tag, layout)["step"]
    dse.barrier()  # every rank has checked before rank 0 writes anything
    if ctx.is_main:
        make_output_dir(output_dir)
        for name in rundir.recover_final_model(output_dir):
            print(f"{name}/: restored the previous final model (a save was killed midway)")
        if step is None:
            removed = rundir.clear_previous_run(output_dir)
            if removed:
                print(f"{output_dir}: a fresh run; removed the previous run's {', '.join(removed)}")
        write_text_atomic(output_dir / "config.json", json.dumps(config_to_dict(config), indent=2))
        if step is not None:
            for name in ["metrics.jsonl", *(p.name for p in output_dir.glob("examples_seen.*"))]:
                if rundir.truncate_jsonl_steps(output_dir / name, step):
                    print(f"{name}: dropped a torn last line (the run was killed mid-write)")
    dse.barrier()
    trainer = Trainer(config, output_dir, ctx, tag)
    with stop_signals() as received:
        trainer.stop_signals = received
        return trainer.train()
