"""The ``cot2align`` command line. Each command parses options and calls one ``run_*`` function.

User errors (bad config, missing files, unusable models) are printed as one line on stderr with
a non-zero exit code and no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from cot2align_ds.errors import UserError

app = typer.Typer(
    name="cot2align",
    help="Cross-tokenizer distillation with CoT2Align on DeepSpeed ZeRO-3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOption = Annotated[
    str, typer.Option("--config", "-c", help="Shipped recipe name or path to a YAML run config.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable)."),
]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _offline_defaults() -> None:
    # Hub lookups without network take ~50 s to fail; the user can still opt in explicitly.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command("show-config")
def show_config(
    config: ConfigOption = "demo",
    set_: SetOption = None,
    world_size: Annotated[int, typer.Option(help="World size to resolve DeepSpeed for.")] = 1,
) -> None:
    """Print the resolved run config and the resolved DeepSpeed configs."""
    from cot2align_ds.runs import resolved_configs

    resolved = resolved_configs(config, set_ or [], world_size)
    typer.echo("# run config")
    typer.echo(yaml.safe_dump(resolved["run"], sort_keys=False).rstrip())
    for name in ("student_deepspeed", "teacher_deepspeed"):
        if name in resolved:
            typer.echo(f"# {name} ({resolved[name + '_path']})")
            typer.echo(json.dumps(resolved[name], indent=2))


@app.command()
def train(
    config: ConfigOption,
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Reuse a non-empty output_dir.")] = False,
) -> None:
    """Train (distill) a student against a teacher with DeepSpeed (ZeRO-3 by default)."""
    from cot2align_ds.runs import run_train_command

    result = run_train_command(config, set_ or [], overwrite=overwrite)
    typer.echo(f"saved student to {result.model_dir}")


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where everything is written.")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, typer.Option(help="A one-minute smoke run.")] = False,
    seed: int = 42,
) -> None:
    """Run the embedded offline demo: data, tokenizers, teacher, SFT vs distilled student."""
    from cot2align_ds.runs import run_demo_command

    run_demo_command(output_dir, quick=quick, seed=seed)


def main() -> None:
    _offline_defaults()
    try:
        app()
    except UserError as error:
        typer.echo(f"error: {str(error).splitlines()[0]}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
