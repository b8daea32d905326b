"""Teacher-to-student vocabulary maps: exact string match and minimum edit distance (MinED).

Token strings are first put into one common form, so that the two vocabularies compare as text:
- byte-level vocabularies (GPT-2, Qwen, Llama-3: "Ġ" is a space, "Ċ" a newline) are decoded to
  their bytes and then to text; a token holding part of a UTF-8 character decodes its stray bytes
  to lone surrogates (``surrogateescape``), so it still compares equal to the same partial
  character of the other vocabulary;
- SentencePiece vocabularies: "▁" becomes a space, byte-fallback tokens "<0xAB>" become their
  byte (decoded the same way).
The space is kept (" has" differs from "has"): a word-initial piece maps to a word-initial piece.

Special tokens map by role (teacher EOS -> student EOS, then BOS, pad, unk); other teacher special
tokens map to -1 (no student id), and student special tokens are never a target of an ordinary
token. Maps are int64 numpy arrays of length W (``torch.from_numpy`` makes a tensor without a
copy), -1 where there is no student id.

MinED: for every teacher token the student token of minimum Levenshtein distance between the
normalised strings; ties go to the smallest student id. Built once per tokenizer pair: exact
matches by hash, the rest by scanning student tokens in order of length difference (a length
difference bounds the distance from below, so the scan stops early), in parallel worker processes,
and cached on disk keyed by a hash of both vocabularies.

Shape legend: W teacher vocab, V student vocab, Q query (teacher) tokens, N candidate (student)
tokens, L candidate length.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cot2align_ds.atomic import atomic_write

MINED_MAP_VERSION = 1  # bump when the algorithm or normalisation changes (invalidates caches)
_ROLES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """Character of the byte-level alphabet -> byte (the GPT-2 convention: printable bytes stand
    for themselves, the other 68 are shifted to code points 256 and up, in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {byte: chr(byte) for byte in printable}
    shifted = [byte for byte in range(256) if byte not in chars]
    chars.update({byte: chr(256 + index) for index, byte in enumerate(shifted)})
    return {char: byte for byte, char in chars.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()


def normalize_token(token: str, byte_level: bool) -> str:
    """One token string of either kind of vocabulary -> the common text form (module docstring)."""
    if byte_level:
        # characters outside the alphabet (added tokens) stand for their own UTF-8 bytes
        raw = b"".join(
            bytes([_BYTE_OF_CHAR[char]]) if char in _BYTE_OF_CHAR else char.encode()
            for char in token
        )
        return raw.decode("utf-8", errors="surrogateescape")
    fallback = _BYTE_FALLBACK.fullmatch(token)
    if fallback:
        return bytes([int(fallback.group(1), 16)]).decode("utf-8", errors="surrogateescape")
    return token.replace("▁", " ")


def is_byte_level(tokenizer: Any) -> bool:
    """Does ``tokenizer`` use a byte-level vocabulary? From its decoder when it has a Rust
    backend, else from its vocabulary holding the whole byte-level alphabet."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return "ByteLevel" in repr(backend.decoder) or "ByteLevel" in repr(backend.pre_tokenizer)
    vocab = tokenizer.get_vocab()
    return sum(char in vocab for char in _BYTE_OF_CHAR) >= 250


def vocab_strings(tokenizer: Any) -> list[str]:
    """Raw token string of every id 0..len(tokenizer)-1 ("" for ids the vocabulary skips)."""
    vocab = tokenizer.get_vocab()
    strings = [""] * max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    for token, token_id in vocab.items():
        strings[token_id] = token
    return strings


def normalized_vocab(tokenizer: Any, byte_level: bool | None = None) -> list[str]:
    """Normalised string of every id (index = id); ``byte_level`` None = detect."""
    byte_level = is_byte_level(tokenizer) if byte_level is None else byte_level
    return [normalize_token(token, byte_level) for token in vocab_strings(tokenizer)]


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of all special tokens (including added tokens flagged special)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def _role_map(teacher_tokenizer: Any, student_tokenizer: Any) -> dict[int, int]:
    """Teacher special id -> student special id by role (EOS first: GPT-2 uses one token for all)."""
    mapping: dict[int, int] = {}
    for role in _ROLES:
        teacher_id = getattr(teacher_tokenizer, role, None)
        student_id = getattr(student_tokenizer, role, None)
        if teacher_id is not None and student_id is not None:
            mapping.setdefault(int(teacher_id), int(student_id))
    return mapping


def _first_id_of_string(strings: Sequence[str], excluded: set[int]) -> dict[str, int]:
    """Normalised string -> smallest id holding it (empty strings and excluded ids skipped)."""
    first: dict[str, int] = {}
    for token_id, string in enumerate(strings):
        if string and token_id not in excluded:
            first.setdefault(string, token_id)
    return first


def _exact_from_strings(
    teacher_strings: Sequence[str],
    student_strings: Sequence[str],
    teacher_special: set[int],
    student_special: set[int],
    role_map: dict[int, int],
) -> np.ndarray:
    student_of = _first_id_of_string(student_strings, student_special)
    map_W = np.full(len(teacher_strings), -1, dtype=np.int64)
    for teacher_id, string in enumerate(teacher_strings):
        if teacher_id in teacher_special:
            map_W[teacher_id] = role_map.get(teacher_id, -1)
        else:
            map_W[teacher_id] = student_of.get(string, -1)
    return map_W


def exact_vocab_map(teacher_tokenizer: Any, student_tokenizer: Any) -> np.ndarray:
    """map_W: student id whose normalised string equals the teacher token's, else -1."""
    return _exact_from_strings(
        normalized_vocab(teacher_tokenizer),
        normalized_vocab(student_tokenizer),
        special_ids(teacher_tokenizer),
        special_ids(student_tokenizer),
        _role_map(teacher_tokenizer, student_tokenizer),
    )


# ---------------------------------------------------------------- edit distance


def levenshtein(a: str, b: str) -> int:
    """Plain Levenshtein distance (unit costs); the reference the fast paths are tested against."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def _codes(strings: Sequence[str], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> code points int32 (N, max length) padded with ``pad``, and lengths (N,)."""
    lengths_N = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    width = int(lengths_N.max(initial=0))
    codes_NL = np.full((len(strings), width), pad, dtype=np.int32)
    flat = "".join(strings).encode("utf-32-le", errors="surrogatepass")
    mask_NL = np.arange(width) < lengths_N[:, None]
    codes_NL[mask_NL] = np.frombuffer(flat, dtype=np.uint32).astype(np.int32)
    return codes_NL, lengths_N


def distance_codes(
    row_RM: np.ndarray, row_len_R: np.ndarray, col_CL: np.ndarray, col_len_C: np.ndarray
) -> np.ndarray:
    """Levenshtein distances (R, C) int64 between padded code rows (pads of the two sides must
    differ: rows padded with -1, columns with -2). Cell (i, j) of the DP depends only on the
    prefixes, so each pair is read at (its row length, its column length).

    The DP runs over row characters, vectorised over (column position, row, column string). It
    keeps E[j] = D[j] - j: the insertion chain D[j] <= D[j-1] + 1 becomes a running minimum and
    the update is min(E[j] + 1, E[j-1] - match, E'[j-1]).
    """
    width_m, width_l = row_RM.shape[1], col_CL.shape[1]
    # E stays within [-L, M]: int8 while both are short (4x less memory traffic than int32)
    dtype = np.int8 if max(width_m, width_l) < 100 else np.int32
    prev = np.zeros((width_l + 1, row_RM.shape[0], col_CL.shape[0]), dtype=dtype)  # D[j] = j
    out_RC = np.empty((row_RM.shape[0], col_CL.shape[0]), dtype=np.int64)
    out_RC[row_len_R == 0] = col_len_C
    col_LC = col_CL.T[:, None, :]
    for i in range(1, width_m + 1):
        match = row_RM[None, :, i - 1, None] == col_LC
        cur = np.empty_like(prev)
        cur[0] = i
        np.minimum(prev[1:] + 1, prev[:-1] - match, out=cur[1:])
        for j in range(1, width_l + 1):  # faster than minimum.accumulate(axis=0) in place
            np.minimum(cur[j], cur[j - 1], out=cur[j])
        prev = cur
        done = np.flatnonzero(row_len_R == i)
        if done.size:
            at_end = np.take_along_axis(prev[:, done, :], col_len_C[None, None, :], axis=0)[0]
            out_RC[done] = at_end + col_len_C
    return out_RC


def distance_matrix(
    row_strings: Sequence[str], col_strings: Sequence[str], backend: str = "auto"
) -> np.ndarray:
    """Levenshtein distances (R, C) int64 between two lists of strings."""
    if resolve_backend(backend) == "rapidfuzz":
        return _distance_matrix_rapidfuzz(list(row_strings), list(col_strings)).astype(np.int64)
    return distance_codes(*_codes(row_strings, -1), *_codes(col_strings, -2))


def _distance_matrix_rapidfuzz(queries: list[str], candidates: list[str]) -> np.ndarray:
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    return cdist(queries, candidates, scorer=Levenshtein.distance, dtype=np.int32, workers=1)


def resolve_backend(backend: str) -> str:
    """ "auto" -> "rapidfuzz" when that optional package is installed, else "numpy"."""
    if backend not in ("auto", "numpy", "rapidfuzz"):
        raise ValueError(f"unknown edit-distance backend {backend!r}; use auto, numpy or rapidfuzz")
    if backend != "auto":
        return backend
    try:
        import rapidfuzz  # noqa: F401
    except ImportError:
        return "numpy"
    return "rapidfuzz"


# ---------------------------------------------------------------- nearest-string search


class _Buckets:
    """Candidate (student) strings grouped by length, each bucket sorted by id."""

    def __init__(self, strings: Sequence[str], ids: Sequence[int]) -> None:
        by_length: dict[int, list[tuple[int, str]]] = {}
        for token_id, string in zip(ids, strings, strict=True):
            by_length.setdefault(len(string), []).append((token_id, string))
        self.ids: dict[int, np.ndarray] = {}
        self.strings: dict[int, list[str]] = {}
        self.codes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for length, pairs in by_length.items():
            pairs.sort()
            self.ids[length] = np.array([token_id for token_id, _ in pairs], dtype=np.int64)
            self.strings[length] = [string for _, string in pairs]
            self.codes[length] = _codes(self.strings[length], -2)
        self.max_length = max(by_length, default=0)


_WORKER_BUCKETS: _Buckets | None = None  # set once per worker process by _init_worker


def _init_worker(strings: list[str], ids: list[int]) -> None:
    global _WORKER_BUCKETS
    _WORKER_BUCKETS = _Buckets(strings, ids)


def _bucket_distances(
    queries: list[str], length: int, buckets: _Buckets, backend: str
) -> np.ndarray:
    """Distances (Q, N) of equal-length queries to bucket ``length``, in memory-bounded chunks."""
    num_candidates = max(len(buckets.strings[length]), 1)
    if backend == "rapidfuzz":
        rows = max(1, (4 << 20) // num_candidates)  # a (rows, N) int32 block of ~16 MB
        candidates = buckets.strings[length]
        parts = [
            _distance_matrix_rapidfuzz(queries[start : start + rows], candidates)
            for start in range(0, len(queries), rows)
        ]
        return np.concatenate(parts, axis=0)
    query_QM, query_len_Q = _codes(queries, -1)
    rows = max(1, (16 << 20) // ((length + 1) * num_candidates))  # DP row (L+1, Q, N) ~16 MB
    parts = [
        distance_codes(
            query_QM[start : start + rows],
            query_len_Q[start : start + rows],
            *buckets.codes[length],
        )
        for start in range(0, len(queries), rows)
    ]
    return np.concatenate(parts, axis=0)


def _nearest_same_length(
    queries: list[str], buckets: _Buckets, backend: str
) -> tuple[np.ndarray, np.ndarray]:
    """(student id, distance) of the nearest candidate for queries that share one length m.

    Scans candidate lengths m, m+-1, m+-2, ...: a length difference d bounds the distance by d,
    so a query is done once its best distance is below the next d (ties need d == best too).
    """
    length_m = len(queries[0])
    best_d = np.full(len(queries), np.iinfo(np.int64).max, dtype=np.int64)
    best_id = np.full(len(queries), -1, dtype=np.int64)
    for delta in range(max(length_m, buckets.max_length) + 1):
        active = np.flatnonzero(best_d >= delta)
        if active.size == 0:
            break
        for length in sorted({length_m - delta, length_m + delta}):
            if length not in buckets.ids:
                continue
            dist_QN = _bucket_distances([queries[q] for q in active], length, buckets, backend)
            column = dist_QN.argmin(axis=1)  # first minimum = smallest id in this bucket
            dist = dist_QN[np.arange(active.size), column].astype(np.int64)
            cand = buckets.ids[length][column]
            better = (dist < best_d[active]) | ((dist == best_d[active]) & (cand < best_id[active]))
            best_d[active[better]], best_id[active[better]] = dist[better], cand[better]
    return best_id, best_d


def _nearest_chunk(
    queries: list[str], backend: str, buckets: _Buckets | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest candidate for each query of a chunk (any lengths): ids and distances (Q,)."""
    buckets = buckets if buckets is not None else _WORKER_BUCKETS
    assert buckets is not None, "worker not initialised"
    best_id = np.full(len(queries), -1, dtype=np.int64)
    best_d = np.full(len(queries), -1, dtype=np.int64)
    by_length: dict[int, list[int]] = {}
    for index, query in enumerate(queries):
        by_length.setdefault(len(query), []).append(index)
    for indices in by_length.values():
        ids, dists = _nearest_same_length([queries[i] for i in indices], buckets, backend)
        best_id[indices], best_d[indices] = ids, dists
    return best_id, best_d


def nearest_strings(
    queries: Sequence[str],
    candidates: Sequence[str],
    candidate_ids: Sequence[int] | None = None,
    num_workers: int | None = 1,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """For each query string, the id of the candidate of minimum Levenshtein distance (ties: the
    smallest id) and that distance; (-1, -1) when there is no candidate.

    ``candidate_ids`` default to positions; ``num_workers`` None = all cores, 1 = in-process.
    """
    backend = resolve_backend(backend)
    ids = list(range(len(candidates))) if candidate_ids is None else list(candidate_ids)
    queries = list(queries)
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    if not queries or not candidates:
        empty = np.full(len(queries), -1, dtype=np.int64)
        return empty, empty.copy()
    # a daemonic process (a DataLoader worker) cannot start worker processes of its own
    if num_workers <= 1 or len(queries) < 64 or multiprocessing.current_process().daemon:
        return _nearest_chunk(queries, backend, _Buckets(candidates, ids))
    return _nearest_parallel(queries, list(candidates), ids, num_workers, backend)


def _nearest_parallel(
    queries: list[str], candidates: list[str], ids: list[int], num_workers: int, backend: str
) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved chunks (each spans all query lengths, so the work is balanced) in worker
    processes. Forked where the platform can (as torch's DataLoader does; the workers run only
    numpy code): a spawned worker re-imports the caller's main module, seconds of overhead."""
    num_chunks = min(len(queries), num_workers)
    chunks = [queries[index::num_chunks] for index in range(num_chunks)]
    best_id = np.empty(len(queries), dtype=np.int64)
    best_d = np.empty(len(queries), dtype=np.int64)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=num_workers,
        mp_context=multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ),
        initializer=_init_worker,
        initargs=(candidates, ids),
    ) as pool:
        results = pool.map(_nearest_chunk, chunks, [backend] * num_chunks)
        for index, (chunk_id, chunk_d) in enumerate(results):
            best_id[index::num_chunks], best_d[index::num_chunks] = chunk_id, chunk_d
    return best_id, best_d


# ---------------------------------------------------------------- MinED map + cache


def _mined_from_strings(
    teacher_strings: Sequence[str],
    student_strings: Sequence[str],
    teacher_special: set[int],
    student_special: set[int],
    role_map: dict[int, int],
    num_workers: int | None,
    backend: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(map_W, distance_W): exact matches first, nearest strings for the rest."""
    map_W = _exact_from_strings(
        teacher_strings, student_strings, teacher_special, student_special, role_map
    )
    dist_W = np.where(map_W >= 0, 0, -1).astype(np.int64)
    todo = [
        teacher_id
        for teacher_id, string in enumerate(teacher_strings)
        if map_W[teacher_id] < 0 and string and teacher_id not in teacher_special
    ]
    # duplicates of one student string can never win a tie against its smallest id
    first = _first_id_of_string(student_strings, student_special)
    ids, dists = nearest_strings(
        [teacher_strings[i] for i in todo], list(first), list(first.values()), num_workers, backend
    )
    map_W[todo], dist_W[todo] = ids, dists
    return map_W, dist_W


def vocab_pair_key(teacher_tokenizer: Any, student_tokenizer: Any) -> str:
    """sha256 of both vocabularies, their special tokens and the map version."""
    payload = {"version": MINED_MAP_VERSION}
    for side, tokenizer in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
        payload[side] = {
            "vocab": vocab_strings(tokenizer),
            "special": sorted(special_ids(tokenizer)),
            "roles": [getattr(tokenizer, role, None) for role in _ROLES],
            "byte_level": is_byte_level(tokenizer),
        }
    blob = json.dumps(payload, ensure_ascii=True, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    stem = f"mined_map_{key[:24]}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def _load_cached(cache_dir: Path, key: str, size: int) -> np.ndarray | None:
    """The cached map, or None when absent, for another key, or unreadable."""
    array_path, meta_path = _cache_paths(cache_dir, key)
    try:
        meta = json.loads(meta_path.read_text())
        map_W = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or map_W.shape != (size,) or map_W.dtype != np.int64:
        return None
    return map_W


def _save_cached(cache_dir: Path, key: str, map_W: np.ndarray, meta: dict[str, Any]) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    array_path, meta_path = _cache_paths(cache_dir, key)
    atomic_write(array_path, lambda handle: np.save(handle, map_W, allow_pickle=False), binary=True)
    # the metadata goes last: its presence with the right key marks a complete entry
    text = json.dumps({"key": key, **meta}, indent=2, sort_keys=True)
    atomic_write(meta_path, lambda handle: handle.write(text))


def mined_vocab_map(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    cache_dir: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """map_W (int64): for every teacher id the nearest student id by edit distance (module
    docstring); cached in ``cache_dir`` (``.npy`` + metadata ``.json``) when given. Ranks that
    build the same entry at once race harmlessly: each write is atomic and the maps are equal.

    ``num_workers`` None = all cores; ``backend`` "auto" | "numpy" | "rapidfuzz".
    """
    key = vocab_pair_key(teacher_tokenizer, student_tokenizer)
    cache_path = None if cache_dir is None else Path(cache_dir)
    if cache_path is not None:
        cached = _load_cached(cache_path, key, len(vocab_strings(teacher_tokenizer)))
        if cached is not None:
            return cached
    started = time.perf_counter()
    map_W, dist_W = _mined_from_strings(
        normalized_vocab(teacher_tokenizer),
        normalized_vocab(student_tokenizer),
        special_ids(teacher_tokenizer),
        special_ids(student_tokenizer),
        _role_map(teacher_tokenizer, student_tokenizer),
        num_workers,
        backend,
    )
    if cache_path is not None:
        meta = _map_metadata(teacher_tokenizer, student_tokenizer, dist_W, started)
        _save_cached(cache_path, key, map_W, meta)
    return map_W


def _map_metadata(
    teacher_tokenizer: Any, student_tokenizer: Any, dist_W: np.ndarray, started: float
) -> dict[str, Any]:
    """What the cache entry says about itself: the pair, sizes, and how close the matches are."""
    mapped = dist_W[dist_W >= 0]
    return {
        "version": MINED_MAP_VERSION,
        "teacher": str(getattr(teacher_tokenizer, "name_or_path", "")),
        "student": str(getattr(student_tokenizer, "name_or_path", "")),
        "teacher_vocab_size": int(dist_W.shape[0]),
        "student_vocab_size": len(student_tokenizer),
        "num_unmapped": int((dist_W < 0).sum()),
        "distance_histogram": {str(d): int(c) for d, c in enumerate(np.bincount(mapped)) if c},
        "build_seconds": round(time.perf_counter() - started, 3),
    }


__all__ = [
    "MINED_MAP_VERSION",
    "distance_codes",
    "distance_matrix",
    "exact_vocab_map",
    "is_byte_level",
    "levenshtein",
    "mined_vocab_map",
    "nearest_strings",
    "normalize_token",
    "normalized_vocab",
    "special_ids",
    "vocab_pair_key",
    "vocab_strings",
]
