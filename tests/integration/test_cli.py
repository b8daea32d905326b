"""The CLI through Typer's test runner, and as a real subprocess for the error contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from support import subprocess_env, tiny_run_config
from typer.testing import CliRunner

from cot2align_ds.cli import app

runner = CliRunner()


def test_help_lists_commands_with_help_text():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("show-config", "train", "demo"):
        assert command in result.output
    assert "Run the embedded offline demo" in result.output


def test_version_is_the_installed_packages():
    import importlib.metadata

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"cot2align-ds {importlib.metadata.version('cot2align-ds')}"
    assert "export" in runner.invoke(app, ["--help"]).output


def test_show_config_prints_run_and_deepspeed_configs():
    result = runner.invoke(app, ["show-config", "--set", "train.micro_batch_size=3"])
    assert result.exit_code == 0, result.output
    assert "micro_batch_size: 3" in result.output
    student_json = result.output.split("# student_deepspeed")[1].split("\n", 1)[1]
    student_json = student_json.split("# teacher_deepspeed")[0]
    assert json.loads(student_json)["train_micro_batch_size_per_gpu"] == 3
    assert '"offload_param"' in result.output.split("# teacher_deepspeed")[1]


def test_help_shows_flags_without_a_value_type():
    text = runner.invoke(app, ["export", "--help"]).output
    assert "--overwrite" in text and "<path>" in text
    assert "<bool>" not in text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--config", "missing.yaml"], "no such file and no shipped recipe"),
        (["--set", "train.bogus=1"], "unknown key 'bogus' in train"),
        (["--set", "train.lr=abc"], "train.lr"),
    ],
)
def test_show_config_bad_input_is_one_line(args, fragment):
    result = runner.invoke(app, ["show-config", *args])
    assert result.exit_code == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cot2align_ds.cli", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_nonexistent_model_path_is_one_line_without_traceback(workspace, tmp_path):
    config = tiny_run_config(
        workspace, tmp_path / "run", teacher={"name_or_path": "/no/such/model"}
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _cli("train", "--config", str(path))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "teacher.name_or_path" in errors[0]
    assert "does not exist" in errors[0] or "not a model directory" in errors[0]
    assert "Traceback" not in result.stderr


def test_train_through_the_cli(workspace, tmp_path):
    config = tiny_run_config(workspace, tmp_path / "run", train={"max_steps": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "student" / "config.json").is_file()
    again = runner.invoke(app, ["train", "--config", str(path)])
    assert again.exit_code == 2 and "not empty; pass --overwrite" in again.stderr


def test_pair_check_reports_a_workable_pair(workspace):
    result = runner.invoke(
        app,
        [
            "pair-check",
            "--teacher",
            str(workspace["teacher"]),
            "--student",
            str(workspace["student_tok"]),
            "--data",
            str(workspace["train"]),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "one-to-one" in result.output


def test_pair_check_fails_when_embedding_rows_are_short(workspace, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model("gpt2", vocab_size=10, n_embd=8, n_layer=1, n_head=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "short")
    AutoTokenizer.from_pretrained(workspace["student_tok"]).save_pretrained(tmp_path / "short")
    result = runner.invoke(
        app,
        [
            "pair-check",
            "--teacher",
            str(workspace["teacher"]),
            "--student",
            str(tmp_path / "short"),
        ],
    )
    assert result.exit_code == 1
    assert "PROBLEM" in result.output and "embedding rows" in result.output


def test_pair_check_json_stays_json_with_long_warnings(workspace, tmp_path):
    """The JSON report goes to stdout as is: a console would wrap long warning lines inside
    its strings (an instruct-model warning is long)."""
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(workspace["student_tok"])
    student.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    student.save_pretrained(tmp_path / "instruct_tok")
    result = runner.invoke(app, ["pair-check", "--teacher", str(workspace["teacher_tok"]),
                                 "--student", str(tmp_path / "instruct_tok"), "--json"])  # fmt: skip
    report = json.loads(result.stdout)
    assert any("chat template" in warning for warning in report["warnings"])
