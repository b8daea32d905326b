"""Evaluate what training leaves behind: a peft LoRA adapter and a real DeepSpeed ZeRO-3
checkpoint (saved by a tiny engine in process), end to end; dev evaluation on the sharded
engine; and checkpoint directories that are not models."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from support import STUDENT_ARCH, subprocess_env, tiny_run_config
from transformers import AutoConfig, AutoModelForCausalLM

from cot2align_ds.config import EvalConfig, ModelSpec, config_to_dict, validate_config
from cot2align_ds.data.records import write_records
from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.engine.checkpoints import (
    CheckpointError,
    consolidated_state_dict_from_zero_checkpoint,
    is_zero_checkpoint,
)
from cot2align_ds.engine.ds_config import load_ds_config, resolve_student_ds_config
from cot2align_ds.errors import UserError
from cot2align_ds.eval.commands import run_eval
from cot2align_ds.eval.evaluate import evaluate_records
from cot2align_ds.inference.loading import load_model_for_eval
from cot2align_ds.models.loading import load_causal_lm, load_tokenizer
from cot2align_ds.models.student_module import StudentWithProjectors, param_groups
from cot2align_ds.train.dev_eval import DevEvaluator

# Peaked random logits (initializer_range): greedy outputs then differ from prompt to prompt.
NO_DROPOUT = {
    **STUDENT_ARCH,
    **{"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.3},
}
EVAL = {"template": "compact", "max_new_tokens": 6, "max_prompt_tokens": 64}
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["c_attn", "c_fc"]}


def _student_spec(workspace, **extra) -> ModelSpec:
    return ModelSpec(architecture=NO_DROPOUT, tokenizer=str(workspace["student_tok"]), **extra)


def _ds_config() -> dict:
    raw, path = load_ds_config("student_zero3.json")
    return resolve_student_ds_config(
        raw, path, micro_batch_size=2, grad_accum=1, world_size=1, precision="fp32",
        grad_clip=1.0, hidden_size=32,
    )  # fmt: skip


def _peft_config() -> LoraConfig:
    # init_lora_weights=False: B starts non-zero, so a lost adapter would change the outputs.
    return LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
        target_modules=LORA["target_modules"], init_lora_weights=False, task_type="CAUSAL_LM",
    )  # fmt: skip


def _train_engine(student: torch.nn.Module, tokenizer, steps: int = 2):
    """A ZeRO-3 student engine (with a projector, as in distillation) after a few LM steps."""
    torch.manual_seed(1)
    module = StudentWithProjectors(student, torch.nn.ModuleDict({"probe": torch.nn.Linear(32, 48)}))
    groups = param_groups(module, lr=1e-3, projector_lr=1e-3, weight_decay=0.0)
    for group in groups:
        group.pop("name")
    engine = dse.build_student_engine(module, _ds_config(), groups, [lambda _: 1.0] * len(groups))
    texts = [record.output for record in _text_records(2, seed=4)]
    ids = torch.tensor([tokenizer(text)["input_ids"][:12] for text in texts])
    for _ in range(steps):
        logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
    return engine


@pytest.fixture(scope="module")
def zero_run(workspace, tmp_path_factory) -> dict:
    """A run directory (run config + ZeRO-3 checkpoint) and the trained student unsharded."""
    dse.init_distributed(120)
    run_dir = tmp_path_factory.mktemp("run")
    spec = _student_spec(workspace)
    tokenizer = load_tokenizer(spec, "student")
    with dse.zero3_loading(_ds_config()):
        torch.manual_seed(0)
        student = load_causal_lm(spec, "student", tokenizer, "fp32")
    engine = _train_engine(student, tokenizer)
    engine.save_checkpoint(str(run_dir / "checkpoints"))
    config = tiny_run_config(workspace, run_dir, student={"architecture": NO_DROPOUT})
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(validate_config(config))))
    # The reference: the gathered weights in a plain model, saved as a Hugging Face directory.
    reference = load_causal_lm(spec, "student", tokenizer, "fp32")
    reference.load_state_dict(dse.gathered_state_dict(engine, prefix="student."))
    hf_dir = run_dir / "student"
    reference.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return {
        "run": run_dir,
        "checkpoint": run_dir / "checkpoints",
        "reference": reference.eval(),
        "tokenizer": tokenizer,
        "hf_dir": hf_dir,
        "engine": engine,
    }


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> tuple[list, Path]:
    records = make_split(3, ArithmeticTaskSpec(num_steps=2), seed=5, prefix="held")
    path = tmp_path_factory.mktemp("data") / "held.jsonl"
    write_records(path, records)
    return records, path


def _text_records(num_records: int, seed: int) -> list:
    """Free-text answers (as in Dolly), so that even a random model scores some ROUGE-L."""
    problems = make_split(num_records, ArithmeticTaskSpec(num_steps=2), seed=seed, prefix="dev")
    return [p.model_copy(update={"output": f"Step by step: {p.rationale}"}) for p in problems]


def _predictions(directory: Path, step: int) -> list[tuple[str, str]]:
    rows = (directory / "dev_predictions" / f"step_{step}.jsonl").read_text().splitlines()
    return [(row["id"], row["prediction"]) for row in map(json.loads, rows)]


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, msg=name)


def _isolated_copy(checkpoint: Path, tmp_path: Path) -> Path:
    """The checkpoint alone, away from the run config (parents hold no config.json)."""
    target = tmp_path / "a" / "b" / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


# -- ZeRO-3 checkpoints -----------------------------------------------------------------------


def test_consolidated_weights_equal_the_gathered_engine_weights(zero_run):
    assert is_zero_checkpoint(zero_run["checkpoint"])
    state = consolidated_state_dict_from_zero_checkpoint(zero_run["checkpoint"])
    assert any(name.startswith("projectors.") for name in state)
    for name, tensor in zero_run["reference"].state_dict().items():
        torch.testing.assert_close(state[f"student.{name}"], tensor, msg=name)


def test_checkpoint_in_a_run_dir_loads_the_trained_student(zero_run):
    # The architecture and tokenizer come from the run's config.json two levels up.
    tag_dir = next(zero_run["checkpoint"].glob("global_step*"))
    for path in (zero_run["checkpoint"], tag_dir):
        model, tokenizer = load_model_for_eval(path)
        _assert_same_weights(model, zero_run["reference"])
        assert len(tokenizer) == len(zero_run["tokenizer"])
    model, _ = load_model_for_eval(tag_dir, dtype="bfloat16")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def test_checkpoint_with_base_model_or_a_config_next_to_it(zero_run, tmp_path):
    alone = _isolated_copy(zero_run["checkpoint"], tmp_path)
    with pytest.raises(UserError, match="holds no architecture .* pass base_model") as info:
        load_model_for_eval(alone)
    assert "\n" not in str(info.value)
    model, _ = load_model_for_eval(alone, base_model=zero_run["hf_dir"])
    _assert_same_weights(model, zero_run["reference"])
    zero_run["reference"].config.save_pretrained(alone)
    zero_run["tokenizer"].save_pretrained(alone)
    model, _ = load_model_for_eval(alone)
    _assert_same_weights(model, zero_run["reference"])


def test_resumable_layout_without_latest_picks_the_newest_complete_tag(zero_run, tmp_path):
    # train/checkpointing.py: tags step-NNNNNN, no `latest`, a `<tag>.complete` marker when
    # every rank has finished writing.
    root = _isolated_copy(zero_run["checkpoint"], tmp_path)
    (root / "latest").unlink()
    next(root.glob("global_step*")).rename(root / "step-000002")
    (root / "step-000002.complete").write_text("{}")
    partial = root / "step-000009"  # a newer save interrupted before its optimizer shards
    partial.mkdir()
    for shard in (root / "step-000002").glob("*_model_states.pt"):
        shutil.copy(shard, partial / shard.name)
    assert is_zero_checkpoint(root)
    model, _ = load_model_for_eval(root, base_model=zero_run["hf_dir"])
    _assert_same_weights(model, zero_run["reference"])
    with pytest.raises(CheckpointError, match="step-000009: cannot consolidate") as info:
        load_model_for_eval(partial, base_model=zero_run["hf_dir"])
    _one_line(info)


def test_run_eval_on_a_zero_checkpoint_matches_the_unsharded_model(zero_run, records, tmp_path):
    held, path = records
    results = run_eval(
        zero_run["checkpoint"],
        [path],
        output_dir=tmp_path,
        greedy=True,
        show_progress=False,
        **EVAL,
    )
    expected = evaluate_records(
        zero_run["reference"], zero_run["tokenizer"], held, greedy=True, **EVAL
    )
    assert results == {"held": expected.summary()}
    rows = [json.loads(line) for line in (tmp_path / "predictions_held.jsonl").open()]
    assert [row["prediction"] for row in rows] == [p.prediction for p in expected.predictions]


def test_lora_trained_under_zero3_loads_merged(workspace, tmp_path):
    spec = _student_spec(workspace, lora=LORA)
    tokenizer = load_tokenizer(spec, "student")
    with dse.zero3_loading(_ds_config()):
        torch.manual_seed(0)
        student = get_peft_model(load_causal_lm(spec, "student", tokenizer, "fp32"), _peft_config())
    engine = _train_engine(student, tokenizer, steps=1)
    engine.save_checkpoint(str(tmp_path / "checkpoints"))
    gathered = dse.gathered_state_dict(engine, prefix="student.")
    config = tiny_run_config(workspace, tmp_path, student=spec.model_dump(mode="json"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(validate_config(config))))
    reference = get_peft_model(load_causal_lm(spec, "student", tokenizer, "fp32"), _peft_config())
    reference.load_state_dict(gathered)
    model, _ = load_model_for_eval(tmp_path / "checkpoints")
    assert not any("lora" in name for name in model.state_dict())  # merged into plain weights
    ids = torch.tensor([tokenizer("Mia has 3 pens.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


# -- LoRA adapters (peft) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(zero_run, tmp_path_factory) -> dict:
    """A LoRA adapter saved by peft on top of the saved student, and its merged reference."""
    root = tmp_path_factory.mktemp("lora")
    base = AutoModelForCausalLM.from_pretrained(zero_run["hf_dir"])
    torch.manual_seed(2)
    adapted = get_peft_model(base, _peft_config())
    adapted.save_pretrained(root / "adapter")
    return {"dir": root / "adapter", "reference": adapted.eval()}


def test_lora_adapter_is_applied_to_its_base_and_merged(adapter, zero_run):
    config = json.loads((adapter["dir"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(zero_run["hf_dir"])
    model, tokenizer = load_model_for_eval(adapter["dir"])
    assert not any("lora" in name for name in model.state_dict())
    ids = torch.tensor([tokenizer("Tom has 2 cups. How many?")["input_ids"]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, adapter["reference"](input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)
    base_logits = zero_run["reference"](input_ids=ids).logits
    assert not torch.allclose(ours, base_logits, atol=1e-3)  # the adapter changed the model


def test_run_eval_on_a_lora_adapter_with_a_moved_base(adapter, zero_run, records, tmp_path):
    held, path = records
    moved_adapter, moved_base = tmp_path / "adapter", tmp_path / "base"
    shutil.copytree(adapter["dir"], moved_adapter)
    config = json.loads((moved_adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved_adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="base model .*gone' is not a model directory") as info:
        load_model_for_eval(moved_adapter)
    assert "\n" not in str(info.value)
    shutil.copytree(zero_run["hf_dir"], moved_base)
    results = run_eval(
        moved_adapter, [path], output_dir=tmp_path / "out", base_model=moved_base, greedy=True,
        show_progress=False, **EVAL,
    )  # fmt: skip
    expected = evaluate_records(
        adapter["reference"].merge_and_unload(), zero_run["tokenizer"], held, greedy=True, **EVAL
    )
    assert results == {"held": expected.summary()}


# -- checkpoint directories that are not models ----------------------------------------------


class _Tampered:
    """Unpickling this runs code (creates a file): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_tampered_shard_is_refused_without_running_it(zero_run, tmp_path):
    broken = _isolated_copy(zero_run["checkpoint"], tmp_path)
    shard = next(broken.glob("global_step*/*_optim_states.pt"))
    marker = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": _Tampered(marker)}, shard)
    with pytest.raises(CheckpointError, match="not a plain-data DeepSpeed shard") as info:
        load_model_for_eval(broken, base_model=zero_run["hf_dir"])
    assert shard.name in _one_line(info)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["latest_names_missing_tag", "no_optimizer_shards", "garbage"])
