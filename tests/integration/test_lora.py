"""A LoRA student (peft) distils through the ZeRO-3 engines and evaluates, at world size 1."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from support import tiny_run_config
from transformers import AutoModelForCausalLM

from cot2align_ds.config import validate_config
from cot2align_ds.data.records import read_records
from cot2align_ds.eval.evaluate import evaluate_records, load_model_for_eval


def test_lora_student_distils_saves_adapter_and_merged_model(workspace, tmp_path):
    from cot2align_ds.train.loop import run_train

    config = tiny_run_config(workspace, tmp_path / "run", train={"max_steps": 4, "lr": 1e-2})
    config["student"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    result = run_train(validate_config(config))
    adapter_dir = tmp_path / "run" / "student_adapter"
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    # Training moved the adapters: lora_B starts at zero, so a non-zero B means updates landed.
    assert any(name.endswith("lora_B.weight") and t.abs().sum() > 0 for name, t in adapter.items())
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    model, tokenizer = load_model_for_eval(result.model_dir)
    evaluation = evaluate_records(
        model,
        tokenizer,
        read_records(workspace["train"])[:4],
        template="compact",
        greedy=True,
        metrics=("exact_match", "rouge_l"),
        max_new_tokens=6,
    )
    assert set(evaluation.summary()) == {"exact_match", "rouge_l"}
    assert torch.isfinite(torch.tensor(evaluation.summary()["rouge_l"]["mean"]))
