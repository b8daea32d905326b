"""Load a saved model and its tokenizer for inference (evaluation, CoT augmentation, export).

``load_model_for_eval`` accepts three kinds of saved model, each recognised by a
``CheckpointLoader`` and tried in order, the most specific first:

* a DeepSpeed ZeRO checkpoint holds weights but no architecture. The architecture comes from
  ``base_model``, else from the first ``config.json`` found in the checkpoint directory or up to
  two levels above it: a Hugging Face model config, or the run config the training wrote into
  its ``output_dir`` (whose ``student`` section built the model). Weights of the training
  module's ``student.`` submodule are kept; the distillation projectors are dropped;
* a LoRA adapter (peft: ``adapter_config.json``) is applied to its base model (``base_model``,
  else the adapter config's ``base_model_name_or_path``) and merged, so generation runs at the
  speed of a plain model;
* a Hugging Face model directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cot2align_ds.config import ConfigError, LoraConfig, validate_config
from cot2align_ds.engine.checkpoints import (
    consolidated_state_dict_from_zero_checkpoint,
    is_zero_checkpoint,
)
from cot2align_ds.errors import UserError, first_line
from cot2align_ds.models.loading import load_causal_lm, load_tokenizer, model_config


class ModelLoadError(UserError):
    """A path cannot be loaded as a model for evaluation."""


@dataclass(frozen=True)
class LoadOptions:
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype | None = None
    trust_remote_code: bool = False
    tokenizer_path: Path | None = None
    base_model: str | None = None  # architecture/base weights for adapters and ZeRO checkpoints
    # Pickled weights (pytorch_model.bin) can run code when loaded: refused unless the user
    # says they trust the file.
    allow_pickle: bool = False


LoadedModel = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@dataclass(frozen=True)
class CheckpointLoader:
    """Recognises one kind of saved model (``matches``) and loads it for evaluation."""

    name: str
    matches: Callable[[Path], bool]
    load: Callable[[Path, LoadOptions], LoadedModel]


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


def _is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def require_safetensors(path: Path, options: LoadOptions) -> None:
    """One line instead of loading a pickle: the weights of ``path`` must be safetensors."""
    if options.allow_pickle or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise ModelLoadError(
            f"{path}: weights are pickled ({pickles[0]}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the file"
        )


def _load_hf_model(path: Path, options: LoadOptions) -> LoadedModel:
    require_safetensors(path, options)
    extra = {} if options.dtype is None else {"dtype": options.dtype}
    if not options.allow_pickle:
        extra["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=options.trust_remote_code, local_files_only=True, **extra
        )
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{path}: cannot load the model ({first_line(error)})") from None
    tokenizer_path = options.tokenizer_path or path
    # AutoTokenizer builds an empty default tokenizer for a directory without tokenizer files
    # instead of failing, so their presence is checked first.
    if not any((tokenizer_path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{tokenizer_path}: no tokenizer files; save the tokenizer next to the model or pass "
            "tokenizer_path"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=options.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"{tokenizer_path}: cannot load a tokenizer ({first_line(error)}); "
            "save one next to the model or pass tokenizer_path"
        ) from None
    _check_vocab(model, tokenizer, tokenizer_path)
    return model.to(options.device).eval(), tokenizer


def _check_vocab(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokenizer_path: Path
) -> None:
    # Ids beyond the embedding table would fail deep inside generation; say so up front.
    num_embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > num_embeddings:
        raise ModelLoadError(
            f"{tokenizer_path}: tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"{num_embeddings}; pass the tokenizer the model was trained with"
        )


ADAPTER_CONFIG_FILENAME = "adapter_config.json"
STUDENT_PREFIX = "student."  # the student's weights inside the training engine's module
PEFT_PREFIX = "base_model.model."  # a peft-wrapped model's weights
_SEARCH_LEVELS = 3  # the checkpoint directory, its parent and grandparent


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path}: unreadable JSON ({first_line(error)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).exists()


def _load_pretrained(source: str, options: LoadOptions, what: str) -> LoadedModel:
    """A base model (local directory or hub name) and its tokenizer, in eval mode."""
    if _is_local(source):
        directory = Path(source).expanduser()
        if not (directory / "config.json").is_file():
            raise ModelLoadError(
                f"{what} '{source}' is not a model directory (no config.json); pass base_model"
            )
        return _load_hf_model(directory, options)
    extra = {} if options.dtype is None else {"dtype": options.dtype}
    if not options.allow_pickle:
        extra["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, trust_remote_code=options.trust_remote_code, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(
            options.tokenizer_path or source, trust_remote_code=options.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{what} '{source}': cannot load ({first_line(error)})") from None
    _check_vocab(model, tokenizer, Path(options.tokenizer_path or source))
    return model.to(options.device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------------------------


def is_lora_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_FILENAME).is_file()


def load_lora_adapter(path: Path, options: LoadOptions) -> LoadedModel:
    """Base model + adapter, merged into a plain model; the tokenizer saved with the adapter."""
    from peft import PeftModel  # imported on use: peft is slow to import

    require_safetensors(path, options)
    base = options.base_model or _read_json(path / ADAPTER_CONFIG_FILENAME).get(
        "base_model_name_or_path"
    )
    if not base:
        raise ModelLoadError(
            f"{path / ADAPTER_CONFIG_FILENAME}: no base_model_name_or_path; pass base_model"
        )
    if options.tokenizer_path is None and _has_tokenizer(path):
        options = replace(options, tokenizer_path=path)
    model, tokenizer = _load_pretrained(base, options, f"{path}: base model")
    try:
        adapted = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(
            f"{path}: cannot apply the adapter to base model '{base}' ({first_line(error)}); "
            "pass the base_model it was trained on"
        ) from None
    merged = adapted.merge_and_unload() if hasattr(adapted, "merge_and_unload") else adapted
    return merged.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Architecture:
    """An untrained model of the checkpoint's architecture, its tokenizer, and where from."""

    model: PreTrainedModel
    tokenizer: Any
    tokenizer_source: str
    where: str
    lora: LoraConfig | None = None


