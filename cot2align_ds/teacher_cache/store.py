"""On-disk format of the teacher cache and its reader.

Legend: B rows, L positions of a teacher side, H teacher hidden size, n positions of one view's
cached span.

What is stored. For every teacher view a run feeds the teacher (the main view of each example,
and the standard view of each CoT example for Cross-CoT), the hidden states at the layers the
configured losses read, on the view's span: from its first response position (the first logits
position with a target) to its last real token. Prompt positions before the span are never read
by a loss (every teacher term is masked to response positions; the shifted target embeddings
need one position past the last response one, which is the span's last). Layer 0 is not stored
when the model's ``hidden_states[0]`` is its embedding module's output: it is recomputed from
that module at train time.

Why safetensors shards: memory-mapped, zero-copy reads of exactly the tensors a batch needs, no
pickle, bf16 stored natively (Arrow has no bf16 type), and the format the weights already use.
Each shard (``shard-r<rank>-<n>.safetensors``) holds up to ``shard_views`` views as tensors named
``<key>/<layer>`` of shape (n, H); its manifest (same stem, ``.json``) lists the keys and spans
and is written after the shard, both atomically: a shard without a manifest is an interrupted
write and is ignored. ``index.json`` (the fingerprint and the shard list) is written last, once
every view is stored: a cache without it is incomplete and is never read.

A view's key hashes its teacher token ids and span start, so the cache is addressed by content:
the same view gets the same key in any batch, epoch, rank or run.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.data.batch import IGNORE_INDEX, TokenSide
from cot2align_ds.errors import UserError

INDEX_FILENAME = "index.json"
FORMAT_VERSION = 1
# Fingerprint fields and how a refusal names them.
FIELD_NAMES = {
    "format": "the cache format version",
    "teacher_weights": "the teacher's weights",
    "teacher_tokenizer": "the teacher's tokenizer",
    "data": "data.train_file's content",
    "template": "data.template",
    "max_prompt_tokens": "data.max_prompt_tokens",
    "max_total_tokens": "data.max_total_tokens",
    "prompt_truncation": "data.prompt_truncation",
    "prompt_special_tokens": "data.prompt_special_tokens",
    "cot_records": "data.cot_records",
    "standard_views": "cot2align cross-CoT views",
    "precision": "train.precision (the cached dtype)",
    "recomputed_layer_0": "how hidden_states[0] is obtained",
}


class TeacherCacheError(UserError):
    """A teacher cache that cannot serve this run (missing, incomplete, or built for another)."""


def view_span(side: TokenSide, row: int) -> tuple[int, int] | None:
    """(start, end) of the cached span of one row, end exclusive; None without a response."""
    targets = (side.labels[row] != IGNORE_INDEX).nonzero()
    if targets.numel() == 0:
        return None
    end = int(side.attention_mask[row].sum())  # right padding: real tokens come first
    return int(targets[0]), end


def view_key(side: TokenSide, row: int, start: int) -> str:
    """Content address of one view: its real teacher ids and span start."""
    length = int(side.attention_mask[row].sum())
    ids = side.input_ids[row, :length].to(torch.int64).numpy().tobytes()
    return hashlib.blake2b(ids + start.to_bytes(4, "little"), digest_size=12).hexdigest()


def file_digest(paths: list[Path]) -> str:
    """blake2b over the files' bytes, in the given order (each file read once per process)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        stat = Path(path).stat()
        digest.update(_one_file_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _one_file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    # Keyed by size and modification time too: a file rewritten in place is read again.
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.digest()


@dataclass(frozen=True)
class CacheLayout:
    """What a run needs from a cache: the fingerprint fields, and the layers it reads."""

    fingerprint: dict[str, Any]
    layers: tuple[int, ...]  # absolute hidden-state indices stored (0 only if not recomputed)
    num_hidden_states: int  # len(hidden_states) of the teacher: layers + 1


def check_compatible(index: dict[str, Any], layout: CacheLayout, path: Path) -> None:
    """Refuse (one line, naming the first difference) a cache built for another run."""
    built = index["fingerprint"]
    for field, name in FIELD_NAMES.items():
        if built.get(field) != layout.fingerprint.get(field):
            detail = ""
            if field == "data":
                detail = _changed_records(index, layout)
            raise TeacherCacheError(
                f"teacher_cache.path '{path}': {name} differs from what the cache was built "
                f"with ({_short(built.get(field))} vs this run's "
                f"{_short(layout.fingerprint.get(field))}){detail}; rebuild it with "
                "`cot2align cache-teacher`, or point teacher_cache.path elsewhere"
            )
    missing = sorted(set(layout.layers) - set(index["layers"]))
    if missing:
        raise TeacherCacheError(
            f"teacher_cache.path '{path}': this run reads teacher layers {missing}, the cache "
            f"holds {index['layers']}; rebuild it with `cot2align cache-teacher`"
        )


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:12] + "…"


