"""``cot2align cache-teacher``: run the teacher alone over every view of every training record
and store what the run's losses read from it (``store.py``); and what a run needs from a cache
(``run_layout``), which ``train`` checks before reading one.

Resumable: views are grouped into fixed batches of examples in file order; each rank takes
every ``world``-th batch; a batch whose views are all stored is skipped, any other is recomputed
whole, so every view is always computed in the same batch as in an uninterrupted build (the same
bits) and stored once. Under ZeRO-3 every rank must run the same number of teacher forwards, so
a rank with less left runs stand-in forwards whose outputs are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.config import RunConfig
from cot2align_ds.data.batch import IGNORE_INDEX, TokenSide
from cot2align_ds.data.collator import DistillCollator
from cot2align_ds.data.examples import make_examples
from cot2align_ds.data.records import train_records
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.methods import get_method
from cot2align_ds.models.loading import (
    embeddings_are_hidden_state_0,
    load_tokenizer,
    model_config,
    torch_dtype,
)
from cot2align_ds.teacher_cache.heads import (
    embeddings_rebuildable,
    load_teacher_heads,
    teacher_weight_files,
)
from cot2align_ds.teacher_cache.store import (
    FORMAT_VERSION,
    INDEX_FILENAME,
    CacheLayout,
    TeacherCacheError,
    check_compatible,
    completed_shards,
    file_digest,
    read_index,
    view_key,
    view_span,
    write_index,
)

_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat")


def _tokenizer_files(spec) -> list[Path]:
    root = Path(spec.tokenizer_path).expanduser()
    if not root.is_dir():
        return []
    return sorted(
        path
        for path in root.iterdir()
        if path.is_file() and path.name.startswith(_TOKENIZER_FILES) or path.suffix == ".model"
    )


def _record_digests(records) -> dict[str, str]:
    return {
        record.id: hashlib.blake2b(
            json.dumps(record.model_dump(mode="json"), sort_keys=True).encode(), digest_size=12
        ).hexdigest()
        for record in records
    }


def needed_layers(config: RunConfig, num_hidden_states: int) -> set[int]:
    """Absolute ``hidden_states`` indices the run's losses read from the teacher."""
    last = num_hidden_states - 1
    for index, pair in enumerate(config.cot2align.layer_pairs if config.cot2align.enabled else []):
        if not -num_hidden_states <= pair.teacher < num_hidden_states:
            raise TeacherCacheError(
                f"cot2align.layer_pairs[{index}].teacher={pair.teacher}: the teacher has "
                f"{num_hidden_states} hidden states"
            )
    layers = {last}  # logits (every teacher method) and DSKD's last hidden state
    if config.cot2align.enabled:
        layers |= {pair.teacher % num_hidden_states for pair in config.cot2align.layer_pairs}
    if config.distill.method == "dskd_cma":
        layers.add(0)  # its embeddings, read there or from the table (see run_layout)
    return layers


def run_layout(config: RunConfig, records) -> CacheLayout:
    """The fingerprint of everything that determines the cached values, and the layers stored."""
    if config.teacher is None or not get_method(config.distill.method).needs_teacher:
        raise TeacherCacheError("teacher_cache: this run has no teacher to cache")
    if config.distill.method == "dskd_cma" and config.distill.dskd_std != "response":
        raise TeacherCacheError(
            "teacher_cache: distill.dskd_std 'padded' reads every teacher position, the cache "
            "keeps the response spans; use dskd_std: response"
        )
    teacher_config = model_config(config.teacher, "teacher")
    num_hidden_states = int(teacher_config.get_text_config().num_hidden_layers) + 1
    layers = needed_layers(config, num_hidden_states)
    in_hidden = embeddings_are_hidden_state_0(teacher_config)
    rebuildable = embeddings_rebuildable(config.teacher)  # builds a meta skeleton: ask once
    recompute_0 = in_hidden and rebuildable
    if config.distill.method == "dskd_cma" and not in_hidden:
        if not rebuildable:
            raise TeacherCacheError(
                "teacher_cache: DSKD-CMA reads this teacher's embedding table, which cannot be "
                "loaded on its own (its module has buffers)"
            )
        layers.discard(0)  # read from the loaded table, not from hidden_states[0]
    if recompute_0:
        layers.discard(0)
    data = config.data
    digests = _record_digests(records)
    fingerprint = {
        "format": FORMAT_VERSION,
        "teacher_weights": file_digest(teacher_weight_files(config.teacher)),
        "teacher_tokenizer": file_digest(_tokenizer_files(config.teacher)),
        "data": hashlib.blake2b(
            json.dumps(digests, sort_keys=True).encode(), digest_size=16
        ).hexdigest(),
        "template": data.template,
        "max_prompt_tokens": data.max_prompt_tokens,
        "max_total_tokens": data.max_total_tokens,
        "prompt_truncation": data.prompt_truncation,
        "prompt_special_tokens": data.prompt_special_tokens,
        "cot_records": data.cot_records,
        "standard_views": config.cot2align.enabled and config.cot2align.cross_cot,
        "precision": config.train.precision,
        "recomputed_layer_0": recompute_0,
        "_records": digests,
    }
    return CacheLayout(fingerprint, tuple(sorted(layers)), num_hidden_states)


