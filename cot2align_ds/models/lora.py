"""LoRA students (peft), as in the paper's settings B and C.

Training keeps the peft-wrapped model inside the ZeRO-3 engine (only adapter weights train).
Saving writes both the adapter (``student_adapter/``) and the merged model (``student/``) so
the result loads with a plain ``from_pretrained`` and can still be re-applied to its base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from cot2align_ds.config import ConfigError, LoraConfig


def default_lora_targets(model_type: str) -> list[str]:
    """peft's default LoRA modules for an architecture (what the reference code gets by not
    naming any): query and value projections for Llama, Mistral and Qwen2, ``c_attn`` for
    GPT-2."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(model_type) or DEFAULTS.get(model_type.removesuffix("_text"))
    if not targets:
        raise ConfigError(
            f"lora.target_modules: peft has no default modules for model type '{model_type}'; "
            "list them (e.g. [q_proj, v_proj]) or use all-linear"
        )
    return list(targets)


def apply_lora(
    model: torch.nn.Module, lora: LoraConfig, dtype: torch.dtype | None = None
) -> PeftModel:
    """Wrap ``model`` with adapters in ``dtype`` (default: fp32, peft's own choice).

    peft creates adapters in fp32 beside a bf16 base; the adapter's matmul with a bf16
    activation then fails, and DeepSpeed's ZeRO-3 flattening refuses mixed dtypes. DeepSpeed's
    optimizer keeps fp32 master copies of every trainable weight, so bf16 adapters lose nothing.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    target_modules = lora.target_modules
    if target_modules is None:
        target_modules = default_lora_targets(model_type)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, peft_config, autocast_adapter_dtype=dtype is None)
    if dtype is not None:
        for name, parameter in wrapped.named_parameters():
            # Only the adapters: base weights may be ZeRO-3 partitions, which must not be cast.
            if "lora_" in name:
                parameter.data = parameter.data.to(dtype)
    return wrapped


def save_lora_student(
    peft_model: PeftModel, state: dict[str, torch.Tensor], adapter_dir: Path, merged_dir: Path
) -> None:
    """Rebuild an unpartitioned copy from the gathered ``state``, save adapter and merged model.

    The engine's own module holds ZeRO-3 partitions, so peft's save/merge cannot run on it.
    """
    base_config = peft_model.get_base_model().config
    # A private copy: from_config with a dtype mutates the config it is given.
    base = AutoModelForCausalLM.from_config(base_config.__class__.from_dict(base_config.to_dict()))
    copy = get_peft_model(base, peft_model.peft_config["default"])
    missing, unexpected = copy.load_state_dict(state, strict=False)
    if unexpected or [name for name in missing if "lora_" in name]:
        raise RuntimeError(f"LoRA state does not match the model: {unexpected or missing}")
    copy.save_pretrained(adapter_dir, safe_serialization=True)
    copy.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
