"""A run's model as users take it away: the final save stores tied embeddings once, ``export``
writes the best (or last) student as a standalone model, ``eval --run`` evaluates it with the
run's own template and lengths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from support import subprocess_env, tiny_run_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cot2align_ds.cli import app

runner = CliRunner()


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cot2align_ds.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(workspace, tmp_path_factory):
    """Two steps of SFT on the tiny (tied-embedding GPT-2) student, compact template, bf16."""
    from cot2align_ds.config import validate_config
    from cot2align_ds.train.loop import run_train

    run_dir = tmp_path_factory.mktemp("export") / "run"
    config = tiny_run_config(workspace, run_dir, distill={"method": "sft"})
    config["train"].update(max_steps=2, precision="bf16")
    config["eval"] = {"max_new_tokens": 24}  # the tiny model has 256 positions
    run_train(validate_config(config))
    return run_dir


def _keys(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


def test_the_final_model_stores_tied_embeddings_once(trained_run):
    keys = _keys(trained_run / "student")
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    model = AutoModelForCausalLM.from_pretrained(trained_run / "student")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_export_writes_a_standalone_model_in_the_runs_precision(trained_run, tmp_path):
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", "--run", str(trained_run), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "lm_head.weight" not in _keys(out)
    exported = AutoModelForCausalLM.from_pretrained(out)
    final = AutoModelForCausalLM.from_pretrained(trained_run / "student")
    assert exported.dtype == torch.bfloat16
    for name, tensor in final.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    # A second export into the same place needs --overwrite; the first stays as it was.
    before = (out / "model.safetensors").read_bytes()
    again = runner.invoke(app, ["export", "--run", str(trained_run), "--output", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert (out / "model.safetensors").read_bytes() == before
    fp32 = runner.invoke(app, ["export", "--run", str(trained_run), "--output", str(out),
                               "--dtype", "fp32", "--overwrite", "--last"])  # fmt: skip
    assert fp32.exit_code == 0, fp32.output
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


def test_eval_run_uses_the_runs_template_and_lengths(trained_run, workspace, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--run", str(trained_run), "--data", str(workspace["train"]),
            "--output-dir", str(out), "--greedy"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    used = json.loads((out / "eval_args.json").read_text())
    run_config = json.loads((trained_run / "config.json").read_text())
    assert used["template"] == run_config["data"]["template"] == "compact"
    assert used["max_prompt_tokens"] == run_config["data"]["max_prompt_tokens"]
    assert used["max_new_tokens"] == run_config["eval"]["max_new_tokens"]
    assert used["prompt_cut"] == run_config["data"]["prompt_truncation"] == "left"
    assert used["max_length"] is None
    assert used["seeds"] == []  # greedy: no seed is used
    assert used["model_path"] == str(trained_run / "student")
    both = runner.invoke(app, [*args[:1], "--model", str(trained_run / "student"), *args[1:]])
    assert both.exit_code == 2 and "exactly one of --model and --run" in both.stderr


def test_export_pushes_the_model_to_a_hub(trained_run, tmp_path):
    """The real huggingface_hub client uploads the exported directory to a local Hub server;
    what arrives is byte for byte what was exported, in a private repo, and loads as a model."""
    from hub_server import LocalHub

    env = {**subprocess_env(), "HF_TOKEN": "hf_local_test_token", "HF_HUB_OFFLINE": "0"}
    out = tmp_path / "exported"
    with LocalHub(tmp_path / "hub") as hub:
        args = ["export", "--run", str(trained_run), "--output", str(out)]
        pushed = _cli([*args, "--push-to-hub", "me/tiny", "--hub-endpoint", hub.endpoint], env)
        assert pushed.returncode == 0, pushed.stderr
        assert f"-> {hub.endpoint}/me/tiny/commit/" in pushed.stdout
        assert hub.created == [
            {"name": "tiny", "organization": "me", "visibility": "private", "type": "model"}
        ]
        assert all(h.get("authorization") == "Bearer hf_local_test_token"
                   for _, path, h in hub.requests if path.startswith("/api/"))  # fmt: skip
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        offline = _cli([*args, "--overwrite", "--push-to-hub", "me/tiny"],
                       {**env, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert "hf_local_test_token" not in pushed.stdout + pushed.stderr
    uploaded = tmp_path / "hub" / "me" / "tiny"
    names = sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in uploaded.iterdir()) == names and "model.safetensors" in names
    for name in names:
        assert (uploaded / name).read_bytes() == (out / name).read_bytes()
    assert AutoModelForCausalLM.from_pretrained(uploaded).config.vocab_size > 0
    # Offline, the push is refused in one line before anything is exported or touched.
    assert offline.returncode == 2 and offline.stderr.count("\n") == 1
    assert offline.stderr.startswith("error: --push-to-hub needs the network")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
