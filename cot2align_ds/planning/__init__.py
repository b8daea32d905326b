"""Memory planning: model sizes, memory terms and the ``cot2align plan`` command."""
