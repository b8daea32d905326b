"""Model loading options: the attention implementation a config asks for is the one built."""

from __future__ import annotations

import pytest
from support import STUDENT_ARCH
from transformers import AutoTokenizer

from cot2align_ds.config import ModelSpec
from cot2align_ds.errors import UserError
from cot2align_ds.models.loading import load_causal_lm


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_is_the_one_built(workspace, implementation):
    tokenizer = AutoTokenizer.from_pretrained(workspace["student_tok"])
    spec = ModelSpec(
        architecture=STUDENT_ARCH,
        tokenizer=str(workspace["student_tok"]),
        attn_implementation=implementation,
    )
    model = load_causal_lm(spec, "student", tokenizer, "fp32")
    assert model.config._attn_implementation == implementation
    saved = workspace["teacher"]
    spec = ModelSpec(name_or_path=str(saved), attn_implementation=implementation)
    teacher_tokenizer = AutoTokenizer.from_pretrained(workspace["teacher_tok"])
    assert load_causal_lm(
        spec, "teacher", teacher_tokenizer, "fp32"
    ).config._attn_implementation == (implementation)


def test_an_attention_kernel_that_is_not_installed_is_one_line(workspace):
    tokenizer = AutoTokenizer.from_pretrained(workspace["student_tok"])
    spec = ModelSpec(
        architecture=STUDENT_ARCH,
        tokenizer=str(workspace["student_tok"]),
        attn_implementation="flash_attention_2",
    )
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(UserError) as info:
            load_causal_lm(spec, "student", tokenizer, "fp32")
        assert "student.architecture" in str(info.value) and "\n" not in str(info.value)
    else:
        pytest.skip("flash-attn is installed here")