def _config_candidates(path: Path) -> list[Path]:
    directories = [path, *path.resolve().parents][:_SEARCH_LEVELS]
    return [d / "config.json" for d in directories if (d / "config.json").is_file()]


def _tokenizer_source(options: LoadOptions, path: Path, fallback: str | Path) -> str | Path:
    if options.tokenizer_path is not None:
        return options.tokenizer_path
    return path if _has_tokenizer(path) else fallback


def _from_hf_config(
    source: str | Path, tokenizer_source: str | Path, options: LoadOptions, where: str
) -> _Architecture:
    kwargs = {"trust_remote_code": options.trust_remote_code}
    if Path(tokenizer_source).is_dir() and not _has_tokenizer(Path(tokenizer_source)):
        raise ModelLoadError(
            f"{tokenizer_source}: no tokenizer files; save the tokenizer next to the checkpoint "
            "or pass tokenizer_path"
        )
    try:
        config = AutoConfig.from_pretrained(str(source), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source), **kwargs)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{source}: cannot build the model ({first_line(error)})") from None
    return _Architecture(model, tokenizer, str(tokenizer_source), where)


def _from_run_config(config_path: Path, options: LoadOptions) -> _Architecture:
    try:
        run = validate_config(_read_json(config_path), str(config_path))
    except ConfigError as error:
        raise ModelLoadError(f"{error}; pass base_model instead") from None
    spec = run.student
    if options.tokenizer_path is not None:
        spec = spec.model_copy(update={"tokenizer": str(options.tokenizer_path)})
    tokenizer = load_tokenizer(spec, "student")
    if spec.architecture is not None:
        model = load_causal_lm(spec, "student", tokenizer, "fp32")  # random init, cheap
    else:
        kwargs = {"trust_remote_code": spec.trust_remote_code}
        model = AutoModelForCausalLM.from_config(model_config(spec, "student"), **kwargs)
    where = f"{config_path} (student)"
    return _Architecture(model, tokenizer, spec.tokenizer_path, where, spec.lora)


def _architecture(path: Path, options: LoadOptions) -> _Architecture:
    if options.base_model is not None:
        base = options.base_model
        tokenizer_source = _tokenizer_source(options, path, base)
        return _from_hf_config(base, tokenizer_source, options, f"base model '{base}'")
    for config_path in _config_candidates(path):
        data = _read_json(config_path)
        if "model_type" in data:
            tokenizer_source = _tokenizer_source(options, path, config_path.parent)
            return _from_hf_config(config_path.parent, tokenizer_source, options, str(config_path))
        if "student" in data:
            return _from_run_config(config_path, options)
    raise ModelLoadError(
        f"{path}: a DeepSpeed checkpoint holds no architecture and no config.json was found "
        "next to it; pass base_model (the model or config it was trained from)"
    )


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"dtype '{dtype}' is not a torch dtype; use e.g. bfloat16")
    return value


