"""The bad-input catalogue (docs/bad_inputs.md), one test per entry, through the real CLI.

Defined outcome of a bad input: exit code 2, exactly one ``error:`` line on stderr naming the
file / line / field and what to do, no traceback, and nothing already on disk lost (data file,
DeepSpeed JSON, an existing run directory). Exceptions: an over-long example is truncated and
trains (entry 5); ``pair-check`` exits 1 with the reason in its report (entry 8).

Failures that happen in-process are driven through Typer's ``CliRunner`` (an uncaught exception
shows up as ``result.exception``, the in-process form of a traceback); one entry runs the CLI as
a real subprocess to check the contract on an actual stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from support import TEACHER_ARCH, tiny_run_config
from typer.testing import CliRunner

from cot2align_ds.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    crash: str | None = None  # the traceback of an exception that escaped the CLI


def _cli(*args: str) -> Outcome:
    """In-process run; an exception escaping the ``user_errors`` wrapper is a crash."""
    result = runner.invoke(app, list(args))
    crash = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        crash = "".join(traceback.format_exception(result.exception))
    return Outcome(result.exit_code, result.stdout, result.stderr, crash)


def _cli_subprocess(*args: str) -> Outcome:
    """The real console entry point in a fresh process, outside the test's process group."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "cot2align_ds.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    return Outcome(result.returncode, result.stdout, result.stderr)


def assert_user_error(outcome: Outcome, *fragments: str) -> str:
    """Exit 2, one ``error:`` line containing every fragment, no traceback; returns the line."""
    assert outcome.crash is None, f"crashed instead of a one-line error:\n{outcome.crash}"
    assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr[-3000:]
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line, got:\n{outcome.stderr[-3000:]}"
    assert outcome.code == 2, (outcome.code, errors)
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _pair_check_failure(outcome: Outcome) -> str:
    """``pair-check`` said NOT OK with exit code 1; its report with rich's line wrapping undone."""
    assert outcome.crash is None, outcome.crash
    assert outcome.code == 1, outcome.stdout
    report = " ".join(outcome.stdout.split())
    assert report.endswith("NOT OK (1 problem(s))"), report
    return report


