"""Dev evaluation during training: metrics logged, best-K ZeRO checkpoints, early stopping."""

from __future__ import annotations

import json

from support import tiny_run_config

from cot2align_ds.config import validate_config


def _evaluate_every_2_steps(config: dict, workspace, **extra) -> None:
    """Dev evaluation on 4 training records every 2 steps, keeping the best checkpoint."""
    config["data"]["dev_file"] = str(workspace["train"])
    config["eval"] = {
        "every_steps": 2,
        "metric": "rouge_l",
        "keep_best": 1,
        "max_records": 4,
        "max_new_tokens": 4,
        "batch_size": 4,
        **extra,
    }


def test_dev_eval_keeps_best_checkpoint_and_stops_early(workspace, tmp_path):
    from cot2align_ds.inference.loading import load_model_for_eval
    from cot2align_ds.train.loop import run_train

    config = tiny_run_config(
        workspace,
        tmp_path / "run",
        # A learning rate this small leaves the dev score flat, so patience 1 stops at the 2nd
        # evaluation (step 4 of 8) deterministically.
        train={"max_steps": 8, "lr": 1e-9, "min_lr": 1e-10},
    )
    _evaluate_every_2_steps(config, workspace, early_stopping_patience=1)
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


def _teacher_sft_config(workspace, run_dir, with_dev_eval: bool) -> dict:
    """A distillation config whose teacher (the workspace's tiny HF teacher) is fine-tuned."""
    config = tiny_run_config(
        workspace,
        run_dir.parent / "distill",
        teacher={"name_or_path": str(workspace["teacher"])},
        teacher_sft={"train": {"max_steps": 4, "lr": 5e-3}},
    )
    if with_dev_eval:
        _evaluate_every_2_steps(config, workspace)
    return config


def test_sft_teacher_publishes_its_best_checkpoint_as_a_loadable_teacher(workspace, tmp_path):
    import torch

    from cot2align_ds.config import load_config
    from cot2align_ds.inference.loading import load_model_for_eval
    from cot2align_ds.models.loading import load_causal_lm, load_tokenizer
    from cot2align_ds.run_dir import best_model_dir
    from cot2align_ds.runs import run_sft_teacher_command

    config_path = tmp_path / "run.yaml"
    config_path.write_text(json.dumps(_teacher_sft_config(workspace, tmp_path / "x", True)))
    run_dir = tmp_path / "teacher_sft"
    teacher_dir, is_best = run_sft_teacher_command(str(config_path), [], run_dir, overwrite=False)
    assert is_best and teacher_dir == run_dir / "teacher" and not teacher_dir.is_symlink()
    assert list(teacher_dir.glob("*.safetensors")) and not list(teacher_dir.glob("*.bin"))
    best = best_model_dir(run_dir)
    assert best.parent.name == "best_checkpoints"
    # The published teacher is the best checkpoint's weights, and it loads as a teacher.
    expected, _ = load_model_for_eval(best)
    distill = load_config(str(config_path), [f"teacher.name_or_path={teacher_dir}"])
    tokenizer = load_tokenizer(distill.teacher, "teacher")
    teacher = load_causal_lm(distill.teacher, "teacher", tokenizer, "fp32")
    theirs = expected.state_dict()
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(tensor, theirs[name], msg=name)
    # Not the final weights unless the best evaluation was the last one (step 4 of 4).
    final, _ = load_model_for_eval(run_dir / "student")
    differs = any(not torch.equal(t, final.state_dict()[n]) for n, t in theirs.items())
    assert differs == (best.name != "step-000004")


def test_sft_teacher_without_dev_eval_links_the_final_model(workspace, tmp_path):
    from cot2align_ds.runs import run_sft_teacher_command

    config_path = tmp_path / "run.yaml"
    config_path.write_text(json.dumps(_teacher_sft_config(workspace, tmp_path / "x", False)))
    run_dir = tmp_path / "teacher_sft"
    teacher_dir, is_best = run_sft_teacher_command(str(config_path), [], run_dir, overwrite=False)
    assert not is_best and teacher_dir.is_symlink()
    assert teacher_dir.resolve() == (run_dir / "student").resolve()
    assert (teacher_dir / "config.json").is_file()


def test_training_reads_a_hugging_face_dataset_with_its_dev_split(workspace, tmp_path):
    import shutil

    from cot2align_ds.config import validate_config
    from cot2align_ds.train.loop import run_train

    folder = tmp_path / "dataset"
    folder.mkdir()
    shutil.copy(workspace["train"], folder / "train.jsonl")
    lines = workspace["train"].read_text().splitlines(keepends=True)[:4]
    (folder / "validation.jsonl").write_text("".join(lines))
    config = tiny_run_config(workspace, tmp_path / "run", train={"max_steps": 2})
    config["data"].pop("train_file")
    config["data"].update(hub_dataset=str(folder), dev_split="validation", template="compact")
    config["eval"] = {"every_steps": 2, "max_new_tokens": 8, "metric": "exact_match"}
    run_train(validate_config(config))
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in rows if "loss/total" in row] == [1, 2]
    assert any("eval/exact_match" in row for row in rows)  # the dev split was evaluated