def test_broken_checkpoint_is_one_clear_line(zero_run, tmp_path, damage):
    broken = _isolated_copy(zero_run["checkpoint"], tmp_path)
    tag_dir = next(broken.glob("global_step*"))
    expected = {
        "latest_names_missing_tag": "names tag 'global_step9' but",
        "no_optimizer_shards": "cannot consolidate the ZeRO checkpoint",
        "garbage": "not a plain-data DeepSpeed shard",
    }[damage]
    if damage == "latest_names_missing_tag":
        (broken / "latest").write_text("global_step9")
    elif damage == "no_optimizer_shards":
        for shard in tag_dir.glob("*_optim_states.pt"):
            shard.unlink()
    else:
        next(tag_dir.glob("*_model_states.pt")).write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=expected) as info:
        load_model_for_eval(broken, base_model=zero_run["hf_dir"])
    _one_line(info)


def test_checkpoint_of_another_architecture_is_one_clear_line(zero_run, workspace, tmp_path):
    with pytest.raises(
        UserError, match=r"do not match .*\(20 missing, e.g. \['model.embed.*; 28 unexpected"
    ) as info:
        load_model_for_eval(zero_run["checkpoint"], base_model=workspace["teacher"])
    _one_line(info)
    wider = zero_run["reference"].config.to_dict() | {"n_embd": 48}
    AutoConfig.for_model(**wider).save_pretrained(tmp_path)
    zero_run["tokenizer"].save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"another shape, e.g. transformer.wte.weight") as info:
        load_model_for_eval(zero_run["checkpoint"], base_model=tmp_path)
    _one_line(info)


