"""Model sizes for the planner: parameter counts, hidden sizes and linear shapes of a model,
read from its config without loading weights.

Field by field for the architectures we know (GPT-2, Llama, Mistral, Qwen2); any other
architecture is built on the ``meta`` device (no weights allocated) and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from cot2align_ds.config import ModelSpec
from cot2align_ds.errors import UserError
from cot2align_ds.models.loading import load_tokenizer, model_config
from cot2align_ds.models.lora import default_lora_targets

GIB = 1024**3


class PlanError(UserError):
    """The planner cannot size a model; one line naming the config key."""


@dataclass(frozen=True)
class LinearShape:
    """``count`` linear layers named ``name`` (the leaf name peft matches) of d_in -> d_out."""

    name: str
    d_in: int
    d_out: int
    count: int


@dataclass(frozen=True)
class ModelSize:
    model_type: str
    num_params: int  # unique parameters: tied embeddings counted once
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    largest_module_params: int  # the most ZeRO-3 gathers for one module (embedding or a linear)
    gated_mlp: bool
    linears: tuple[LinearShape, ...] = ()  # transformer-block linears (LoRA targets)
    source: str = "config fields"

    @property
    def block_params(self) -> int:
        """Weights of one transformer block: what ZeRO-3 gathers for each layer."""
        linears = sum(linear.d_in * linear.d_out * linear.count for linear in self.linears)
        layers = max(self.num_layers, 1)
        if linears:
            return linears // layers
        return max((self.num_params - self.vocab_size * self.hidden_size) // layers, 1)

    def lora_params(self, rank: int, target_modules: Sequence[str] | str | None) -> int:
        """LoRA adapter parameters: r * (d_in + d_out) per targeted linear layer (None: peft's
        default modules for this architecture)."""
        if target_modules is None:
            target_modules = default_lora_targets(self.model_type)
        wanted = None if target_modules == "all-linear" else set(target_modules)
        return sum(
            rank * (linear.d_in + linear.d_out) * linear.count
            for linear in self.linears
            if wanted is None or linear.name in wanted
        )


def _gpt2_size(config: PretrainedConfig) -> ModelSize:
    hidden, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    inner = config.n_inner or 4 * hidden
    linears = (
        LinearShape("c_attn", hidden, 3 * hidden, layers),
        LinearShape("c_proj", hidden, hidden, layers),
        LinearShape("c_fc", hidden, inner, layers),
        LinearShape("c_proj", inner, hidden, layers),
    )
    # Conv1D layers all carry a bias; two LayerNorms per block (weight + bias), one at the end.
    block = sum(lin.d_in * lin.d_out + lin.d_out for lin in linears) + 4 * hidden
    embeddings = (vocab + config.n_positions) * hidden
    head = 0 if config.tie_word_embeddings else vocab * hidden
    return ModelSize(
        model_type="gpt2",
        num_params=embeddings + layers * block + 2 * hidden + head,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inner,
        vocab_size=vocab,
        num_heads=config.n_head,
        largest_module_params=max(
            vocab * hidden, config.n_positions * hidden, *(lin.d_in * lin.d_out for lin in linears)
        ),
        gated_mlp=False,
        linears=linears,
    )


def _llama_like_size(config: PretrainedConfig) -> ModelSize:
    """Llama, Mistral and Qwen2: GQA attention, gated (SwiGLU) MLP, RMSNorm."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inner = config.intermediate_size
    linears = (
        LinearShape("q_proj", hidden, heads * head_dim, layers),
        LinearShape("k_proj", hidden, kv_heads * head_dim, layers),
        LinearShape("v_proj", hidden, kv_heads * head_dim, layers),
        LinearShape("o_proj", heads * head_dim, hidden, layers),
        LinearShape("gate_proj", hidden, inner, layers),
        LinearShape("up_proj", hidden, inner, layers),
        LinearShape("down_proj", inner, hidden, layers),
    )
    block = sum(lin.d_in * lin.d_out for lin in linears) + 2 * hidden
    block += _llama_like_biases(config, linears)
    head = 0 if config.tie_word_embeddings else vocab * hidden
    return ModelSize(
        model_type=config.model_type,
        num_params=vocab * hidden + layers * block + hidden + head,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inner,
        vocab_size=vocab,
        num_heads=heads,
        largest_module_params=max(vocab * hidden, max(lin.d_in * lin.d_out for lin in linears)),
        gated_mlp=True,
        linears=linears,
    )


