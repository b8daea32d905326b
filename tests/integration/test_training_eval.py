"""Dev evaluation during training: metrics logged, best-K ZeRO checkpoints, early stopping."""

from __future__ import annotations

import json

from support import tiny_run_config

from cot2align_ds.config import validate_config


def test_dev_eval_keeps_best_checkpoint_and_stops_early(workspace, tmp_path):
    from cot2align_ds.eval.evaluate import load_model_for_eval
    from cot2align_ds.train.loop import run_train

    config = tiny_run_config(
        workspace,
        tmp_path / "run",
        # A learning rate this small leaves the dev score flat, so patience 1 stops at the 2nd
        # evaluation (step 4 of 8) deterministically.
        train={"max_steps": 8, "lr": 1e-9, "min_lr": 1e-10},
    )
    config["data"]["dev_file"] = str(workspace["train"])
    config["eval"] = {
        "every_steps": 2,
        "metric": "rouge_l",
        "keep_best": 1,
        "early_stopping_patience": 1,
        "max_records": 4,
        "max_new_tokens": 4,
        "batch_size": 4,
    }
    result = run_train(validate_config(config))
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [row for row in rows if "eval/rouge_l" in row]
    assert [row["step"] for row in evals] == [2, 4]
    assert max(row["step"] for row in rows) == 4  # stopped early
    kept = [p for p in (tmp_path / "run" / "best_checkpoints").iterdir() if p.is_dir()]
    assert [p.name for p in kept] == ["step-000002"]  # ties keep the earlier checkpoint
    # The kept ZeRO checkpoint and the final HF model both load for evaluation.
    for path in (kept[0], result.model_dir):
        model, _ = load_model_for_eval(path, base_model=None)
        assert model is not None