def _write_config(tmp_path: Path, config: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def _train(tmp_path: Path, config: dict, *args: str) -> Outcome:
    return _cli("train", "--config", str(_write_config(tmp_path, config)), *args)


def _good_lines(workspace, count: int) -> list[bytes]:
    return workspace["train"].read_bytes().splitlines(keepends=True)[:count]


def _data_file(tmp_path: Path, lines: list[bytes], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(lines))
    return path


def _with_data(workspace, tmp_path: Path, data_file: Path, **sections) -> dict:
    config = tiny_run_config(workspace, tmp_path / "run", **sections)
    config["data"]["train_file"] = str(data_file)
    return config


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _record(**fields) -> bytes:
    base = {"id": "x", "instruction": "Add 2 and 3.", "input": "", "output": "5"}
    return (json.dumps({**base, **fields}) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# 1-4: malformed data files (file:line, field, what to do; the data file is never touched)
# ---------------------------------------------------------------------------------------------

BAD_LINES = {
    "malformed_json": (b'{"instruction": "Add 2 and 3.", "output": \n', ["malformed JSON"]),
    "missing_output": (b'{"instruction": "Add 2 and 3.", "input": ""}\n', ["'output'"]),
    "empty_output": (_record(output="   "), ["'output' is empty", "gold answer"]),
    "non_utf8": (b'{"instruction": "Add \xff\xfe 2", "output": "5"}\n', ["not UTF-8", "re-encode"]),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_data_line_names_file_and_line(workspace, tmp_path, kind):
    bad_line, fragments = BAD_LINES[kind]
    data = _data_file(tmp_path, [*_good_lines(workspace, 6), bad_line, *_good_lines(workspace, 2)])
    before = data.read_bytes()
    # SFT needs no teacher: the data error is the same, the run gets there sooner.
    config = _with_data(workspace, tmp_path, data, distill={"method": "sft"})
    assert_user_error(_train(tmp_path, config), f"{data}:7", *fragments)
    assert data.read_bytes() == before


def test_malformed_jsonl_through_a_real_process(workspace, tmp_path):
    """Entry 1 again as a real process: one error line on the actual stderr among DeepSpeed's
    own logging, and no traceback."""
    bad_line = BAD_LINES["malformed_json"][0]
    data = _data_file(tmp_path, [*_good_lines(workspace, 2), bad_line])
    config = _with_data(workspace, tmp_path, data, distill={"method": "sft"})
    outcome = _cli_subprocess("train", "--config", str(_write_config(tmp_path, config)))
    assert_user_error(outcome, f"{data}:3", "malformed JSON", "fix or remove the line")


# ---------------------------------------------------------------------------------------------
# 5: an example longer than the limits is truncated (prompt from the left, answer from the
#    right, see data/collator.py) and the run trains
# ---------------------------------------------------------------------------------------------


def test_example_longer_than_the_limits_is_truncated_and_trains(workspace, tmp_path):
    words = " ".join(f"{i % 97} plus {i % 89}" for i in range(1500))  # ~9k tokens either side
    lines = [
        _record(id="long-prompt", instruction=f"Add these: {words}", output="42"),
        _record(id="long-answer", output=f"Step by step: {words}. So 5"),
        _record(id="long-both", instruction=words, input=words, output=words),
        *_good_lines(workspace, 1),
    ]
    data = _data_file(tmp_path, lines)
    # MinED with offset alignment: the truncated answer spans are aligned as well.
    config = _with_data(
        workspace,
        tmp_path,
        data,
        distill={"method": "mined", "mined_alignment": "offsets"},
        train={"max_steps": 2},
    )
    outcome = _train(tmp_path, config)
    assert outcome.crash is None, outcome.crash
    assert outcome.code == 0, outcome.stderr
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss/total"] for row in rows if "loss/total" in row]
    assert len(losses) == 2 and all(0.0 < loss < 1e3 for loss in losses)
    assert (run / "student" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 6-8: tokenizers and models that cannot work together
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_tokenizer_dir(tmp_path_factory) -> Path:
    """A Python ("slow") tokenizer: ByT5's needs no vocabulary file and has no offset mapping
    (transformers 5 builds GPT2Tokenizer on the Rust backend, so that one has offsets)."""
    from transformers import ByT5Tokenizer

    folder = tmp_path_factory.mktemp("slow_tokenizer")
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def test_slow_tokenizer_is_reported_by_pair_check(workspace, slow_tokenizer_dir):
    """Entry 8: without offsets no alignment can be computed: pair-check exits 1 and says why."""
    outcome = _cli(
        "pair-check",
        "--teacher",
        str(slow_tokenizer_dir),
        "--student",
        str(workspace["student_tok"]),
    )
    report = _pair_check_failure(outcome)
    assert f"PROBLEM: teacher tokenizer '{slow_tokenizer_dir}' has no offset mapping" in report
    assert "PROBLEM: student" not in report


@pytest.fixture(scope="module")
def no_eos_tokenizer_dir(workspace, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("no_eos_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(workspace["student_tok"])
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    return folder


def test_tokenizer_without_eos_is_reported_by_pair_check(workspace, no_eos_tokenizer_dir):
    outcome = _cli(
        "pair-check", "--teacher", str(workspace["teacher"]), "--student", str(no_eos_tokenizer_dir)
    )
    report = _pair_check_failure(outcome)
    assert "PROBLEM: student tokenizer has no EOS token" in report
    assert "PROBLEM: teacher" not in report


def test_tokenizer_without_eos_is_one_line_in_train(workspace, tmp_path, no_eos_tokenizer_dir):
    config = tiny_run_config(workspace, tmp_path / "run")
    config["student"]["tokenizer"] = str(no_eos_tokenizer_dir)
    assert_user_error(
        _train(tmp_path, config), "student.tokenizer", str(no_eos_tokenizer_dir), "no EOS token"
    )


def test_slow_tokenizer_with_offset_alignment_is_one_line(workspace, tmp_path, slow_tokenizer_dir):
    """Entry 6: MinED with offset alignment refuses a tokenizer without offsets up front, not
    deep in the collator inside the DataLoader (``encoded["offset_mapping"]``)."""
    config = tiny_run_config(
        workspace,
        tmp_path / "run",
        teacher={"name_or_path": str(workspace["teacher"]), "tokenizer": str(slow_tokenizer_dir)},
        distill={"method": "mined", "mined_alignment": "offsets"},
        train={"max_steps": 1},
    )
    assert_user_error(
        _train(tmp_path, config), str(slow_tokenizer_dir), "no offset mapping", "fast tokenizer"
    )


@pytest.fixture(scope="module")
def short_teacher_dir(workspace, tmp_path_factory) -> Path:
    """The workspace teacher's tokenizer (400 tokens) on a model with 64 embedding rows."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("short_teacher")
    arch = dict(TEACHER_ARCH)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=64, **arch)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(workspace["teacher_tok"]).save_pretrained(folder)
    return folder


def test_model_with_fewer_embedding_rows_than_tokens_is_one_line(
    workspace, tmp_path, short_teacher_dir
):
    """Entry 7: refused when the model loads, not in the teacher's embedding lookup with
    "index out of range" at the first step."""
    config = tiny_run_config(
        workspace, tmp_path / "run", teacher={"name_or_path": str(short_teacher_dir)}
    )
    assert_user_error(_train(tmp_path, config), "teacher", "64 embedding rows", "400 tokens")


# ---------------------------------------------------------------------------------------------
# 9-10: configurations that contradict each other or the data
# ---------------------------------------------------------------------------------------------


def test_deepspeed_json_contradicting_the_run_config(workspace, tmp_path):
    raw = json.loads((REPO / "ds_configs" / "student_zero3.json").read_text())
    raw["train_micro_batch_size_per_gpu"] = 8
    ds_file = tmp_path / "student_mb8.json"
    ds_file.write_text(json.dumps(raw, indent=2))
    before = ds_file.read_bytes()
    config = tiny_run_config(
        workspace,
        tmp_path / "run",
        distill={"method": "sft"},
        deepspeed={"student_config": str(ds_file), "dist_timeout_s": 120},
    )
    assert_user_error(
        _train(tmp_path, config),
        str(ds_file),
        "'train_micro_batch_size_per_gpu'=8",
        "train.micro_batch_size=4",
        '"auto"',
    )
    assert ds_file.read_bytes() == before


@pytest.mark.parametrize(("num_records", "grad_accum"), [(3, 1), (6, 2)])
def test_dataset_smaller_than_one_accumulation_window(workspace, tmp_path, num_records, grad_accum):
    data = _data_file(tmp_path, _good_lines(workspace, num_records))
    config = _with_data(
        workspace,
        tmp_path,
        data,
        distill={"method": "sft"},
        train={"micro_batch_size": 4, "grad_accum": grad_accum, "max_steps": 1},
    )
    assert_user_error(
        _train(tmp_path, config),
        "data.train_file",
        f"{num_records} examples",
        f"train.grad_accum={grad_accum}",
        "add data or shrink the batch",
    )


def test_cot2align_without_a_single_cot_view_is_refused(workspace, tmp_path):
    """CoT2Align on CoT records, but no record has a rationale: refused, not silently off."""
    lines = []
    for line in _good_lines(workspace, 8):
        record = json.loads(line)
        record.pop("rationale", None)
        lines.append((json.dumps(record) + "\n").encode())
    config = _with_data(workspace, tmp_path, _data_file(tmp_path, lines))
    config["cot2align"] = {"enabled": True}
    config["data"]["cot_records"] = "all"
    assert_user_error(
        _train(tmp_path, config), "data.train_file", "no record gets a CoT view", "augment"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# 11: the config file itself (the --set forms are in test_cli.py::test_show_config_bad_input_*)
# ---------------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "missing_file": (None, ["no such file and no shipped recipe"]),
    "invalid_yaml": ("train: {max_steps: 2\n", ["invalid YAML", "fix the syntax"]),
    "unknown_key": ({"train": {"max_stpes": 2}}, ["train.max_stpes", "unknown key"]),
    "wrong_type": ({"train": {"lr": "fast"}}, ["train.lr", "'fast'"]),
    "conflicting_values": (
        {"data": {"max_prompt_tokens": 200, "max_total_tokens": 160}},
        ["max_prompt_tokens must be smaller than max_total_tokens"],
    ),
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_config_file_is_one_line(workspace, tmp_path, kind):
    change, fragments = BAD_CONFIGS[kind]
    path = tmp_path / "run.yaml"
    if isinstance(change, str):
        path.write_text(change)
    elif isinstance(change, dict):
        config = tiny_run_config(workspace, tmp_path / "run")
        for section, values in change.items():
            config[section].update(values)
        path.write_text(yaml.safe_dump(config))
    outcome = _cli("train", "--config", str(path))
    assert_user_error(outcome, str(path), *fragments)
    assert not (tmp_path / "run").exists()  # validated before anything is written


# ---------------------------------------------------------------------------------------------
# 12-13: an existing run directory is never touched by a refused run
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """A run directory with a finished-looking run and one complete checkpoint."""
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "model.safetensors").write_bytes(b"\x00weights\x01")
    (run / "config.json").write_text('{"train": {"lr": 0.001}}\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/total": 2.5}\n')
    checkpoint = run / "checkpoints" / "step-000050"
    checkpoint.mkdir(parents=True)
    (checkpoint / "rng-rank0.json").write_text("{}")
    (run / "checkpoints" / "step-000050.complete").write_text('{"step": 50}')
    return run


def test_non_empty_output_dir_without_overwrite_or_resume(workspace, tmp_path, existing_run):
    before = _snapshot(existing_run)
    config = tiny_run_config(workspace, existing_run)
    assert_user_error(_train(tmp_path, config), str(existing_run), "--overwrite")
    assert _snapshot(existing_run) == before


def test_resume_from_a_checkpoint_that_does_not_exist(workspace, tmp_path, existing_run):
    before = _snapshot(existing_run)
    config = tiny_run_config(workspace, existing_run)
    assert_user_error(
        _train(tmp_path, config, "--resume", "step-000099"),
        "--resume step-000099",
        "complete: step-000050",
        "--resume auto",
    )
    assert _snapshot(existing_run) == before


# ---------------------------------------------------------------------------------------------
# 14: after a bad-input error, fixing the input and running the same command again works
# ---------------------------------------------------------------------------------------------


def test_rerun_after_fixing_bad_data_needs_no_overwrite(workspace, tmp_path):
    data = _data_file(tmp_path, [*_good_lines(workspace, 4), BAD_LINES["missing_output"][0]])
    config = _with_data(workspace, tmp_path, data, train={"max_steps": 1})
    assert_user_error(_train(tmp_path, config), f"{data}:5")
    data.write_bytes(b"".join(_good_lines(workspace, 4)))  # the user fixes the data
    outcome = _train(tmp_path, config)
    assert outcome.crash is None, outcome.crash
    assert outcome.code == 0, outcome.stderr
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


@pytest.fixture
def pickled_model_dir(workspace, tmp_path):
    """The tiny teacher saved the old way: ``pytorch_model.bin`` (a pickle), no safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(workspace["teacher"])
    model.save_pretrained(out)
    for weights in out.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(workspace["teacher"]).save_pretrained(out)
    assert (out / "pytorch_model.bin").is_file() and not list(out.glob("*.safetensors"))
    return out


def test_pickled_weights_are_refused_by_eval_and_augment(workspace, tmp_path, pickled_model_dir):
    data = str(workspace["train"])
    for command in (
        ["eval", "--model", str(pickled_model_dir), "--data", data, "--output-dir"],
        ["augment", "--teacher", str(pickled_model_dir), "--data", data, "--output-dir"],
    ):
        out = tmp_path / command[0]
        assert_user_error(
            _cli(*command, str(out)), "pytorch_model.bin", "pickled", "--allow-pickle"
        )
        assert not out.exists()


def test_augment_ngram_rule_out_of_range_is_one_line(workspace, tmp_path):
    out = tmp_path / "augment"
    outcome = _cli(
        "augment", "--teacher", str(workspace["teacher"]), "--data", str(workspace["train"]),
        "--output-dir", str(out), "--no-repeat-ngram-size", "-1",
    )  # fmt: skip
    assert_user_error(outcome, "no_repeat_ngram_size must be >= 0")
    assert not out.exists()


def test_pickled_weights_load_when_the_user_opts_in(pickled_model_dir):
    from cot2align_ds.inference.loading import load_model_for_eval

    model, _ = load_model_for_eval(pickled_model_dir, allow_pickle=True)
    assert model.config.model_type == "llama"


# ---------------------------------------------------------------------------------------------
# Inputs that transformers, DeepSpeed or the file system reject: one line naming the key or
# file, exit 2, nothing written.
# ---------------------------------------------------------------------------------------------


def _truncated_model(workspace, tmp_path) -> Path:
    import shutil

    model = tmp_path / "truncated"
    shutil.copytree(workspace["teacher"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


def _ds_json(tmp_path: Path, payload) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(payload))
    return str(path)


BOUNDARY_CASES = {
    "layer_pair_beyond_the_model": (
        lambda ws, tmp: {
            "cot2align": {
                "enabled": True,
                "cross_cot": False,
                "layer_pairs": [{"student": 5, "teacher": -1}],
            }
        },
        ["cot2align.layer_pairs[0].student=5", "the student has 2 layers"],
    ),
    "unknown_model_type": (
        lambda ws, tmp: {
            "student": {"architecture": {"model_type": "gpt9"}, "tokenizer": str(ws["student_tok"])}
        },
        ["student.architecture", "'gpt9'"],
    ),
    "dimensions_the_architecture_rejects": (
        lambda ws, tmp: {
            "student": {
                "architecture": {
                    "model_type": "llama",
                    "hidden_size": 30,
                    "num_attention_heads": 4,
                    "num_hidden_layers": 1,
                    "intermediate_size": 8,
                },
                "tokenizer": str(ws["student_tok"]),
            }
        },
        ["student.architecture", "transformers cannot build"],
    ),
    "truncated_safetensors": (
        lambda ws, tmp: {"teacher": {"name_or_path": str(_truncated_model(ws, tmp))}},
        ["teacher.name_or_path", "cannot load"],
    ),
    "deepspeed_json_is_a_list": (
        lambda ws, tmp: {
            "deepspeed": {"student_config": _ds_json(tmp, [1, 2]), "dist_timeout_s": 60}
        },
        ["ds.json", "must be a JSON object, not a list"],
    ),
    "zero_optimization_is_a_number": (
        lambda ws, tmp: {
            "deepspeed": {
                "student_config": _ds_json(tmp, {"zero_optimization": 3}),
                "dist_timeout_s": 60,
            }
        },
        ["ds.json", "'zero_optimization' must be a JSON object, not a number"],
    ),
}


@pytest.mark.parametrize("kind", list(BOUNDARY_CASES))
def test_what_transformers_or_deepspeed_reject_is_one_line(workspace, tmp_path, kind):
    make, fragments = BOUNDARY_CASES[kind]
    config = tiny_run_config(workspace, tmp_path / "run", **make(workspace, tmp_path))
    assert_user_error(_train(tmp_path, config), *fragments)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("train: {lr: 1e-4}  # \u00e9".encode("latin-1"))
    assert_user_error(_cli("train", "--config", str(path)), str(path), "not UTF-8")


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_an_output_dir_that_cannot_be_a_directory_is_one_line(workspace, tmp_path, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    output_dir = blocker if where == "a_file" else blocker / "run"
    config = tiny_run_config(workspace, output_dir)
    assert_user_error(_train(tmp_path, config), "output_dir", "is a file", "choose a directory")
    assert blocker.read_text() == "not a directory"


def test_a_plan_short_of_its_marginals_is_reported_once(workspace, tmp_path):
    """Small epsilon with the iteration budget capped: the run trains (exit 0) and says once
    that its OT plans are not transport plans, instead of nothing. With the default adaptive
    budget the same epsilon converges and nothing is said."""
    ot = {"enabled": True, "cross_cot": False, "epsilon": 0.001, "num_iters": 2}
    for budget, expected in ((2, 1), (None, 0)):
        run_dir = tmp_path / f"run-{budget}"
        config = tiny_run_config(
            workspace,
            run_dir,
            cot2align={**ot, **({"max_iters": budget} if budget else {})},
            train={"max_steps": 3, "log_every": 1},
        )
        outcome = _train(tmp_path, config)
        assert outcome.code == 0 and outcome.crash is None, outcome.stderr[-2000:]
        warnings = [line for line in outcome.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == expected, outcome.stderr[-2000:]
        if expected:
            assert "marginal error" in warnings[0] and "cot2align.max_iters" in warnings[0]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        errors = [row["ot/marginal_error"] for row in rows if "ot/marginal_error" in row]
        assert errors and (max(errors) > 0.01 if expected else max(errors) <= 0.01), errors


def test_a_gpu_job_whose_torch_cannot_use_cuda_is_one_line(workspace, tmp_path, monkeypatch):
    """A CPU-only torch (installed from a login node) in a job SLURM gave GPUs: refused at
    start-up instead of training on the CPU with gloo."""
    if torch.cuda.is_available():
        pytest.skip("this machine's torch can use CUDA")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    run_dir = tmp_path / "run"
    outcome = _train(tmp_path, tiny_run_config(workspace, run_dir))
    assert_user_error(outcome, "SLURM_GPUS_ON_NODE=8", "CUDA build of torch")
    assert not run_dir.exists()
