"""Shared test helpers (importable from any test folder: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

TEACHER_ARCH = {
    "model_type": "llama",
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
STUDENT_ARCH = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256}


def tiny_run_config(workspace: dict[str, Path], output_dir: Path, **sections) -> dict:
    """A complete run config dict for the tiny workspace; ``sections`` update it shallowly."""
    config = {
        "output_dir": str(output_dir),
        "student": {"architecture": STUDENT_ARCH, "tokenizer": str(workspace["student_tok"])},
        "teacher": {"name_or_path": str(workspace["teacher"])},
        "data": {
            "train_file": str(workspace["train"]),
            "template": "compact",
            "max_prompt_tokens": 96,
            "max_total_tokens": 160,
            "num_workers": 0,
        },
        "distill": {"method": "uld", "kd_rate": 0.5, "temperature": 1.0},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "lr": 3e-3,
            "precision": "fp32",
            "log_every": 1,
        },
        "deepspeed": {"dist_timeout_s": 120},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """The environment for a child CLI process: without this process's rendezvous variables,
    whose MASTER_PORT the in-process world of one is already bound to."""
    import os

    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARS}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    return env


def is_partitioned(parameter) -> bool:
    """True when a parameter is a ZeRO-3 partition (the local tensor holds no full copy)."""
    return hasattr(parameter, "ds_id") and parameter.numel() == 0
