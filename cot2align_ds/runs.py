"""The ``run_*`` functions behind each CLI command (the CLI only parses options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cot2align_ds.config import ConfigError, RunConfig, config_to_dict, load_config
from cot2align_ds.engine.ds_config import resolve_run_ds_configs
from cot2align_ds.errors import UserError
from cot2align_ds.methods import METHODS
from cot2align_ds.models.loading import (
    config_hidden_size,
    config_largest_param,
)
from cot2align_ds.planning.sizing import config_block_params


def resolved_configs(config: str, overrides: list[str], world_size: int) -> dict[str, Any]:
    run = load_config(config, overrides)
    has_teacher = run.teacher is not None and run.distill.method != "sft"
    auto_note = None
    if run.deepspeed.student_config == "auto":
        run, auto_note = _resolve_auto_student(run, world_size)
    ds = resolve_run_ds_configs(
        run,
        world_size=world_size,
        student_hidden=_hidden_size_or_default(run, "student"),
        teacher_hidden=_hidden_size_or_default(run, "teacher") if has_teacher else None,
        teacher_largest_param=_largest_param_or_none(run) if has_teacher else None,
        student_block_params=_block_params_or_none(run, "student"),
        teacher_block_params=_block_params_or_none(run, "teacher") if has_teacher else None,
    )
    resolved: dict[str, Any] = {"run": config_to_dict(run)}
    if auto_note:
        resolved["student_config_auto"] = auto_note
    resolved["student_deepspeed_path"] = str(ds.student_path)
    resolved["student_deepspeed"] = ds.student
    if ds.teacher is not None:
        resolved["teacher_deepspeed_path"] = str(ds.teacher_path)
        resolved["teacher_deepspeed"] = ds.teacher
    return resolved


def _resolve_auto_student(run: RunConfig, world_size: int) -> tuple[RunConfig, str]:
    """``student_config: auto`` as ``train`` would pick it on 80 GB GPUs, 8 per node (the
    planner's rule; ``cot2align plan --gpu-mem-gb`` for other GPUs)."""
    from cot2align_ds.planning.planner import STUDENT_CONFIGS, estimate_memory, with_student_config

    try:
        plan = estimate_memory(run, world_size=world_size, gpus_per_node=min(world_size, 8))
    except UserError as error:
        # Models not reachable offline cannot be sized: the partitioned engine is the safe one.
        choice = STUDENT_CONFIGS[-1]
        return with_student_config(run, choice), f"{choice} (cannot size the models: {error})"
    return with_student_config(run, plan.student_choice), (
        f"{plan.student_choice} on 80 GB GPUs (cot2align plan --gpu-mem-gb for others)"
    )


def _largest_param_or_none(run: RunConfig) -> int | None:
    """The teacher's largest weight, as ``train`` sizes NVMe buffers by it; None (the
    resolver's stand-in) for a model not reachable offline."""
    try:
        return config_largest_param(run.teacher, "teacher")
    except UserError:
        return None


def _block_params_or_none(run: RunConfig, role: str) -> int | None:
    """One block's weights as ``train`` sizes the prefetch bucket; None (the hidden-size rule)
    for a model not reachable offline."""
    try:
        return config_block_params(getattr(run, role), role)
    except UserError:
        return None


def _hidden_size_or_default(run: RunConfig, role: str) -> int:
    """Bucket sizes need the hidden size; a model not reachable offline is sized as 4096."""
    try:
        return config_hidden_size(getattr(run, role), role)
    except UserError:
        return 4096


def run_pair_check(
    teacher: str,
    student: str,
    data_file: Path | None,
    *,
    max_texts: int,
    as_json: bool,
    template: str | None = None,
) -> bool:
    """Print the tokenizer-pair report; returns whether the pair can work."""
    from cot2align_ds.alignment.pair_check import check_tokenizer_pair
    from cot2align_ds.config import ModelSpec
    from cot2align_ds.data.examples import make_examples
    from cot2align_ds.data.records import read_records
    from cot2align_ds.models.loading import embedding_rows_from_config, load_tokenizer

    specs = {"teacher": ModelSpec(name_or_path=teacher), "student": ModelSpec(name_or_path=student)}
    tokenizers = {role: load_tokenizer(spec, role, strict=False) for role, spec in specs.items()}
    texts = None
    if data_file is not None:
        # Plain text for the alignment statistics (chat prompts differ per tokenizer).
        examples = make_examples(read_records(data_file), template="alpaca", cot_records="all")
        texts = [example.prompt + example.answer for example in examples[:max_texts]]
    report = check_tokenizer_pair(
        tokenizers["teacher"],
        tokenizers["student"],
        texts=texts,
        teacher_embedding_rows=embedding_rows_from_config(specs["teacher"], "teacher"),
        student_embedding_rows=embedding_rows_from_config(specs["student"], "student"),
        template=template,
    )
    if as_json:
        # Plain stdout: a console would wrap long lines inside the JSON strings.
        print(report.to_json())
    else:
        Console().print(report.to_text(), markup=False)
    return report.ok


def run_augment_command(teacher: str, data: Path, output_dir: Path, **options) -> str:
    from cot2align_ds.data.augment import run_augment

    return run_augment(teacher, data, output_dir, **options).summary()


def sft_teacher_config(config: str, overrides: list[str], output_dir: Path | None) -> RunConfig:
    """The run config's teacher, trained alone (CE only) on the run's data.

    The teacher takes the student's place (with ``teacher.lora`` if set), and the run's
    ``train`` section with the keys ``teacher_sft.train`` sets.
    """
    from cot2align_ds.config import validate_config
    from cot2align_ds.experiments.pipeline import teacher_sft_stage

    run = load_config(config, overrides)
    if run.teacher is None:
        raise ConfigError(f"config '{config}': no teacher section to fine-tune")
    raw = config_to_dict(run)
    teacher_train = raw.pop("teacher_sft")["train"]
    raw = teacher_sft_stage(
        raw, raw["teacher"], output_dir=str(output_dir or Path(f"{run.output_dir}_teacher_sft"))
    )
    raw["train"].update({key: value for key, value in teacher_train.items() if value is not None})
    return validate_config(raw, f"{config} (teacher SFT)")


def run_sft_teacher_command(
    config: str, overrides: list[str], output_dir: Path | None, *, overwrite: bool
) -> tuple[Path, bool] | None:
    """Fine-tune the teacher, then publish it as ``<output_dir>/teacher`` (rank 0).

    Returns (teacher directory, whether it is the best dev checkpoint) on rank 0, else None.
    """
    import torch.distributed as dist

    from cot2align_ds.eval.export import publish_best_model
    from cot2align_ds.train.loop import run_train

    run = sft_teacher_config(config, overrides, output_dir)
    result = run_train(run, overwrite=overwrite)
    # run_train returns after the final save's barrier: every rank's shards are on disk.
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return publish_best_model(result.output_dir, "teacher", run.train.precision)


def run_train_command(
    config: str, overrides: list[str], *, overwrite: bool, resume: str | None = None
):
    from cot2align_ds.train.loop import run_train

    return run_train(load_config(config, overrides), overwrite=overwrite, resume=resume)


def run_demo_command(
    output_dir: Path, *, quick: bool, seed: int, methods: list[str], cot2align_base: str
) -> dict:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir '{output_dir}' is a file; give a directory")
    _quiet_libraries()
    from cot2align_ds.experiments.demo import run_demo

    results = run_demo(
        output_dir, quick=quick, seed=seed, methods=tuple(methods), cot2align_base=cot2align_base
    )
    print_demo_table(results)
    return results


def _quiet_libraries() -> None:
    """The demo's output is its stages and its table: the libraries' deprecation notices and
    per-file progress bars (weights loading and saving, a dozen times) are noise there."""
    import os
    import warnings

    import torch
    from transformers.utils import logging as transformers_logging

    if not torch.cuda.is_available():
        # Named, DeepSpeed does not warn that it is guessing the CPU accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    transformers_logging.disable_progress_bar()


def run_real_models_command(names: list[str] | None, cache_dir: Path | None, *, install: bool):
    from cot2align_ds.models.real_models import run_real_models

    run_real_models(names, cache_dir, install=install)


def run_real_demo_command(output_dir: Path, *, quick: bool, seed: int) -> dict:
    from cot2align_ds.experiments.real_demo import format_results, run_real_demo

    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir '{output_dir}' is a file; give a directory")
    results = run_real_demo(output_dir, quick=quick, seed=seed)
    print(format_results(results))
    return results


def print_demo_table(results: dict) -> None:
    names = {name: m.label for name, m in METHODS.items() if m.needs_teacher and m.cross_tokenizer}
    labels = {
        "teacher": "teacher (Llama-style, byte-level BPE)",
        "student_sft": "student trained alone (SFT)",
    }
    for method, name in names.items():
        labels[f"student_{method}"] = f"student distilled ({name}, cross-tokenizer)"
        labels[f"student_{method}_cot2align"] = f"student distilled ({name} + CoT2Align)"
    table = Table(title="Exact match on held-out problems (standard prompts)")
    table.add_column("model")
    table.add_column("exact match (%)", justify="right")
    for key, result in results.items():
        if key in labels:
            table.add_row(labels[key], f"{result['exact_match']:.1f}")
    Console().print(table)
    meta = results.get("_meta", {})
    Console().print(f"wall time: {meta.get('wall_s', 0):.0f} s")
    if meta.get("quick"):
        Console().print(
            f"quick mode: {meta.get('max_steps')} steps per model on "
            f"{meta.get('train_problems')} problems, a smoke test of the pipeline: these numbers "
            "say nothing about the methods (`make demo` trains them properly)"
        )


def run_launch_command(config: str, **options) -> int:
    from cot2align_ds.launch import run_launch

    return run_launch(config, **options)


def run_cache_teacher_command(config: str, overrides: list[str]) -> dict:
    from cot2align_ds.teacher_cache.build import build_teacher_cache

    return build_teacher_cache(load_config(config, overrides))


def run_plan_command(config: str, overrides: list[str], **options) -> None:
    from cot2align_ds.planning.planner import run_plan

    run_plan(config, overrides, **options)


def run_eval_command(
    model_path: Path | None, data_files: list[Path], *, run_dir: Path | None = None, **options
) -> dict:
    from cot2align_ds.eval.commands import eval_settings_of_run, run_eval

    if (model_path is None) == (run_dir is None):
        raise UserError("eval: pass exactly one of --model and --run")
    if run_dir is not None:
        model_path, defaults = eval_settings_of_run(run_dir)
        options = {**options, **{k: v for k, v in defaults.items() if options.get(k) is None}}
    defaults = {"template": "alpaca", "max_new_tokens": 256, "max_prompt_tokens": 256}
    options = {**options, **{k: v for k, v in defaults.items() if options.get(k) is None}}
    return run_eval(model_path, data_files, **options)


def run_export_command(
    run_dir: Path, output: Path, *, push_to_hub: str | None = None, private: bool = True,
    endpoint: str | None = None, **options,
) -> tuple[Path, str | None]:  # fmt: skip
    """Export the run's model; then, with ``push_to_hub``, upload it (refused offline before
    anything is written). The source model and the commit URL (None without a push)."""
    from cot2align_ds.eval.export import export_model, require_hub_online
    from cot2align_ds.eval.export import push_to_hub as push

    if push_to_hub:
        require_hub_online()
    source = export_model(run_dir, output, **options)
    url = push(output, push_to_hub, private=private, endpoint=endpoint) if push_to_hub else None
    return source, url


def run_report_command(run_dirs: list[Path], out_dir: Path) -> Path:
    from cot2align_ds.eval.commands import run_report

    return run_report(run_dirs, out_dir)


def run_prepare_command(dataset: str, output_dir: Path, **options) -> str:
    from cot2align_ds.data.prepare import run_prepare

    return run_prepare(dataset, output_dir, **options).summary()


def run_reasoning_bench_command(
    output_dir: Path,
    *,
    quick: bool,
    probes: bool = False,
    probe_names: list[str] | None = None,
    probe_seeds: list[int] | None = None,
    teacher_time: bool = False,
    publish: Path | None = None,
    jobs: int = 1,
) -> dict:
    from cot2align_ds.experiments import reasoning_bench as bench

    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir '{output_dir}' is a file; give a directory")
    if probe_names and not probes:
        raise ConfigError("--probe needs --probes")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give the number of student runs at once (1 or more)")
    if sum((teacher_time, probes, publish is not None)) > 1:
        raise ConfigError("--teacher-time, --probes and --publish are separate runs; give one")
    if publish is not None:
        from cot2align_ds.experiments.reasoning_publish import publish_results

        sections = publish_results(output_dir, publish)
        Console().print(f"wrote {', '.join(sections)} into {publish}", markup=False)
        return {"published": sections}
    if teacher_time:
        result = bench.measure_teacher_time(output_dir, quick=quick, steps=4 if quick else 100)
        Console().print(bench.teacher_time_table(result), markup=False)
        return result
    if probes:
        seeds = tuple(probe_seeds) if probe_seeds else (11,)
        results = bench.run_probes(output_dir, quick=quick, probes=probe_names or None, seeds=seeds)
        Console().print((output_dir / "probes.md").read_text(), markup=False)
        return results
    results = bench.run_reasoning_bench(
        output_dir, quick=quick, seeds=probe_seeds or None, jobs=jobs
    )
    Console().print((output_dir / "results.md").read_text(), markup=False)
    return results
