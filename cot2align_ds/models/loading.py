"""Load students and teachers: a Hugging Face hub name, a local directory, or a small config.

Everything goes through real ``from_pretrained`` / ``from_config`` calls. ``trust_remote_code``
is passed only when the user set it; weights are read from safetensors only
(``use_safetensors=True``), never from pickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from cot2align_ds.config import ModelSpec
from cot2align_ds.errors import UserError, first_line


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded; one line naming the config key and what to do."""


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def load_tokenizer(spec: ModelSpec, role: str, *, strict: bool = True) -> PreTrainedTokenizerBase:
    """Load the tokenizer; ``strict`` requires an EOS and fills a missing pad with EOS."""
    source = spec.tokenizer_path
    key = f"{role}.tokenizer" if spec.tokenizer else f"{role}.name_or_path"
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise ModelLoadError(f"{key}: '{source}' does not exist; give a tokenizer directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(Path(source).expanduser()) if _looks_local(source) else source,
            trust_remote_code=spec.trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{key}: cannot load tokenizer '{source}' ({first_line(error, 200)})"
        ) from None
    if not strict:
        return tokenizer
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{key}: tokenizer '{source}' has no EOS token; answers need one")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked everywhere, so reusing EOS as pad is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    spec: ModelSpec, role: str, tokenizer: PreTrainedTokenizerBase, precision: str
) -> torch.nn.Module:
    """Build or load the model; call inside ``engine.zero3_loading`` to load into partitions."""
    dtype = torch_dtype(precision)
    attention = {}
    if spec.attn_implementation is not None:
        attention["attn_implementation"] = spec.attn_implementation
    if spec.architecture is not None:
        return _from_architecture(spec.architecture, tokenizer, dtype, role, **attention)
    source = spec.name_or_path or ""
    _require_model_dir(source, role)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(Path(source).expanduser()) if _looks_local(source) else source,
            dtype=dtype,
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=True,
            **attention,
        )
    except (*_LOAD_ERRORS, ImportError) as error:
        raise ModelLoadError(
            f"{role}.name_or_path: cannot load '{source}' ({first_line(error, 200)})"
        ) from None


def _require_model_dir(source: str, role: str) -> None:
    if _looks_local(source) and not (Path(source).expanduser() / "config.json").is_file():
        raise ModelLoadError(
            f"{role}.name_or_path: '{source}' is not a model directory (no config.json); "
            "give a saved Hugging Face model or a hub name"
        )


# What transformers and safetensors raise for a model they cannot build or read (an unknown
# model type, dimensions the architecture rejects, a truncated or corrupt weights file): caught
# here, at the boundary, and reported as one line naming the config key.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AssertionError, RuntimeError)
_LOAD_ERRORS += (SafetensorError, StrictDataclassError)


def _architecture_config(architecture: dict[str, Any], role: str, **defaults) -> PretrainedConfig:
    kwargs = dict(architecture)
    model_type = kwargs.pop("model_type")
    for key, value in defaults.items():
        kwargs.setdefault(key, value)
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except _LOAD_ERRORS as error:
        raise ModelLoadError(
            f"{role}.architecture: transformers cannot build a '{model_type}' config from it "
            f"({first_line(error, 200)}); fix the architecture keys"
        ) from None


def _from_architecture(
    architecture: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    role: str,
    **attention: str,
) -> torch.nn.Module:
    config = _architecture_config(
        architecture,
        role,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    try:
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
    except (*_LOAD_ERRORS, ImportError) as error:
        raise ModelLoadError(
            f"{role}.architecture: transformers cannot build the model "
            f"({first_line(error, 200)}); fix the architecture keys"
        ) from None


def model_config(spec: ModelSpec, role: str) -> PretrainedConfig:
    """The model's config without loading weights (used to size DeepSpeed buffers)."""
    if spec.architecture is not None:
        return _architecture_config(spec.architecture, role)
    source = spec.name_or_path or ""
    _require_model_dir(source, role)
    try:
        return AutoConfig.from_pretrained(
            str(Path(source).expanduser()) if _looks_local(source) else source,
            trust_remote_code=spec.trust_remote_code,
        )
    except _LOAD_ERRORS as error:
        raise ModelLoadError(
            f"{role}.name_or_path: cannot load '{source}' ({first_line(error, 200)})"
        ) from None


def embedding_rows_from_config(spec: ModelSpec, role: str) -> int | None:
    """The model's vocabulary rows from its config, or None for a tokenizer-only directory."""
    try:
        return int(model_config(spec, role).vocab_size)
    except (UserError, AttributeError, TypeError):
        return None


def config_hidden_size(spec: ModelSpec, role: str) -> int:
    return _hidden_size(model_config(spec, role))


def config_largest_param(spec: ModelSpec, role: str) -> int:
    """Elements of the model's largest weight from its config: the embedding (or LM head),
    or the widest MLP projection."""
    config = model_config(spec, role)
    hidden = _hidden_size(config)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    inner = int(inner or 4 * hidden)
    return max(vocab * hidden, inner * hidden)


def hidden_size_of(model: torch.nn.Module) -> int:
    return _hidden_size(model.config)


def _hidden_size(config: PretrainedConfig) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ModelLoadError(f"cannot tell the hidden size of a {type(config).__name__}")


def embedding_rows(model: torch.nn.Module) -> int:
    embeddings = model.get_input_embeddings()
    shape = getattr(embeddings.weight, "ds_shape", embeddings.weight.shape)
    return int(shape[0])


def check_vocab_fits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, role: str) -> None:
    """Token ids past the last embedding row would crash deep inside the forward pass."""
    rows = embedding_rows(model)
    if rows < len(tokenizer):
        raise ModelLoadError(
            f"{role}: the model has {rows} embedding rows but its tokenizer has {len(tokenizer)} "
            "tokens; use the tokenizer the model was trained with (or resize its embeddings)"
        )


def embeddings_are_hidden_state_0(config) -> bool:
    """Whether ``hidden_states[0]`` is the token embedding (up to one constant factor, e.g.
    Gemma's sqrt(hidden)): rotary models add no position embedding to it; GPT-2-style models
    (absolute positions) do."""
    absolute = getattr(config, "position_embedding_type", None) == "absolute"
    rotary = any(
        getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta")
    )
    return rotary and not absolute
