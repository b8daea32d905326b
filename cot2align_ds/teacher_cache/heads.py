"""The only teacher weights a cached run loads: its output head (logits from the cached last
hidden state) and, where a loss reads embeddings or layer 0 is recomputed, its input embedding.

The model is built on the ``meta`` device (shapes only) to find the two modules and their
parameter names; just those tensors are read from the checkpoint's safetensors files. A module
with buffers (e.g. Gemma's scaled embedding keeps its scale in one) cannot be rebuilt from
weights alone, so it is not loaded and its output is cached instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cot2align_ds.config import ModelSpec
from cot2align_ds.models.loading import model_config, torch_dtype
from cot2align_ds.teacher_cache.store import TeacherCacheError


class TeacherHeads(nn.Module):
    """``logits(hidden_BTH)`` as the model's forward computes them from its last hidden state;
    ``embed`` (None when it has buffers) the input embedding module."""

    def __init__(self, head: nn.Module, embed: nn.Module | None, softcap: float | None) -> None:
        super().__init__()
        self.head = head
        self.embed = embed
        self.softcap = softcap

    def logits(self, hidden_BTH: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden_BTH)
        if self.softcap:  # Gemma-2 style final-logit soft-capping
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _weight_files(source: str) -> list[Path]:
    root = Path(source).expanduser()
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise TeacherCacheError(f"teacher.name_or_path '{source}': no safetensors weights")
    return files


def teacher_weight_files(spec: ModelSpec) -> list[Path]:
    if spec.name_or_path is None:
        raise TeacherCacheError(
            "teacher_cache needs a saved teacher (teacher.name_or_path), not an architecture"
        )
    return _weight_files(spec.name_or_path)


def _read_tensors(files: list[Path], names: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    index = files[0].parent / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    for path in files:
        if where is not None and not any(where.get(n) == path.name for n in names):
            continue
        with safe_open(str(path), framework="pt") as handle:
            for name in names & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    return found


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _materialise(module: nn.Module, prefix: str, tensors: dict, dtype: torch.dtype) -> nn.Module:
    module = module.to_empty(device="cpu")
    state = {name: tensors[f"{prefix}.{name}"].to(dtype) for name, _ in module.named_parameters()}
    module.load_state_dict(state, strict=True)
    return module.requires_grad_(False)


def load_teacher_heads(spec: ModelSpec, precision: str, *, need_embed: bool) -> TeacherHeads:
    """The teacher's output head (and input embedding when ``need_embed`` and rebuildable)."""
    from transformers import AutoModelForCausalLM

    config = model_config(spec, "teacher")
    dtype = torch_dtype(precision)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head, embed = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    if any(True for _ in head.buffers()):
        raise TeacherCacheError(f"teacher '{spec.name_or_path}': its output head has buffers")
    head_name, embed_name = _module_name(skeleton, head), _module_name(skeleton, embed)
    rebuild_embed = need_embed and not any(True for _ in embed.buffers())
    wanted = {f"{head_name}.{name}" for name, _ in head.named_parameters()}
    wanted |= {f"{embed_name}.{name}" for name, _ in embed.named_parameters()}
    tensors = _read_tensors(teacher_weight_files(spec), wanted)
    head_weight = f"{head_name}.weight"
    if head_weight not in tensors and getattr(config, "tie_word_embeddings", False):
        tensors[head_weight] = tensors[f"{embed_name}.weight"]  # tied: stored once
    missing = sorted(n for n in wanted if n not in tensors and n.startswith(head_name))
    if missing:
        raise TeacherCacheError(f"teacher '{spec.name_or_path}': weights lack {missing[0]}")
    text = config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)
    return TeacherHeads(
        _materialise(head, head_name, tensors, dtype),
        _materialise(embed, embed_name, tensors, dtype) if rebuild_embed else None,
        softcap,
    )


def embeddings_rebuildable(spec: ModelSpec) -> bool:
    """Whether the input embedding module is plain weights (no buffers)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config(spec, "teacher"))
    return not any(True for _ in skeleton.get_input_embeddings().buffers())