# -- dev evaluation on the ZeRO-3 engine -------------------------------------------------------


def _dev_evaluator(tokenizer, records, output_dir: Path) -> DevEvaluator:
    return DevEvaluator(
        EvalConfig(max_new_tokens=6, batch_size=2, keep_best=1),
        records, tokenizer, template="compact", max_prompt_tokens=64,
        output_dir=output_dir, is_main=True, steps_per_epoch=5,
    )  # fmt: skip


def test_dev_eval_on_the_sharded_engine_then_training_goes_on(zero_run, tmp_path):
    engine, tokenizer = zero_run["engine"], zero_run["tokenizer"]
    held = _text_records(4, seed=8)
    reference = load_causal_lm(_student_spec_of(zero_run), "student", tokenizer, "fp32")
    reference.load_state_dict(dse.gathered_state_dict(engine, prefix="student."))
    reference.eval()
    # Two records answered with the model's own greedy output score 100: metrics that agree
    # below are not a vacuous 0 == 0.
    _dev_evaluator(tokenizer, held, tmp_path / "probe").evaluate(reference, 0)
    own = dict(_predictions(tmp_path / "probe", 0))
    answered = [record.id for record in held if own[record.id].strip()][:2]
    assert answered, "the model answered every probe with nothing"
    held = [r.model_copy(update={"output": own[r.id]}) if r.id in answered else r for r in held]
    ours = _dev_evaluator(tokenizer, held, tmp_path / "a").evaluate(engine.module.student, 7)
    theirs = _dev_evaluator(tokenizer, held, tmp_path / "b").evaluate(reference, 7)
    assert ours == pytest.approx(theirs)
    assert ours["eval/rouge_l"] >= 100.0 * len(answered) / len(held)
    predictions = _predictions(tmp_path / "a", 7)
    assert predictions == _predictions(tmp_path / "b", 7)
    assert len({text for _, text in predictions}) > 1  # not one degenerate output
    # Generation ran under inference mode on gathered ZeRO-3 parameters: training must go on.
    ids = torch.randint(0, len(tokenizer), (2, 12))
    engine.train()
    out = engine(input_ids=ids, attention_mask=torch.ones_like(ids))
    engine.backward(out.logits.logsumexp(-1).mean())
    engine.step()
    assert torch.isfinite(out.logits).all()


