"""A LoRA student (peft) distils through the ZeRO-3 engines and evaluates, at world size 1."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from support import tiny_run_config
from transformers import AutoModelForCausalLM

from cot2align_ds.config import validate_config
from cot2align_ds.data.records import read_records
from cot2align_ds.eval.evaluate import evaluate_records
from cot2align_ds.inference.loading import load_model_for_eval


@pytest.mark.parametrize(
    "precision,method,cot2align",
    [("fp32", "uld", False), ("bf16", "uld", False), ("bf16", "dskd_cma", True)],
)
def test_lora_student_distils_saves_adapter_and_merged_model(
    workspace, tmp_path, precision, method, cot2align
):
    from cot2align_ds.train.loop import run_train

    config = tiny_run_config(
        workspace,
        tmp_path / "run",
        distill={"method": method},
        train={"max_steps": 4, "lr": 1e-2, "precision": precision},
    )
    config["student"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    if cot2align:
        config["cot2align"] = {"enabled": True, "num_iters": 10}
        config["data"]["cot_records"] = "non_empty_input"
    result = run_train(validate_config(config))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 4 and all(math.isfinite(v) for row in rows for v in row.values())
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
