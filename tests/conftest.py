"""Session fixtures: offline environment, rendezvous for an in-process world of one, and a tiny
workspace (synthetic data, two genuinely different trained tokenizers, a saved tiny teacher)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from support import STUDENT_ARCH, TEACHER_ARCH

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A world of one for in-process DeepSpeed; subprocess tests set their own launcher variables.
for _key, _value in {
    "RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_RANK": "0",
    "LOCAL_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _save_tiny_model(architecture: dict, tokenizer, path: Path, **extra) -> None:
    """A model from ``architecture`` sized for ``tokenizer``, saved with it (safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(architecture)
    config = AutoConfig.for_model(
        arch.pop("model_type"),
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
        **arch,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Data, tokenizers and a saved random teacher, built once per session (about a second)."""
    import torch

    from cot2align_ds.data.records import write_records
    from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
    from cot2align_ds.experiments.pipeline import tokenizer_corpus
    from cot2align_ds.models.toy_tokenizers import train_byte_bpe, train_unigram

    root = tmp_path_factory.mktemp("workspace")
    records = make_split(64, ArithmeticTaskSpec(num_steps=2), seed=0, prefix="train")
    write_records(root / "train.jsonl", records)
    corpus = tokenizer_corpus(records, "compact")
    teacher_tok, student_tok = train_byte_bpe(corpus, 400), train_unigram(corpus, 300)
    teacher_tok.save_pretrained(root / "teacher_tok")
    student_tok.save_pretrained(root / "student_tok")
    torch.manual_seed(0)
    _save_tiny_model(TEACHER_ARCH, teacher_tok, root / "teacher")
    # Saved fp32 students (one per tokenizer): runs in two precisions then start from the same
    # weights, rounded once to bf16. Wide enough weights for peaked logits: at the default 0.02
    # every output is near uniform, and rounding to bf16 could not move a loss in any digit a
    # test reads.
    for name, tokenizer in (("student_student", student_tok), ("student_teacher", teacher_tok)):
        _save_tiny_model(STUDENT_ARCH, tokenizer, root / name, initializer_range=0.3)
    return {
        "root": root,
        "train": root / "train.jsonl",
        "teacher": root / "teacher",
        "teacher_tok": root / "teacher_tok",
        "student_tok": root / "student_tok",
        "student_student": root / "student_student",
        "student_teacher": root / "student_teacher",
    }