def _student_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's weights: strip the training module's prefix, drop the projectors."""
    if not any(name.startswith(STUDENT_PREFIX) for name in state):
        return state
    return {
        name[len(STUDENT_PREFIX) :]: tensor
        for name, tensor in state.items()
        if name.startswith(STUDENT_PREFIX)
    }


def _wrap_lora(architecture: _Architecture, path: Path) -> torch.nn.Module:
    """The peft model the weights were saved from (LoRA trained under DeepSpeed)."""
    from cot2align_ds.models.lora import apply_lora

    lora = architecture.lora
    if lora is None:
        raise ModelLoadError(
            f"{path}: the checkpoint holds LoRA weights but {architecture.where} has no LoRA "
            "settings; evaluate it with the run's config.json next to it"
        )
    # The same wrapping as training, so parameter names match the checkpoint's.
    return apply_lora(architecture.model, lora)


def _tied_to_loaded(model: torch.nn.Module, names: set[str], loaded: set[str]) -> set[str]:
    """Of ``names``, those sharing storage with a loaded tensor (tied embeddings)."""
    tensors = model.state_dict()
    loaded_storage = {tensors[name].data_ptr() for name in loaded if name in tensors}
    return {name for name in names if tensors[name].data_ptr() in loaded_storage}


def _load_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, where: str
) -> None:
    """Load ``state`` into ``model``, refusing any name or shape that does not match."""
    expected = model.state_dict()
    missing = set(expected) - set(state)
    missing -= _tied_to_loaded(model, missing, set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{name} {tuple(state[name].shape)} vs {tuple(expected[name].shape)}"
        for name in state
        if name in expected and state[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        details = f"{len(missing)} missing, e.g. {sorted(missing)[:2]}; {len(unexpected)} "
        details += f"unexpected, e.g. {unexpected[:2]}; {len(mismatched)} of another shape"
        details += f", e.g. {mismatched[0]}" if mismatched else ""
        raise ModelLoadError(
            f"{path}: weights do not match the architecture from {where} ({details}); pass "
            "the base_model it was trained from"
        )
    model.load_state_dict(state, strict=False)  # strict would count tied weights as missing


def load_zero_checkpoint(path: Path, options: LoadOptions) -> LoadedModel:
    """Consolidate the ZeRO shards, load them into the architecture, merge LoRA if any."""
    architecture = _architecture(path, options)
    state = _student_weights(consolidated_state_dict_from_zero_checkpoint(path))
    model: torch.nn.Module = architecture.model
    if any(name.startswith(PEFT_PREFIX) for name in state):
        model = _wrap_lora(architecture, path)
    _load_weights(model, state, path, architecture.where)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    dtype = _torch_dtype(options.dtype)
    if dtype is not None:
        model = model.to(dtype)
    _check_vocab(model, architecture.tokenizer, Path(architecture.tokenizer_source))
    return model.to(options.device).eval(), architecture.tokenizer


_LOADERS = (
    CheckpointLoader("DeepSpeed ZeRO checkpoint", is_zero_checkpoint, load_zero_checkpoint),
    CheckpointLoader("LoRA adapter", is_lora_adapter, load_lora_adapter),
    CheckpointLoader("Hugging Face model directory", _is_hf_model_dir, _load_hf_model),
)


def load_model_for_eval(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    tokenizer_path: str | Path | None = None,
    base_model: str | Path | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a saved model and its tokenizer in eval mode on ``device``.

    ``path``: a Hugging Face model directory, a LoRA adapter directory or a DeepSpeed ZeRO
    checkpoint. ``base_model`` (hub name or directory) is the model an adapter was trained on,
    or the architecture of a ZeRO checkpoint; by default it is read from the adapter's config
    or found next to the checkpoint. Pickled weights are refused unless ``allow_pickle``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist; pass a saved model directory")
    options = LoadOptions(
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        tokenizer_path=None if tokenizer_path is None else Path(tokenizer_path),
        base_model=None if base_model is None else str(base_model),
        allow_pickle=allow_pickle,
    )
    for loader in _LOADERS:
        if loader.matches(path):
            return loader.load(path, options)
    raise ModelLoadError(
        f"{path} is not a model directory (no config.json); pass a saved Hugging Face model "
        "or a DeepSpeed checkpoint"
    )
