"""Vocabulary maps: normalisation of space markers and bytes, exact map, MinED map against a
brute-force reference, edit-distance backends, and the on-disk cache."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cot2align_ds.alignment import vocab_map
from cot2align_ds.alignment.vocab_map import (
    distance_matrix,
    exact_vocab_map,
    is_byte_level,
    levenshtein,
    mined_vocab_map,
    nearest_strings,
    normalize_token,
    normalized_vocab,
    special_ids,
    vocab_pair_key,
)

BACKENDS = ["numpy", "rapidfuzz"]


def _backend(name: str) -> str:
    if name == "rapidfuzz":
        pytest.importorskip("rapidfuzz")
    return name


def _word_level(vocab: dict[str, int], byte_level: bool, **special: str):
    """A fixed-vocabulary fast tokenizer whose decoder marks its space convention."""
    model = Tokenizer(models.WordLevel(vocab, unk_token=special.get("unk_token")))
    if byte_level:
        model.decoder = decoders.ByteLevel()
    else:
        model.pre_tokenizer = pre_tokenizers.Metaspace()
        model.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=model, **special)


def _marker_pair():
    teacher_tokens = ["<|endoftext|>", "Ġhas", "has", "Ċ", "Ã", "Ã©", "ĠĠ", "zzz", "A"]
    teacher = _word_level(
        {token: index for index, token in enumerate(teacher_tokens)},
        byte_level=True,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    # "<0x41>" and "A" both normalise to "A": the smaller id wins
    student_tokens = ["<pad>", "<unk>", "<s>", "</s>", "▁has", "has", "<0x0A>", "<0xC3>", "é"]
    student_tokens += ["▁▁", "<0x41>", "A"]
    student = _word_level(
        {token: index for index, token in enumerate(student_tokens)},
        byte_level=False,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    return teacher, student


@pytest.fixture(scope="module")
def marker_pair():
    return _marker_pair()


def test_byte_level_alphabet_is_the_tokenizers_one():
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    assert set(vocab_map._BYTE_OF_CHAR) == alphabet
    assert sorted(vocab_map._BYTE_OF_CHAR.values()) == list(range(256))


def test_normalize_token_space_markers_and_bytes():
    assert normalize_token("Ġhas", byte_level=True) == " has" == normalize_token("▁has", False)
    assert normalize_token("Ċ", True) == "\n" == normalize_token("<0x0A>", False)
    assert normalize_token("Ã©", True) == "é"
    # a lone UTF-8 lead byte compares equal across both conventions
    assert normalize_token("Ã", True) == normalize_token("<0xC3>", False) == "\udcc3"
    assert normalize_token("<|endoftext|>", True) == "<|endoftext|>"


def test_byte_level_detection(toy_teacher_tokenizer, toy_student_tokenizer, marker_pair):
    assert is_byte_level(toy_teacher_tokenizer) and is_byte_level(marker_pair[0])
    assert not is_byte_level(toy_student_tokenizer) and not is_byte_level(marker_pair[1])


def test_exact_map_on_space_marker_variants(marker_pair):
    teacher, student = marker_pair
    map_W = exact_vocab_map(teacher, student)
    # eos (also pad) -> </s>; Ġhas -> ▁has; has -> has; Ċ -> <0x0A>; stray byte -> <0xC3>;
    # Ã© -> é; two spaces -> ▁▁; zzz has no match; A -> <0x41> (smallest id of "A")
    assert map_W.tolist() == [3, 4, 5, 6, 7, 8, 9, -1, 10]
    assert map_W.dtype == np.int64


def test_special_tokens_are_never_ordinary_targets(toy_teacher_tokenizer, toy_student_tokenizer):
    map_W = mined_vocab_map(toy_teacher_tokenizer, toy_student_tokenizer, num_workers=1)
    student_special = special_ids(toy_student_tokenizer)
    ordinary = [i for i in range(len(map_W)) if i not in special_ids(toy_teacher_tokenizer)]
    assert not set(map_W[ordinary].tolist()) & student_special
    assert map_W[toy_teacher_tokenizer.eos_token_id] == toy_student_tokenizer.eos_token_id


def _brute_force_map(teacher, student) -> list[int]:
    teacher_strings, student_strings = normalized_vocab(teacher), normalized_vocab(student)
    teacher_special, student_special = special_ids(teacher), special_ids(student)
    candidates = [
        (string, index)
        for index, string in enumerate(student_strings)
        if index not in student_special and string
    ]
    expected = []
    for index, string in enumerate(teacher_strings):
        if index in teacher_special:
            expected.append(student.eos_token_id if index == teacher.eos_token_id else -1)
            continue
        expected.append(
            min((levenshtein(string, cand), cand_id) for cand, cand_id in candidates)[1]
        )
    return expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_mined_map_equals_brute_force(toy_teacher_tokenizer, toy_student_tokenizer, backend):
    map_W = mined_vocab_map(
        toy_teacher_tokenizer, toy_student_tokenizer, num_workers=1, backend=_backend(backend)
    )
    assert map_W.tolist() == _brute_force_map(toy_teacher_tokenizer, toy_student_tokenizer)


def test_mined_map_in_worker_processes_equals_in_process(
    toy_teacher_tokenizer, toy_student_tokenizer, monkeypatch
):
    single = mined_vocab_map(toy_teacher_tokenizer, toy_student_tokenizer, num_workers=1)
    calls = []
    original = vocab_map._nearest_parallel
    monkeypatch.setattr(vocab_map, "_nearest_parallel", lambda *a: calls.append(1) or original(*a))
    parallel = mined_vocab_map(toy_teacher_tokenizer, toy_student_tokenizer, num_workers=2)
    assert calls == [1]
    np.testing.assert_array_equal(single, parallel)


def test_daemonic_process_builds_in_process(
    toy_teacher_tokenizer, toy_student_tokenizer, monkeypatch
):
    # a DataLoader worker is daemonic and may not start processes: the build stays in-process
    class Daemon:
        daemon = True

    monkeypatch.setattr(vocab_map.multiprocessing, "current_process", Daemon)
    monkeypatch.setattr(vocab_map, "_nearest_parallel", None)  # calling it would fail
    map_W = mined_vocab_map(toy_teacher_tokenizer, toy_student_tokenizer, num_workers=4)
    assert map_W.shape == (len(toy_teacher_tokenizer),)


def _random_strings(rng: random.Random, count: int, max_len: int) -> list[str]:
    alphabet = "ab c.é\udcc3\n"
    return [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(count)
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_distance_matrix_equals_reference(backend):
    rng = random.Random(0)
    rows, cols = _random_strings(rng, 40, 9), _random_strings(rng, 30, 9)
    rows += ["x" * 120, ""]  # a long string takes the int32 path; the empty string has no DP row
    cols += ["x" * 110 + "y", ""]
    expected = [[levenshtein(a, b) for b in cols] for a in rows]
    assert distance_matrix(rows, cols, _backend(backend)).tolist() == expected
    assert levenshtein("kitten", "sitting") == 3


def test_nearest_strings_ties_go_to_the_smallest_id():
    ids, dists = nearest_strings(["ab"], ["ax", "ab", "ab"], candidate_ids=[9, 5, 2])
    assert ids.tolist() == [2] and dists.tolist() == [0]
    ids, dists = nearest_strings(["abc"], ["abd", "xbc", "ab"], candidate_ids=[7, 3, 8])
    assert ids.tolist() == [3] and dists.tolist() == [1]  # three at distance 1: smallest id
    ids, dists = nearest_strings(["q"], [])
    assert ids.tolist() == [-1] and dists.tolist() == [-1]


def test_cache_hit_does_not_recompute(
    toy_teacher_tokenizer, toy_student_tokenizer, tmp_path, monkeypatch
):
    calls = []
    original = vocab_map._mined_from_strings
    monkeypatch.setattr(
        vocab_map, "_mined_from_strings", lambda *a: calls.append(1) or original(*a)
    )
    first = mined_vocab_map(toy_teacher_tokenizer, toy_student_tokenizer, tmp_path, num_workers=1)
    second = mined_vocab_map(toy_teacher_tokenizer, toy_student_tokenizer, tmp_path, num_workers=1)
    assert len(calls) == 1
    np.testing.assert_array_equal(first, second)
    files = sorted(path.name for path in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["key"] == vocab_pair_key(toy_teacher_tokenizer, toy_student_tokenizer)
    assert meta["teacher_vocab_size"] == len(first)
    # an entry whose metadata names another key is a miss, and gets rewritten
    (tmp_path / files[0]).write_text(json.dumps({**meta, "key": "stale"}))
    mined_vocab_map(toy_teacher_tokenizer, toy_student_tokenizer, tmp_path, num_workers=1)
    assert len(calls) == 2


def test_cache_key_follows_the_vocabularies(
    toy_texts, toy_teacher_tokenizer, toy_student_tokenizer
):
    from cot2align_ds.models.toy_tokenizers import train_byte_bpe

    key = vocab_pair_key(toy_teacher_tokenizer, toy_student_tokenizer)
    assert key == vocab_pair_key(toy_teacher_tokenizer, toy_student_tokenizer)
    assert key != vocab_pair_key(toy_student_tokenizer, toy_teacher_tokenizer)
    other_teacher = train_byte_bpe(toy_texts, vocab_size=300)
    assert key != vocab_pair_key(other_teacher, toy_student_tokenizer)


def test_cache_key_follows_special_tokens():
    teacher, student = _marker_pair()
    key = vocab_pair_key(teacher, student)
    student.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert vocab_pair_key(teacher, student) != key


def test_failed_cache_write_leaves_no_file(
    toy_teacher_tokenizer, toy_student_tokenizer, tmp_path, monkeypatch
):
    def broken_save(handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(vocab_map.np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        mined_vocab_map(toy_teacher_tokenizer, toy_student_tokenizer, tmp_path, num_workers=1)
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown edit-distance backend 'fast'"):
        nearest_strings(["a"], ["b"], backend="fast")