def cache_collator(config: RunConfig, student_tokenizer, teacher_tokenizer) -> DistillCollator:
    """The training collator's tokenization of both sides (no MinED alignment)."""
    data = config.data
    return DistillCollator(
        student_tokenizer,
        teacher_tokenizer,
        max_prompt_tokens=data.max_prompt_tokens,
        max_total_tokens=data.max_total_tokens,
        prompt_cut=data.prompt_truncation,
        prompt_special_tokens=data.prompt_special_tokens,
        cot_views=config.cot2align.enabled and config.cot2align.cross_cot,
    )


def _teacher_sides(batch) -> list[TokenSide]:
    sides = [batch.teacher]
    if batch.standard is not None and bool(batch.standard.valid_C.any()):
        sides.append(batch.standard.teacher)
    return sides


def _keys(side: TokenSide) -> list[tuple[int, str, int, int]]:
    out = []
    for row in range(side.num_rows):
        span = view_span(side, row)
        if span is not None:
            out.append((row, view_key(side, row, span[0]), *span))
    return out


class ShardWriter:
    """Buffers views and writes a shard (tensors, then its manifest) every ``shard_views``."""

    def __init__(self, root: Path, rank: int, shard_views: int, fingerprint: str) -> None:
        self.root, self.rank, self.shard_views, self.fingerprint = (
            root,
            rank,
            shard_views,
            fingerprint,
        )
        mine = [s for s in completed_shards(root) if s["file"].startswith(f"shard-r{rank}-")]
        self.next = 1 + max((int(s["file"].split("-")[2].split(".")[0]) for s in mine), default=-1)
        self.tensors: dict[str, torch.Tensor] = {}
        self.views: dict[str, list[int]] = {}
        self.tokens = 0

    def add(self, key: str, start: int, end: int, states: dict[int, torch.Tensor]) -> None:
        if key in self.views:
            return
        for layer, tensor in states.items():
            self.tensors[f"{key}/{layer}"] = tensor.detach().to("cpu").contiguous().clone()
        self.views[key] = [start, end]
        self.tokens += end - start
        if len(self.views) >= self.shard_views:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.views:
            return
        name = f"shard-r{self.rank}-{self.next:05d}"
        staging = self.root / f".{name}.safetensors.partial"
        save_file(self.tensors, str(staging))
        os.replace(staging, self.root / f"{name}.safetensors")
        manifest = {"file": f"{name}.safetensors", "views": self.views, "tokens": self.tokens,
                    "fingerprint": self.fingerprint}  # fmt: skip
        write_text_atomic(self.root / f"{name}.json", json.dumps(manifest))
        self.next += 1
        self.tensors, self.views, self.tokens = {}, {}, 0


def layout_digest(config: RunConfig) -> str:
    """One name per distinct cache: runs with the same digest can share one (the reasoning
    benchmark keys its caches by it across cells and seeds)."""
    return _fingerprint_digest(run_layout(config, train_records(config)))


