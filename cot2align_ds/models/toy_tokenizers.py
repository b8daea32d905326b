"""Small tokenizers trained in-process, for the demo and the tests (nothing from the hub).

The teacher gets a byte-level BPE (GPT-2/Qwen style, "Ġ" space marker) and the student a
Unigram model with a Metaspace pre-tokenizer (SentencePiece/Llama style, "▁" space marker), so
the pair differs the way real teacher/student pairs do: vocabularies, space handling and
special tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def train_byte_bpe(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with a single ``<|endoftext|>`` token used as BOS, EOS and pad."""
    special = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=special, eos_token=special, pad_token=special
    )


# Longest piece the Unigram builder considers, in characters (a "▁" marker counts as one).
_MAX_PIECE_CHARS = 12


def train_unigram(texts: Iterable[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Unigram with Metaspace ("▁") and separate ``<s>``, ``</s>``, ``<pad>``, ``<unk>``.

    The piece inventory comes from one counting pass, not from the ``tokenizers`` Unigram
    trainer: on the tiny, repetitive corpora of the demo and tests that trainer's EM collapses
    to ~200 mostly single-character pieces ("Kim buys" -> ``▁ K i m ▁ b u y s``), which made the
    student read 2-3x longer sequences of letters than the teacher, and it was not
    deterministic across processes. Here every character seen is a piece (full coverage); the
    remaining budget goes first to whole pre-tokenized words (up to 12 characters), then to their
    other substrings, each ranked by ``count * (length - 1)``, the characters it saves. A piece's
    score is its log relative frequency; encoding is the usual Unigram Viterbi over those scores, so frequent
    words become single pieces, as with a SentencePiece model trained on real text.
    """
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    word_counts: Counter[str] = Counter()
    for text in texts:
        word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    piece_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for start in range(len(word)):
            for end in range(start + 1, min(len(word), start + _MAX_PIECE_CHARS) + 1):
                piece_counts[word[start:end]] += count
    characters = sorted(piece for piece in piece_counts if len(piece) == 1)
    budget = max(vocab_size - len(specials) - len(characters), 0)

    def saved(piece: str) -> tuple[int, str]:
        return -piece_counts[piece] * (len(piece) - 1), piece

    # Whole words first (else the substrings of one frequent long word fill the budget), then
    # the other substrings for what is left.
    words = sorted((w for w in word_counts if 1 < len(w) <= _MAX_PIECE_CHARS), key=saved)
    longer = words[:budget]
    chosen = set(longer)
    rest = sorted((p for p in piece_counts if len(p) > 1 and p not in chosen), key=saved)
    longer += rest[: budget - len(longer)]
    total = sum(piece_counts[piece] for piece in [*characters, *longer])
    vocab = [(special, 0.0) for special in specials]
    vocab += [(piece, math.log(piece_counts[piece] / total)) for piece in characters + longer]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>")))
    tokenizer.add_special_tokens(specials)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
