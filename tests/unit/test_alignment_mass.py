"""The OT mechanism diagnostic: character-aligned position pairs from two real tokenizations,
and the share of a plan's mass on them against the uniform plan's share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cot2align_ds.data.collator import tokenize_pair
from cot2align_ds.losses.ot.alignment_mass import aligned_mass, char_overlap

ANSWER = "Ivy starts with 2 shells. 2 + 5 = 7. 7 + 8 = 15. The answer is 15."


def test_char_overlap_follows_the_offsets_of_both_tokenizers(
    toy_student_tokenizer, toy_teacher_tokenizer
):
    pairs = [
        tokenize_pair(tok, "Q", ANSWER, max_prompt_tokens=32, max_total_tokens=128, with_offsets=True)
        for tok in (toy_student_tokenizer, toy_teacher_tokenizer)
    ]  # fmt: skip
    s, t = pairs[0].answer_spans, pairs[1].answer_spans
    overlap = char_overlap(s, t)
    assert overlap.shape == (len(s), len(t))
    # Brute force over characters: two tokens overlap when some character is in both.
    for i, (a, b) in enumerate(s):
        for j, (c, d) in enumerate(t):
            shared = bool(set(range(a, b)) & set(range(c, d)))
            end_tokens = a == b == c == d == len(ANSWER)
            assert overlap[i, j] == (shared or end_tokens), (i, j)
    # Every token overlaps something on the other side, and far fewer than all pairs do.
    assert overlap.any(1).all() and overlap.any(0).all()
    assert overlap.mean() < 0.2


def test_aligned_mass_of_the_aligned_plan_is_one_and_of_the_uniform_plan_its_share():
    aligned = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 1]]], dtype=torch.bool)
    mask_s, mask_t = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    on_aligned = aligned.float() / aligned.sum()
    mass, uniform = aligned_mass(on_aligned, aligned, mask_s, mask_t)
    assert mass.item() == pytest.approx(1.0) and uniform.item() == pytest.approx(4 / 9)
    mass, _ = aligned_mass(torch.full((1, 3, 3), 1 / 9), aligned, mask_s, mask_t)
    assert mass.item() == pytest.approx(4 / 9)
    # Padding counts for neither: the last teacher position is masked out.
    mask_t = torch.tensor([[True, True, False]])
    mass, uniform = aligned_mass(torch.full((1, 3, 3), 1 / 9), aligned, mask_s, mask_t)
    assert uniform.item() == pytest.approx(2 / 6) and mass.item() == pytest.approx(2 / 6)
    empty = aligned_mass(torch.zeros(1, 3, 3), aligned, mask_s & False, mask_t)
    assert [v.item() for v in empty] == [0.0, 0.0]


def test_a_cot2align_run_logs_the_aligned_mass_per_layer_pair(workspace, tmp_path):
    import json

    from support import tiny_run_config

    from cot2align_ds.config import validate_config
    from cot2align_ds.train.loop import run_train

    config = tiny_run_config(
        workspace, tmp_path / "run", cot2align={"enabled": True, "num_iters": 20},
        train={"max_steps": 2, "log_every": 1},
    )  # fmt: skip
    config["data"]["cot_records"] = "all"
    run_train(validate_config(config))
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    keys = {"ot/aligned_mass/layers_0_0", "ot/aligned_mass/layers_-1_-1", "ot/aligned_mass_uniform"}
    for row in rows:
        assert keys <= set(row)
        assert all(0.0 <= row[key] <= 1.0 for key in keys)
        assert 0.0 < row["ot/aligned_mass_uniform"] < 1.0
    assert np.isfinite([rows[-1][key] for key in keys]).all()
