"""The in-process toy tokenizers: the Unigram builder is deterministic and keeps words whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import record_texts

from cot2align_ds.models.toy_tokenizers import train_unigram

_VOCAB_IN_A_CHILD = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from conftest import record_texts
from cot2align_ds.models.toy_tokenizers import train_unigram
vocab = train_unigram(record_texts(100, seed=3), vocab_size=300).backend_tokenizer.to_str()
print(hashlib.sha256(vocab.encode()).hexdigest())
"""


def test_unigram_is_identical_across_processes_and_hash_seeds():
    tests_dir = str(Path(__file__).parent)
    digests = set()
    for hash_seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", _VOCAB_IN_A_CHILD, tests_dir],
            env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
        digests.add(done.stdout.strip().splitlines()[-1])
    assert len(digests) == 1


def test_unigram_keeps_frequent_words_whole_and_respects_the_budget():
    texts = record_texts(200, seed=0)
    tokenizer = train_unigram(texts, vocab_size=300)
    assert len(tokenizer) == 300
    tokens = tokenizer.tokenize("Mia has 3 apples.")
    assert tokens[:3] == ["▁Mia", "▁has", "▁3"]
    # a character never seen is <unk>; the text still round-trips around it
    ids = tokenizer("über Mia", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id in ids
    assert tokenizer.decode(tokenizer("Mia has 3 apples.")["input_ids"]) == "Mia has 3 apples."
    # specials are single tokens and never split
    assert tokenizer("</s>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]


def test_unigram_with_a_tiny_budget_still_covers_every_character():
    texts = record_texts(50, seed=1)
    tokenizer = train_unigram(texts, vocab_size=10)  # below the alphabet: characters only
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == texts[0]
