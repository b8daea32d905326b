"""mk/paper.mk, checked through `make -n` (dry run): the command sequence of one setting, that
every `train` and `sft-teacher` override validates against the shipped recipe, and that a
rerun only redoes what is missing. Nothing is executed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from cot2align_ds.config import load_config
from cot2align_ds.runs import sft_teacher_config

REPO = Path(__file__).resolve().parents[2]
PAPER_MK = REPO / "mk" / "paper.mk"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _dry_run(tmp_path: Path, target: str, **variables: str) -> list[str]:
    """The commands `make -n TARGET` prints, continuation lines joined, install steps dropped."""
    wrapper = tmp_path / "wrapper.mk"
    # The guard in paper.mk makes this work whether or not the Makefile includes it already.
    wrapper.write_text("include Makefile\ninclude mk/paper.mk\n", encoding="utf-8")
    settings = {"PAPER_ROOT": str(tmp_path / "runs"), "PAPER_DATA": str(tmp_path / "data")}
    settings |= variables
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    command = ["make", "-n", "--no-print-directory", "-C", str(REPO), "-f", str(wrapper), target]
    command += [f"{key}={value}" for key, value in settings.items()]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    joined = done.stdout.replace("\\\n", " ")
    commands = [" ".join(line.split()) for line in joined.splitlines() if line.strip()]
    return [
        c for c in commands if "cot2align_ds" in c or "launchers/" in c or c.startswith("touch")
    ]


def _kind(command: str) -> str:
    kinds = ("data prepare", "sft-teacher", "cache-teacher", " augment ", " eval ")
    for kind in (*kinds, "launchers/local.sh"):
        if kind in command:
            return kind.strip()
    return command.split()[0]


def _sets(command: str) -> list[str]:
    words = shlex.split(command)
    return [words[i + 1] for i, word in enumerate(words) if word == "--set"]


def _option(command: str, name: str) -> str:
    words = shlex.split(command)
    return words[words.index(name) + 1]


def test_setting_a_renders_the_paper_sequence(tmp_path):
    commands = _dry_run(tmp_path, "paper-A", PAPER_DATASETS="dolly")
    kinds = [_kind(c) for c in commands if not c.startswith("touch")]
    train, ev = "launchers/local.sh", "eval"
    assert kinds == [
        "data prepare",
        "sft-teacher",
        ev,  # the fine-tuned teacher's own row
        *(train, ev),  # sft
        *("cache-teacher", train, ev),  # uld: the plain runs' teacher cache, built once
        # uld+cot2align: rationales once, then the CoT2Align runs' cache, before the first
        *("augment", "cache-teacher", train, ev),
        *(train, ev),  # mined
        *(train, ev),  # mined+cot2align
        *(train, ev),  # dskd_cma
        *(train, ev),  # dskd_cma+cot2align
    ]
    runs = tmp_path / "runs" / "A" / "dolly"
    trains = [c for c in commands if "launchers/local.sh" in c]
    methods = [dict(s.split("=", 1) for s in _sets(c)) for c in trains]
    assert [(m["distill.method"], m["cot2align.enabled"]) for m in methods] == [
        ("sft", "false"),
        ("uld", "false"),
        ("uld", "true"),
        ("mined", "false"),
        ("mined", "true"),
        ("dskd_cma", "false"),
        ("dskd_cma", "true"),
    ]
    names = ["sft", "uld", "uld+cot2align", "mined", "mined+cot2align", "dskd_cma"]
    assert [m["output_dir"] for m in methods] == [
        str(runs / n) for n in [*names, "dskd_cma+cot2align"]
    ]
    data = tmp_path / "data" / "dolly"
    assert methods[1]["data.train_file"] == str(data / "train.jsonl")
    assert methods[2]["data.train_file"] == str(runs / "cot" / "train_cot.jsonl")
    assert all(m["teacher.name_or_path"] == str(runs / "teacher_sft/teacher") for m in methods[1:])
    assert all(
        c.split("launchers/local.sh ")[1].startswith("paper_A --resume auto") for c in trains
    )
    # Every run with a teacher reads one of two caches, each built with the views of its runs.
    caches = {m["distill.method"] + m["cot2align.enabled"]: m.get("teacher_cache.path")
              for m in methods}  # fmt: skip
    assert caches["sftfalse"] is None
    assert {caches[k] for k in ("uldfalse", "minedfalse", "dskd_cmafalse")} == {
        str(runs / "teacher_cache_plain")
    }
    assert {caches[k] for k in ("uldtrue", "minedtrue", "dskd_cmatrue")} == {
        str(runs / "teacher_cache_cot")
    }
    builds = [dict(s.split("=", 1) for s in _sets(c)) for c in commands if "cache-teacher" in c]
    assert [
        (b["teacher_cache.path"], b["data.train_file"], b["cot2align.enabled"]) for b in builds
    ] == [
        (str(runs / "teacher_cache_plain"), str(data / "train.jsonl"), "false"),
        (str(runs / "teacher_cache_cot"), str(runs / "cot" / "train_cot.jsonl"), "true"),
    ]
    assert all(b["distill.method"] == "dskd_cma" and "output_dir" not in b for b in builds)


def test_prepare_augment_and_eval_commands(tmp_path):
    commands = _dry_run(
        tmp_path, "paper-A", PAPER_DATASETS="dolly", PAPER_SOURCE_dolly="/x/d.jsonl"
    )
    runs, data = tmp_path / "runs" / "A" / "dolly", tmp_path / "data" / "dolly"
    prepare = next(c for c in commands if "data prepare" in c)
    assert prepare.endswith(f"data prepare dolly --output-dir {data} --source /x/d.jsonl")
    augment = next(c for c in commands if " augment " in c)
    assert _option(augment, "--teacher") == str(runs / "teacher_sft/teacher")
    assert _option(augment, "--data") == str(data / "train.jsonl")
    assert _option(augment, "--output-dir") == str(runs / "cot")
    evals = [c for c in commands if " eval " in c]
    assert len(evals) == 8
    for command in evals:
        assert f"--data {data / 'test.jsonl'}" in command
        assert command.endswith("--template alpaca --seeds 10,20,30,40,50")
        assert "cot2align_ds.experiments.paper_table --best-model" in command
    assert f"--output-dir {runs / 'uld+cot2align' / 'eval'}" in evals[3]


def test_every_override_validates_against_the_recipe(tmp_path):
    commands = _dry_run(tmp_path, "paper-all", PAPER_DATASETS="dolly alpaca")
    trains = [c for c in commands if "launchers/local.sh" in c]
    assert len(trains) == 2 * (3 * 7 + 2 * 5)  # datasets x (cross settings + same settings)
    for command in trains:
        recipe = command.split("launchers/local.sh ")[1].split()[0]
        load_config(recipe, _sets(command))  # raises ConfigError on any bad key or combination
    for command in (c for c in commands if "sft-teacher" in c):
        recipe = _option(command, "--config")
        run = sft_teacher_config(recipe, _sets(command), Path(_option(command, "--output-dir")))
        assert run.distill.method == "sft" and run.data.cot_records == "none"
    caches = [c for c in commands if "cache-teacher" in c]
    assert len(caches) == 2 * 2 * 5  # datasets x (plain, CoT2Align) x settings
    for command in caches:
        run = load_config(_option(command, "--config"), _sets(command))
        assert run.teacher_cache.path is not None and run.distill.method == "dskd_cma"
    assert commands[-1].endswith(f"cot2align_ds.experiments.paper_table {tmp_path / 'runs'}")


def test_same_vocabulary_settings_use_their_methods(tmp_path):
    commands = _dry_run(tmp_path, "paper-B_same", PAPER_DATASETS="sni")
    methods = [
        dict(s.split("=", 1) for s in _sets(c))["output_dir"].rsplit("/", 1)[1]
        for c in commands
        if "launchers/local.sh" in c
    ]
    assert methods == ["sft", "vanilla_kd", "vanilla_kd+cot2align", "dskd", "dskd+cot2align"]


def test_a_rerun_only_redoes_what_is_missing(tmp_path):
    runs, data = tmp_path / "runs" / "A" / "dolly", tmp_path / "data" / "dolly"
    finished = [
        data / "prepare_stats.json",
        runs / "teacher_sft" / ".done",
        runs / "teacher_sft" / "eval" / "eval_results.json",
        runs / "cot" / "train_cot.jsonl",
        runs / "teacher_cache_plain" / "index.json",
        runs / "uld" / ".done",
    ]
    for age, path in enumerate(reversed(finished)):  # each file newer than what it depends on
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    commands = _dry_run(tmp_path, "paper-A", PAPER_DATASETS="dolly")
    kinds = [_kind(c) for c in commands if not c.startswith("touch")]
    assert "data prepare" not in kinds and "sft-teacher" not in kinds and "augment" not in kinds
    assert kinds.count("cache-teacher") == 1  # the CoT2Align runs' cache is still missing
    assert kinds.count("launchers/local.sh") == 6  # every run but uld trains
    assert kinds.count("eval") == 7  # uld is evaluated, the teacher is not again


def test_launchers_can_be_replaced(tmp_path):
    commands = _dry_run(
        tmp_path,
        "paper-A",
        PAPER_DATASETS="dolly",
        PAPER_TRAIN="python -m cot2align_ds.cli train --config",
        PAPER_SFT="python -m cot2align_ds.cli sft-teacher --config",
    )
    assert any(c.startswith("python -m cot2align_ds.cli train --config paper_A") for c in commands)
    assert any(
        c.startswith("python -m cot2align_ds.cli sft-teacher --config paper_A") for c in commands
    )
    assert not any("launchers/local.sh" in c for c in commands)


def test_paper_table_target(tmp_path):
    commands = _dry_run(tmp_path, "paper-table")
    assert commands[-1].endswith(f"-m cot2align_ds.experiments.paper_table {tmp_path / 'runs'}")
    assert "HF_HUB_OFFLINE=1" in commands[-1]


def test_no_hyperparameters_in_the_make_file():
    text = PAPER_MK.read_text(encoding="utf-8")
    overrides = set(re.findall(r"--set ([\w.]+)=", text))
    assert overrides == {
        "output_dir",
        "distill.method",
        "cot2align.enabled",
        "data.train_file",
        "data.dev_file",
        "data.cot_records",
        "teacher.name_or_path",
        "teacher_cache.path",
        "tracking.run_name",
    }
    assert not re.search(r"kd_rate|\blr\b|epochs|temperature|batch", text)
