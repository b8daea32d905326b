"""Batched text generation with any Hugging Face causal LM and tokenizer.

Prompts are tokenized here (not by ``tokenizer(..., padding=True)``) so that left padding and
the pad-token fallback never touch the caller's tokenizer: the pad id is only used to fill
masked positions. Every decoding knob that matters is set explicitly on the
``GenerationConfig``, because transformers fills unset fields from the model's own
``generation_config.json`` (a hub model may ship temperature 0.7 / top_k 20 / repetition
penalty), which would silently change the evaluation protocol.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from cot2align_ds.errors import UserError

PromptCut = Literal["left", "right"]


def truncate_prompt(
    ids: list[int], max_tokens: int, special_ids: set[int], cut: PromptCut = "left"
) -> list[int]:
    """At most ``max_tokens`` ids. ``left`` (default) keeps the last ones, so the template's
    response marker next to the answer survives, and keeps leading special tokens (BOS) in
    front; ``right`` keeps the first ones, as the reference code does."""
    if len(ids) <= max_tokens:
        return ids
    if cut == "right":
        return ids[:max_tokens]
    num_prefix = 0
    while num_prefix < max_tokens - 1 and ids[num_prefix] in special_ids:
        num_prefix += 1
    keep = max_tokens - num_prefix
    return ids[:num_prefix] + ids[len(ids) - keep :]


class GenerationSettingsError(UserError):
    """Decoding settings are invalid or do not fit the model."""


@dataclass(frozen=True)
class DecodingConfig:
    """How to decode. Defaults are the paper's evaluation protocol (docs/method.md section 5).

    ``top_k=0`` means no top-k filtering; ``no_repeat_ngram_size=0`` disables that constraint;
    ``max_prompt_tokens=None`` keeps whole prompts (they are cut from the left otherwise).
    """

    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6
    max_prompt_tokens: int | None = 256
    prompt_cut: PromptCut = "left"
    prompt_special_tokens: bool = True
    # Cap on prompt + new tokens (the reference's max_length); None: max_new_tokens alone.
    max_length: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (got {self.temperature}); use greedy")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            problems.append("top_k and no_repeat_ngram_size must be >= 0 (0 disables them)")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"max_length must be >= 2 (got {self.max_length})")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            problems.append(f"max_prompt_tokens must be >= 1 (got {self.max_prompt_tokens})")
        if problems:
            raise GenerationSettingsError("; ".join(problems))

    def generation_config(
        self, *, eos_token_id: int | list[int] | None, pad_token_id: int
    ) -> GenerationConfig:
        common = {
            "max_new_tokens": self.max_new_tokens,
            "min_length": 0,
            "num_beams": 1,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "use_cache": True,
        }
        if self.greedy:
            # Sampling-only knobs are left out: transformers warns when they are set for greedy.
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            typical_p=1.0,
            **common,
        )


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Pad positions are masked out, so any valid id works; prefer pad, then EOS, then 0.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_prompt_tokens: int | None,
    *,
    cut: PromptCut = "left",
    special_tokens: bool = True,
) -> list[list[int]]:
    """Token ids per prompt, with the tokenizer's special tokens (``special_tokens``), cut to
    ``max_prompt_tokens`` as ``truncate_prompt`` does (training prompts are cut the same way).
    """
    if not prompts:
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=special_tokens)["input_ids"]
    if max_prompt_tokens is None:
        return [list(ids) for ids in encoded]
    special_ids = set(tokenizer.all_special_ids)
    return [truncate_prompt(list(ids), max_prompt_tokens, special_ids, cut) for ids in encoded]


def _left_pad(
    batch_ids: Sequence[list[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS, the model's own end tokens and
    the chat template's end-of-turn token.

    Instruct and chat models end a turn with a token other than the tokenizer's EOS (Gemma-3:
    ``<end_of_turn>`` beside ``<eos>``; Llama-3-Instruct: ``<|eot_id|>``), listed in their
    ``generation_config`` or written by their chat template after each answer; stopping at EOS
    alone would run every answer to max_new_tokens.
    """
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    candidates = list(configured or [])
    if getattr(tokenizer, "chat_template", None):
        turn_end = tokenizer(chat_end_text(tokenizer), add_special_tokens=False)["input_ids"]
        if len(turn_end) == 1:
            candidates += turn_end
    for token_id in candidates:
        if token_id not in ids and token_id < len(tokenizer):
            ids.append(int(token_id))
    return ids


_ANSWER_MARKER = "cot2align-answer-marker"


