"""The teacher cache: a run reading the teacher's states from ``cot2align cache-teacher``'s
cache trains the same per-step losses as the live teacher, for every method with and without
CoT2Align; a killed build resumes to the same cache; a cache built for other inputs is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from support import subprocess_env, tiny_run_config

from cot2align_ds.config import validate_config
from cot2align_ds.data.records import read_records, write_records
from cot2align_ds.teacher_cache.store import TeacherCacheError, completed_shards

HERE = Path(__file__).resolve().parent
STEPS = 2
# (method, the student's tokenizer): vanilla KD and DSKD need the teacher's vocabulary.
METHODS = {
    "uld": "student_tok",
    "mined": "student_tok",
    "dskd_cma": "student_tok",
    "vanilla_kd": "teacher_tok",
    "dskd": "teacher_tok",
}


def _config(workspace, root: Path, name: str, method="uld", cot2align=True, cache=None, **train):
    config = tiny_run_config(
        workspace,
        root / name,
        distill={"method": method, "kd_rate": 0.5, "temperature": 1.0},
        train={"max_steps": STEPS, "micro_batch_size": 4, "lr": 5e-3, "log_every": 1, **train},
    )
    config["student"]["tokenizer"] = str(workspace[METHODS.get(method, "student_tok")])
    config["data"]["train_file"] = str(root / "train16.jsonl")
    if cot2align:
        config["cot2align"] = {"enabled": True, "num_iters": 20}
        config["data"]["cot_records"] = "all"
    if cache is not None:
        config["teacher_cache"] = {"path": str(cache), "shard_views": 8, "batch_size": 4}
    return config


def _losses(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k.startswith("loss/")} for row in rows]


@pytest.fixture(scope="module")
def caches(workspace, tmp_path_factory):
    """One cache with the Cross-CoT views (CoT2Align runs), one without; each serves every
    method (the teacher's side does not depend on the student's tokenizer)."""
    from cot2align_ds.teacher_cache.build import build_teacher_cache

    root = tmp_path_factory.mktemp("teacher_cache")
    write_records(root / "train16.jsonl", read_records(workspace["train"])[:16])
    built = {}
    for cot2align in (True, False):
        path = root / f"cache_{'cot' if cot2align else 'plain'}"
        # DSKD-CMA reads layer 0 too: for this rotary teacher it is recomputed, not stored.
        config = _config(workspace, root, "build", "dskd_cma", cot2align, cache=path)
        build_teacher_cache(validate_config(config), log=lambda _: None)
        built[cot2align] = path
    return root, built


@pytest.mark.parametrize("cot2align", [True, False], ids=["cot2align", "plain"])
@pytest.mark.parametrize("method", list(METHODS))
def test_a_cached_teacher_trains_the_live_teachers_steps(workspace, caches, method, cot2align):
    from cot2align_ds.train.loop import run_train

    root, built = caches
    tag = f"{method}_{cot2align}"
    live = run_train(validate_config(_config(workspace, root, f"live_{tag}", method, cot2align)))
    cached_config = _config(workspace, root, f"cached_{tag}", method, cot2align, built[cot2align])
    cached = run_train(validate_config(cached_config))
    assert live.model_dir.is_dir() and cached.model_dir.is_dir()
    want, got = _losses(root / f"live_{tag}"), _losses(root / f"cached_{tag}")
    assert len(want) == len(got) == STEPS
    # The cache was computed in other batches than training's (other padded widths), so the
    # teacher's fp32 states agree to float summation order, about 1e-7; after an optimizer step
    # a small term (DSKD's s2t KD, ~0.015) has moved by up to 1.4e-5 of itself.
    for step, (expected, actual) in enumerate(zip(want, got, strict=True), start=1):
        assert set(expected) == set(actual)
        assert actual["loss/total"] == pytest.approx(expected["loss/total"], rel=1e-5), step
        for key, value in expected.items():
            assert actual[key] == pytest.approx(value, rel=5e-5, abs=1e-7), (step, key)


def test_a_cached_run_builds_no_teacher_engine(workspace, caches, tmp_path):
    from cot2align_ds.engine import deepspeed_engines as dse
    from cot2align_ds.train.loop import Trainer

    root, built = caches
    config = validate_config(_config(workspace, root, "engine", "dskd_cma", cache=built[True]))
    (root / "engine").mkdir(exist_ok=True)
    trainer = Trainer(config, root / "engine", dse.init_distributed(60), None)
    assert trainer.teacher_engine is None and trainer.models.teacher_model is None
    heads = trainer.models.teacher_cache.heads
    loaded = sum(p.numel() for p in heads.parameters())
    vocab, hidden = heads.head.weight.shape
    assert loaded == 2 * vocab * hidden  # its output head and input embedding, nothing else
    batch = next(iter(trainer.loader))
    assert set(batch.teacher.cached_hidden) == {2} and batch.standard.teacher.cached_hidden


def test_bf16_cached_run_matches_the_live_one(workspace, tmp_path):
    from cot2align_ds.teacher_cache.build import build_teacher_cache
    from cot2align_ds.train.loop import run_train

    write_records(tmp_path / "train16.jsonl", read_records(workspace["train"])[:16])
    cache = tmp_path / "cache"
    cached = _config(workspace, tmp_path, "cached", "dskd_cma", cache=cache, precision="bf16")
    build_teacher_cache(validate_config(cached), log=lambda _: None)
    run_train(validate_config(_config(workspace, tmp_path, "live", "dskd_cma", precision="bf16")))
    run_train(validate_config(cached))
    for expected, actual in zip(_losses(tmp_path / "live"), _losses(tmp_path / "cached"),
                                strict=True):  # fmt: skip
        for key, value in expected.items():
            assert actual[key] == pytest.approx(value, rel=0.01, abs=1e-3), key


def _tensors(cache: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in completed_shards(cache):
        with safe_open(str(cache / shard["file"]), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                assert name not in out  # every view stored once
                out[name] = handle.get_tensor(name)
    return out


def test_a_killed_build_resumes_to_the_same_cache(workspace, caches, tmp_path):
    root, built = caches
    config = _config(workspace, root, "killed", "dskd_cma", cache=tmp_path / "cache")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    killed = subprocess.run([sys.executable, str(HERE / "cache_killer.py"), str(tmp_path / "run.yaml")],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(completed_shards(tmp_path / "cache")) == 1  # the second shard had no manifest
    assert not (tmp_path / "cache" / "index.json").exists()
    with pytest.raises(TeacherCacheError, match="is incomplete"):
        from cot2align_ds.train.loop import run_train

        run_train(validate_config({**config, "output_dir": str(tmp_path / "early")}))
    resumed = subprocess.run(
        [sys.executable, "-m", "cot2align_ds.cli", "cache-teacher", "-c", str(tmp_path / "run.yaml")],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "views to compute" in resumed.stdout
    got, want = _tensors(tmp_path / "cache"), _tensors(built[True])
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert (
        index["fingerprint"] == json.loads((built[True] / "index.json").read_text())["fingerprint"]
    )
    assert not list((tmp_path / "cache").glob(".*partial"))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("record", "record 'train-3' is new or edited"),
        ("max_total_tokens", "data.max_total_tokens differs"),
        ("teacher", "the teacher's weights differs"),
    ],
)
def test_a_cache_built_for_other_inputs_is_refused(workspace, caches, change, named):
    from cot2align_ds.train.loop import run_train

    root, built = caches
    config = _config(workspace, root, f"refused_{change}", "uld", cache=built[True])
    if change == "record":
        records = read_records(root / "train16.jsonl")
        records[3] = records[3].model_copy(update={"output": records[3].output + "0"})
        write_records(root / "edited.jsonl", records)
        config["data"]["train_file"] = str(root / "edited.jsonl")
    elif change == "max_total_tokens":
        config["data"]["max_total_tokens"] = 150
    else:
        other = root / "other_teacher"
        if not other.exists():
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(workspace["teacher"])
            torch.nn.init.normal_(model.lm_head.weight, std=0.02)
            model.save_pretrained(other)
            for file in Path(workspace["teacher"]).glob("*token*"):
                (other / file.name).write_bytes(file.read_bytes())
        config["teacher"] = {"name_or_path": str(other)}
    with pytest.raises(TeacherCacheError, match=named) as refused:
        run_train(validate_config(config))
    assert "cot2align cache-teacher" in str(refused.value)
    assert not (root / f"refused_{change}").exists()  # refused before anything is written