def _fingerprint_digest(layout: CacheLayout) -> str:
    public = {k: v for k, v in layout.fingerprint.items() if not k.startswith("_")}
    text = json.dumps([public, list(layout.layers)], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _load_teacher_engine(config: RunConfig, tokenizer, world_size: int):
    from cot2align_ds.engine.ds_config import load_ds_config, resolve_teacher_ds_config
    from cot2align_ds.models.loading import (
        check_vocab_fits,
        config_hidden_size,
        config_largest_param,
        load_causal_lm,
    )

    raw, path = load_ds_config(config.deepspeed.teacher_config)
    ds = resolve_teacher_ds_config(
        raw, path, micro_batch_size=config.teacher_cache.batch_size, world_size=world_size,
        precision=config.train.precision,
        hidden_size=config_hidden_size(config.teacher, "teacher"),
        largest_param=config_largest_param(config.teacher, "teacher"),
    )  # fmt: skip
    dse.require_nvme_io(ds, "teacher")
    with dse.zero3_loading(ds):
        model = load_causal_lm(config.teacher, "teacher", tokenizer, config.train.precision)
    check_vocab_fits(model, tokenizer, "teacher")
    return dse.build_teacher_engine(model, ds)


def _check_head(heads, hidden_BTH, logits_BTW, mask_BT, precision: str, name: str) -> None:
    """The cached run computes logits from the last hidden state with the loaded head: that
    must be what the model's forward does (post-processing such as soft-capping included)."""
    ours = heads.logits(hidden_BTH.to("cpu"))[mask_BT.bool().cpu()].float()
    theirs = logits_BTW.to("cpu")[mask_BT.bool().cpu()].float()
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    if not torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance):
        gap = float((ours - theirs).abs().max())
        raise TeacherCacheError(
            f"teacher '{name}': its logits are not its output head applied to its last hidden "
            f"state (max difference {gap:.3g}); the teacher cache cannot reproduce them"
        )


def build_teacher_cache(config: RunConfig, *, log=print) -> dict[str, Any]:
    """Write (or finish) the cache at ``teacher_cache.path``; its index. ``log``: rank 0's
    progress lines."""
    if config.teacher_cache.path is None:
        raise TeacherCacheError("teacher_cache.path is not set; name the cache directory")
    root = Path(config.teacher_cache.path)
    ctx = dse.init_distributed(config.deepspeed.dist_timeout_s)
    if not ctx.is_main:
        log = _silent
    records = train_records(config)
    layout = run_layout(config, records)
    if (root / INDEX_FILENAME).is_file():
        index = read_index(root)
        check_compatible(index, layout, root)
        log(f"teacher cache {root}: complete ({index['num_views']} views), nothing to do")
        return index
    digest = _fingerprint_digest(layout)
    root.mkdir(parents=True, exist_ok=True)
    for shard in completed_shards(root):
        if shard["fingerprint"] != digest:
            raise TeacherCacheError(
                f"teacher_cache.path '{root}' holds shards of a cache built for another run; "
                "remove them or choose another path"
            )
    for stale in root.glob(f".shard-r{ctx.rank}-*.partial"):
        stale.unlink()  # this rank's write a kill interrupted; its views are recomputed
    done = {key for shard in completed_shards(root) for key in shard["views"]}
    teacher_tokenizer = load_tokenizer(config.teacher, "teacher")
    collator = cache_collator(config, load_tokenizer(config.student, "student"), teacher_tokenizer)
    examples = make_examples(
        records, template=config.data.template, cot_records=config.data.cot_records
    )
    size = config.teacher_cache.batch_size
    batches = [examples[i : i + size] for i in range(0, len(examples), size)]
    expected: set[str] = set()
    pending = []
    for number, chunk in enumerate(batches):
        keys = {key for side in _teacher_sides(collator(chunk)) for _, key, _, _ in _keys(side)}
        expected |= keys
        if number % ctx.world_size == ctx.rank and not keys <= done:
            pending.append(chunk)
    rounds = int(dse.all_reduce_max(torch.tensor(len(pending), device=ctx.device)).item())
    engine = _load_teacher_engine(config, teacher_tokenizer, ctx.world_size)
    heads = load_teacher_heads(
        config.teacher, config.train.precision, need_embed=layout.fingerprint["recomputed_layer_0"]
    )
    writer = ShardWriter(root, ctx.rank, config.teacher_cache.shard_views, digest)
    checked = False
    log(f"teacher cache {root}: {len(expected) - len(done)} of {len(expected)} views to compute")
    for round_ in range(rounds):
        stand_in = round_ >= len(pending)
        batch = collator(pending[round_] if not stand_in else batches[0][:1])
        for side in _teacher_sides(batch) if not stand_in else [batch.teacher]:
            keys = _keys(side)  # on the host: keys hash the token ids' bytes
            side = side.to(ctx.device)
            with torch.no_grad():
                output = engine(
                    input_ids=side.input_ids, attention_mask=side.attention_mask,
                    output_hidden_states=True, use_cache=False,
                )  # fmt: skip
            if stand_in:
                continue
            if not checked:
                _check_head(heads, output.hidden_states[-1], output.logits, side.attention_mask,
                            config.train.precision, config.teacher.name_or_path)  # fmt: skip
                checked = True
            for row, key, start, end in keys:
                if key not in done:
                    states = {layer: output.hidden_states[layer][row, start:end]
                              for layer in layout.layers}  # fmt: skip
                    writer.add(key, start, end, states)
                    done.add(key)
    writer.flush()
    dse.barrier()
    stored = {key for shard in completed_shards(root) for key in shard["views"]}
    if not expected <= stored:
        raise TeacherCacheError(f"teacher cache {root}: {len(expected - stored)} views missing")
    index = read_index(root) if (root / INDEX_FILENAME).is_file() else None
    if ctx.is_main:
        index = write_index(root, layout.fingerprint, list(layout.layers))
    dse.barrier()
    index = index or read_index(root)
    log(
        f"teacher cache {root}: {index['num_views']} views, {index['tokens']} positions, "
        f"{index['bytes'] / 2**20:.1f} MiB ({index['bytes'] / max(index['tokens'], 1):.0f} "
        "bytes per position)"
    )
    return index