def chat_end_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the chat template writes right after an assistant answer (trailing whitespace cut),
    e.g. ``<|im_end|>`` or ``<end_of_turn>``: the answer's end marker in training, and a stop
    token in generation."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _ANSWER_MARKER}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    return text[text.rindex(_ANSWER_MARKER) + len(_ANSWER_MARKER) :].rstrip()


def _cut_at_eos(ids: list[int], end_ids: Sequence[int]) -> list[int]:
    """The ids before the first end token (all of them when none occurs)."""
    ends = set(end_ids)
    for position, token_id in enumerate(ids):
        if token_id in ends:
            return ids[:position]
    return ids


def _check_length(model: PreTrainedModel, prompt_length: int, max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_length + max_new_tokens > limit:
        raise GenerationSettingsError(
            f"prompt of {prompt_length} tokens + max_new_tokens {max_new_tokens} exceeds the "
            f"model's {limit} positions; lower max_prompt_tokens or max_new_tokens"
        )


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed sampling without disturbing the caller's global RNG streams."""
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def _eval_mode(model: PreTrainedModel) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    decoding: DecodingConfig,
    *,
    seed: int = 0,
    batch_size: int = 8,
    show_progress: bool = False,
    synced_gpus: bool | None = None,
) -> list[list[int]]:
    """New token ids per prompt (in input order), stopped before the first end token.

    Prompts are batched longest first (less padding; the order is restored); the sampled
    output for one seed therefore depends on ``batch_size`` but is reproducible for a fixed one.
    ``synced_gpus=True``: a ZeRO-3 model sharded over ranks; every rank keeps stepping until all
    are done, so every rank must pass the same number of prompts (None: transformers decides).
    """
    if batch_size < 1:
        raise GenerationSettingsError(f"batch_size must be >= 1 (got {batch_size})")
    prompt_ids = encode_prompts(
        tokenizer,
        prompts,
        decoding.max_prompt_tokens,
        cut=decoding.prompt_cut,
        special_tokens=decoding.prompt_special_tokens,
    )
    empty = [index for index, ids in enumerate(prompt_ids) if not ids]
    if empty:
        raise GenerationSettingsError(f"prompts {empty} are empty after tokenization")
    order = sorted(range(len(prompt_ids)), key=lambda index: -len(prompt_ids[index]))
    pad_token_id, end_ids = _pad_token_id(tokenizer), end_token_ids(model, tokenizer)
    config = decoding.generation_config(eos_token_id=end_ids or None, pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    bar = tqdm(total=len(order), desc="generate", unit="prompt", disable=not show_progress)
    # no_grad, not inference_mode: ZeRO-3 gathers parameters in hooks during generation, and
    # tensors created under inference_mode could not be used by the training step afterwards.
    with bar, _eval_mode(model), _seeded(seed, device), torch.no_grad():
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = [prompt_ids[i] for i in indices]
            new_ids = _generate_batch(
                model, batch, _batch_config(config, decoding, batch), device, synced_gpus
            )
            for index, ids in zip(indices, new_ids, strict=True):
                outputs[index] = _cut_at_eos(ids, end_ids)
            bar.update(len(indices))
    return outputs


def _batch_config(config: GenerationConfig, decoding: DecodingConfig, batch) -> GenerationConfig:
    """With ``decoding.max_length``, the new-token budget left by the batch's longest prompt."""
    if decoding.max_length is None:
        return config
    room = max(decoding.max_length - max(len(ids) for ids in batch), 1)
    if room >= config.max_new_tokens:
        return config
    limited = copy.deepcopy(config)
    limited.max_new_tokens = room
    return limited


def _generate_batch(
    model: PreTrainedModel,
    batch_ids: list[list[int]],
    config: GenerationConfig,
    device: torch.device,
    synced_gpus: bool | None = None,
) -> list[list[int]]:
    _check_length(model, max(len(ids) for ids in batch_ids), config.max_new_tokens)
    input_ids, attention_mask = _left_pad(batch_ids, config.pad_token_id, device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        synced_gpus=synced_gpus,
    )
    return output[:, input_ids.shape[1] :].tolist()


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    decoding: DecodingConfig,
    *,
    seed: int = 0,
    batch_size: int = 8,
    show_progress: bool = False,
    synced_gpus: bool | None = None,
) -> list[str]:
    """Generated continuations (new text only, stripped), one per prompt, in input order."""
    new_ids = generate_ids(
        model,
        tokenizer,
        prompts,
        decoding,
        seed=seed,
        batch_size=batch_size,
        show_progress=show_progress,
        synced_gpus=synced_gpus,
    )
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