def _llama_like_biases(config: PretrainedConfig, linears: tuple[LinearShape, ...]) -> int:
    """Bias parameters of one block: Qwen2 always biases q/k/v; Llama has config flags."""
    out = {lin.name: lin.d_out for lin in linears}
    if config.model_type == "qwen2":
        return out["q_proj"] + out["k_proj"] + out["v_proj"]
    total = 0
    if getattr(config, "attention_bias", False):
        total += out["q_proj"] + out["k_proj"] + out["v_proj"] + out["o_proj"]
    if getattr(config, "mlp_bias", False):
        total += 2 * out["gate_proj"] + out["down_proj"]
    return total


_FORMULAS: dict[str, Callable[[PretrainedConfig], ModelSize]] = {
    "gpt2": _gpt2_size,
    "llama": _llama_like_size,
    "mistral": _llama_like_size,
    "qwen2": _llama_like_size,
}


def model_size(config: PretrainedConfig) -> ModelSize:
    """Count from the config's fields; architectures we do not know are counted on ``meta``."""
    formula = _FORMULAS.get(config.model_type)
    if formula is not None:
        return formula(config)
    return meta_model_size(config)


def meta_model_size(config: PretrainedConfig) -> ModelSize:
    """Instantiate on the ``meta`` device (shapes only, no memory) and count the parameters."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as error:
        raise PlanError(
            f"cannot size a {type(config).__name__} as a causal LM ({str(error).splitlines()[0]})"
        ) from None
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    linears = _block_linears(model)
    text = config.get_text_config()
    hidden = _first_int(text, "hidden_size", "n_embd", "d_model")
    inner = _first_int(text, "intermediate_size", "n_inner", "ffn_dim", default=0) or 4 * hidden
    return ModelSize(
        model_type=config.model_type,
        num_params=sum(p.numel() for p in model.parameters()),
        num_layers=_first_int(text, "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=hidden,
        intermediate_size=inner,
        vocab_size=_first_int(text, "vocab_size"),
        num_heads=_first_int(text, "num_attention_heads", "n_head", default=1),
        largest_module_params=largest,
        gated_mlp=any(lin.name in ("gate_proj", "w1", "gate_up_proj") for lin in linears),
        linears=tuple(linears),
        source="meta instantiation",
    )


def _block_linears(model: torch.nn.Module) -> list[LinearShape]:
    """Every linear layer but the output head: what peft's ``all-linear`` targets."""
    head = model.get_output_embeddings()
    linears = []
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if is_linear and module is not head:
            d_out, d_in = _linear_dims(module, module.weight)
            linears.append(LinearShape(name.rsplit(".", 1)[-1], d_in, d_out, 1))
    return linears


def _linear_dims(module: torch.nn.Module, weight: torch.Tensor) -> tuple[int, int]:
    # transformers' Conv1D (GPT-2 style) stores its weight as (d_in, d_out), nn.Linear the reverse.
    if type(module).__name__ == "Conv1D":
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1])


def _first_int(config: PretrainedConfig, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    if default is None:
        raise PlanError(f"cannot read {names[0]} from a {type(config).__name__}")
    return default


def spec_config(spec: ModelSpec, role: str) -> PretrainedConfig:
    """The config of a student/teacher spec without loading weights.

    An ``architecture`` spec gets its vocabulary from its tokenizer when it does not set one,
    as the trainer does.
    """
    if spec.architecture is None:
        return model_config(spec, role)
    kwargs = dict(spec.architecture)
    if "vocab_size" not in kwargs:
        tokenizer = load_tokenizer(spec, role)
        kwargs["vocab_size"] = len(tokenizer)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(name, getattr(tokenizer, name))
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def config_block_params(spec: ModelSpec, role: str) -> int:
    """Weights of one transformer block, from the config (ZeRO-3 prefetch bucket size)."""
    return model_size(spec_config(spec, role)).block_params
