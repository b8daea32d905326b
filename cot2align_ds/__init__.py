"""cot2align-ds: cross-tokenizer distillation with CoT2Align on DeepSpeed."""

__version__ = "0.1.0"