def _student_spec_of(zero_run) -> ModelSpec:
    config = json.loads((zero_run["run"] / "config.json").read_text())
    return ModelSpec(**config["student"])


# -- two ranks ---------------------------------------------------------------------------------

WORLD_SIZE_2_SCRIPT = """
import json, sys, torch
from cot2align_ds.config import EvalConfig, ModelSpec
from cot2align_ds.data.records import read_records
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.engine.ds_config import load_ds_config, resolve_student_ds_config
from cot2align_ds.models.loading import load_causal_lm, load_tokenizer
from cot2align_ds.models.student_module import StudentWithProjectors, param_groups
from cot2align_ds.train.dev_eval import DevEvaluator

spec_json, data, out = sys.argv[1:4]
ctx = dse.init_distributed(120)
spec = ModelSpec(**json.loads(spec_json))
tokenizer = load_tokenizer(spec, "student")
raw, path = load_ds_config("student_zero3.json")
ds = resolve_student_ds_config(raw, path, micro_batch_size=2, grad_accum=1,
    world_size=ctx.world_size, precision="fp32", grad_clip=1.0, hidden_size=32)
with dse.zero3_loading(ds):
    torch.manual_seed(0)
    student = load_causal_lm(spec, "student", tokenizer, "fp32")
module = StudentWithProjectors(student)
groups = param_groups(module, lr=1e-3, projector_lr=1e-3, weight_decay=0.0)
for group in groups:
    group.pop("name")
engine = dse.build_student_engine(module, ds, groups, [lambda _: 1.0] * len(groups))
evaluator = DevEvaluator(EvalConfig(max_new_tokens=6, batch_size=2), read_records(data),
    tokenizer, template="compact", max_prompt_tokens=64, output_dir=__import__("pathlib").Path(out),
    is_main=ctx.is_main, steps_per_epoch=1)
metrics = evaluator.evaluate(engine.module.student, step=1)
state = dse.gathered_state_dict(engine, prefix="student.")
if ctx.is_main:
    torch.save(state, out + "/student.pt")
with open(f"{out}/metrics.rank{ctx.rank}.json", "w") as handle:
    json.dump(metrics, handle)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_generate_in_lockstep_and_agree(workspace, tmp_path):
    # Five records over two ranks and batches of two: the ranks get 3 and 2 (+1 padding)
    # prompts and finish generating at different times; both must still return.
    held = _text_records(5, seed=6)
    write_records(tmp_path / "dev.jsonl", held)
    (tmp_path / "check.py").write_text(WORLD_SIZE_2_SCRIPT)
    spec = _student_spec(workspace)
    env = subprocess_env()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={_free_port()}", str(tmp_path / "check.py"),
        spec.model_dump_json(), str(tmp_path / "dev.jsonl"), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout[-1500:], result.stderr[-3000:])
    per_rank = [json.loads((tmp_path / f"metrics.rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1]
    tokenizer = load_tokenizer(spec, "student")
    reference = load_causal_lm(spec, "student", tokenizer, "fp32")
    reference.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
    single = _dev_evaluator(tokenizer, held, tmp_path / "single").evaluate(reference.eval(), 1)
    assert per_rank[0] == pytest.approx(single)
    # Rank 0 gathered both shards, in record order, and they equal the unsharded greedy outputs.
    assert _predictions(tmp_path, 1) == _predictions(tmp_path / "single", 1)
    assert [record_id for record_id, _ in _predictions(tmp_path, 1)] == [r.id for r in held]
    assert len({text for _, text in _predictions(tmp_path, 1)}) > 1  # not one degenerate output