def _silent(_: str) -> None:
    pass


def check_run_cache(config: RunConfig) -> CacheLayout:
    """Refuse (one line) a missing, incomplete or mismatched cache for this run."""
    root = Path(config.teacher_cache.path)
    layout = run_layout(config, train_records(config))
    check_compatible(read_index(root), layout, root)
    return layout


class CachedTeacher:
    """What a run reads instead of running the teacher: the cache reader (in the DataLoader
    workers), the loaded output head and input embedding, and which layers come from where."""

    def __init__(self, config: RunConfig) -> None:
        from cot2align_ds.teacher_cache.store import CacheReader

        root = Path(config.teacher_cache.path)
        self.layout = check_run_cache(config)
        teacher_config = model_config(config.teacher, "teacher")
        self.config = teacher_config
        self.hidden_size = int(teacher_config.get_text_config().hidden_size)
        self.recompute_0 = bool(self.layout.fingerprint["recomputed_layer_0"])
        self.embeddings_in_hidden = embeddings_are_hidden_state_0(teacher_config)
        table = config.distill.method == "dskd_cma" and not self.embeddings_in_hidden
        self.heads = load_teacher_heads(
            config.teacher, config.train.precision, need_embed=self.recompute_0 or table
        )
        self.reader = CacheReader(root, self.layout.layers, torch_dtype(config.train.precision))

    def collator(self, collator):
        return CachedCollator(collator, self.reader, self.hidden_size)

    @torch.no_grad()
    def outputs(self, side: TokenSide) -> tuple[torch.Tensor, tuple]:
        """The teacher's (logits, hidden_states) on one side, from its cached hidden states
        (layers the run does not read are None)."""
        hidden: list[torch.Tensor | None] = [None] * self.layout.num_hidden_states
        for layer, states in (side.cached_hidden or {}).items():
            hidden[layer] = states
        if self.recompute_0:
            hidden[0] = self.heads.embed(side.input_ids)
        # The head only where a loss reads teacher logits (its response positions); zeros
        # elsewhere, as every teacher term masks them.
        last = hidden[-1]
        response = side.labels != IGNORE_INDEX
        logits = last.new_zeros(*response.shape, self.heads.head.out_features)
        logits[response] = self.heads.logits(last[response])
        return logits, tuple(hidden)


class CachedCollator:
    """Picklable: the training collator, then each teacher side's cached states attached (in
    the DataLoader workers, so the step never waits on the disk)."""

    def __init__(self, collator, reader, hidden_size: int) -> None:
        self.collator, self.reader, self.hidden_size = collator, reader, hidden_size

    def __call__(self, examples):
        from dataclasses import replace

        batch = self.collator(examples)
        standard = batch.standard
        if standard is not None:
            teacher = self.reader.attach(standard.teacher, self.hidden_size)
            standard = replace(standard, teacher=teacher)
        teacher = self.reader.attach(batch.teacher, self.hidden_size)
        return replace(batch, teacher=teacher, standard=standard)