def _changed_records(index: dict[str, Any], layout: CacheLayout) -> str:
    built = index.get("records", {})
    now = layout.fingerprint.get("_records", {})
    changed = [rid for rid, digest in now.items() if built.get(rid) != digest]
    if changed:
        return f": record '{changed[0]}' is new or edited ({len(changed)} in all)"
    dropped = [rid for rid in built if rid not in now]
    return f": record '{dropped[0]}' was removed ({len(dropped)} in all)" if dropped else ""


def read_index(path: Path) -> dict[str, Any]:
    index_path = Path(path) / INDEX_FILENAME
    if not index_path.is_file():
        partial = any(Path(path).glob("shard-*.json")) if Path(path).is_dir() else False
        state = "is incomplete (a build was interrupted)" if partial else "does not exist"
        raise TeacherCacheError(
            f"teacher_cache.path '{path}' {state}; build it with `cot2align cache-teacher "
            "--config <this run's config>`"
        )
    return json.loads(index_path.read_text(encoding="utf-8"))


def completed_shards(root: Path) -> list[dict[str, Any]]:
    """Manifests of the shards fully written so far (their safetensors file is in place)."""
    shards = []
    for manifest in sorted(root.glob("shard-*.json")):
        entry = json.loads(manifest.read_text(encoding="utf-8"))
        if (root / entry["file"]).is_file():
            shards.append(entry)
    return shards


def write_index(root: Path, fingerprint: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    shards = completed_shards(root)
    views = {key: shard["file"] for shard in shards for key in shard["views"]}
    index = {
        "fingerprint": {k: v for k, v in fingerprint.items() if not k.startswith("_")},
        "records": fingerprint.get("_records", {}),
        "layers": layers,
        "shards": [shard["file"] for shard in shards],
        "num_views": len(views),
        "bytes": sum((root / shard["file"]).stat().st_size for shard in shards),
        "tokens": sum(shard["tokens"] for shard in shards),
    }
    write_text_atomic(root / INDEX_FILENAME, json.dumps(index, indent=1))
    return index


class CacheReader:
    """Picklable: fills a teacher ``TokenSide``'s ``cached_hidden`` from the cache. Each
    DataLoader worker opens the shards it needs lazily (memory-mapped)."""

    def __init__(self, root: Path, layers: tuple[int, ...], dtype: torch.dtype) -> None:
        self.root = Path(root)
        self.layers = layers
        self.dtype = dtype
        self.spans: dict[str, tuple[str, int, int]] = {}
        for shard in completed_shards(self.root):
            for key, (start, end) in shard["views"].items():
                self.spans[key] = (shard["file"], start, end)
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def _tensor(self, file: str, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(self.root / file), framework="pt")
        return self._handles[file].get_tensor(name)

    def attach(self, side: TokenSide, hidden_size: int) -> TokenSide:
        """``side`` with ``cached_hidden``: {layer: (B, L, H)}, the span filled, zeros around."""
        rows, length = side.input_ids.shape
        hidden = {
            layer: torch.zeros(rows, length, hidden_size, dtype=self.dtype) for layer in self.layers
        }
        for row in range(rows):
            span = view_span(side, row)
            if span is None:
                continue
            key = view_key(side, row, span[0])
            if key not in self.spans:
                raise TeacherCacheError(
                    f"teacher_cache.path '{self.root}': no entry for a view of this run (row "
                    f"{row}, {length} teacher tokens); rebuild it with `cot2align cache-teacher`"
                )
            file, start, end = self.spans[key]
            for layer in self.layers:
                hidden[layer][row, start:end] = self._tensor(file, f"{key}/{layer}")
        return side.with_cached_hidden(hidden)
