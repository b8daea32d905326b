"""CoT augmentation: rationale cut and contradiction filter (hand strings), the merged output on
the tiny random teacher, and resume after a real SIGKILL compared with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cot2align_ds.data.augment import (
    OUTPUT_FILENAME,
    STATS_FILENAME,
    AugmentError,
    assigned_shards,
    contradicts,
    cut_rationale,
    derive_seed,
    merge_records,
    run_augment,
    shard_path,
    shard_plan,
)
from cot2align_ds.data.examples import make_examples
from cot2align_ds.data.records import Record, RecordError, read_records, write_records
from cot2align_ds.data.templates import COT_ANSWER_JOINER
from cot2align_ds.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small limits keep generation short: the compact CoT prompt is cut to 64 tokens, so every
# rationale gets at most 16 new tokens.
LIMITS = {"template": "compact", "max_prompt_tokens": 64, "max_total_tokens": 80}

# ---------------------------------------------------------------------------------------------
# Pure functions on hand-made strings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "rationale"),
    [
        ("3 + 4 = 7.\nTherefore, the answer is: 7", "3 + 4 = 7."),
        ("  7 - 2 = 5. ", "7 - 2 = 5."),
        ("Therefore, the answer is: 7", ""),
        ("x = 1.\nTHEREFORE THE ANSWER IS 9\nTherefore, the answer is: 3", "x = 1."),
        ("a. therefore, the  answer is: 5. More text.", "a."),
        # Without "therefore" the phrase may be part of the reasoning: kept.
        ("I think the answer is 5 apples.", "I think the answer is 5 apples."),
    ],
)
def test_cut_rationale_stops_before_the_teachers_own_answer(generation, rationale):
    assert cut_rationale(generation) == rationale


@pytest.mark.parametrize(
    ("generation", "gold", "expected"),
    [
        ("3 + 4 = 7. Therefore, the answer is: 8", "7", True),
        ("3 + 4 = 7. Therefore, the answer is: 7.", "7", False),
        ("3 + 4 = 7.", "8", True),  # no answer cue: the last number is the teacher's answer
        ("Therefore, the answer is: $1,234.", "1234", False),
        ("Therefore, the answer is: 3.50", "3.5", False),
        # The first stated answer counts, not a number written after it.
        ("Therefore, the answer is: 5\nthen 9 more", "9", True),
        ("Therefore, the answer is: 6. Therefore, the answer is: 7", "7", True),
        ("Therefore, the answer is: 5", "five", False),  # gold is not a number
        ("It depends on the weather.", "7", False),  # the teacher gave no number
    ],
)
def test_contradicts_only_when_both_answers_are_different_numbers(generation, gold, expected):
    assert contradicts(generation, gold) is expected


def _record(id_: str, output: str = "7", input_: str = "ctx", rationale: str | None = None):
    return Record(id=id_, instruction="q", input=input_, output=output, rationale=rationale)


def test_merge_keeps_every_record_in_order_and_applies_the_filter():
    records = [
        _record("a", rationale="gold steps"),
        _record("b"),
        _record("c", input_="", rationale="gold steps"),  # not selected
        _record("d"),
    ]
    generations = {
        "a": "3 + 4 = 7.\nTherefore, the answer is: 7",
        "b": "3 + 4 = 8. Therefore, the answer is: 8",
        "d": "Therefore, the answer is: 7",
    }
    merged, counts = merge_records(records, generations, filter_contradicting=True)
    assert [r.id for r in merged] == ["a", "b", "c", "d"]
    assert [r.rationale for r in merged] == ["3 + 4 = 7.", None, None, None]
    assert counts == {"kept": 1, "filtered": 1, "empty": 1}
    merged, counts = merge_records(records, generations, filter_contradicting=False)
    assert merged[1].rationale == "3 + 4 = 8."
    assert counts == {"kept": 2, "filtered": 0, "empty": 1}


def test_shard_plan_rank_split_and_seeds():
    records = [_record(str(i)) for i in range(10)]
    plan = shard_plan(records, 4)
    assert [[r.id for r in shard] for shard in plan] == [
        ["0", "1", "2", "3"],
        ["4", "5", "6", "7"],
        ["8", "9"],
    ]
    assert list(assigned_shards(5, rank=1, world_size=2)) == [1, 3]
    assert sorted(i for rank in range(3) for i in assigned_shards(7, rank, 3)) == list(range(7))
    assert derive_seed(42, 0, 1) == derive_seed(42, 0, 1)
    assert len({derive_seed(42, 0, 1), derive_seed(42, 1, 0), derive_seed(43, 0, 1)}) == 3


# ---------------------------------------------------------------------------------------------
# Errors before any model loads
# ---------------------------------------------------------------------------------------------


def test_duplicate_ids_are_a_one_line_record_error(tmp_path):
    data = tmp_path / "dup.jsonl"
    write_records(data, [_record("x"), _record("y"), _record("x")])
    with pytest.raises(RecordError, match="duplicate id 'x'") as caught:
        run_augment(tmp_path / "no-teacher", data, tmp_path / "out", show_progress=False)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"max_prompt_tokens": 64, "max_total_tokens": 64}, "max_prompt_tokens < max_total"),
        ({"selection": "some"}, "unknown selection 'some'"),
        ({"template": "fancy"}, "unknown template 'fancy'"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"shard_size": 0}, "shard_size must be >= 1"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be >= 0"),
    ],
)
def test_bad_settings_are_user_errors(tmp_path, options, fragment):
    data = tmp_path / "data.jsonl"
    write_records(data, [_record("x")])
    with pytest.raises(UserError, match=fragment):
        run_augment(tmp_path / "no-teacher", data, tmp_path / "out", **options)


def test_resume_with_changed_input_is_refused(tmp_path):
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    write_records(data, [_record("x")])
    with pytest.raises(UserError, match="no-teacher"):  # manifest written, then the load fails
        run_augment(tmp_path / "no-teacher", data, out, show_progress=False)
    write_records(data, [_record("x"), _record("y")])
    with pytest.raises(AugmentError, match="input.num_records: 1 -> 2"):
        run_augment(tmp_path / "no-teacher", data, out, show_progress=False)


def test_nothing_selected_is_an_error(tmp_path):
    data = tmp_path / "data.jsonl"
    write_records(data, [_record("x", input_=""), _record("y", input_=" ")])
    with pytest.raises(AugmentError, match="no record selected"):
        run_augment(tmp_path / "no-teacher", data, tmp_path / "out", show_progress=False)


# ---------------------------------------------------------------------------------------------
# With the tiny random teacher
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_torch_thread():
    """A 48-wide model gains nothing from intra-op threads, and on a busy 2-core machine they
    spin against each other (measured: 3 s with one thread, 25 s with two under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def augment_data(workspace, tmp_path_factory) -> Path:
    """20 workspace records; every fifth has no input (so it is not selected by default)."""
    records = read_records(workspace["train"])[:20]
    records = [
        record.model_copy(update={"input": ""}) if index % 5 == 0 else record
        for index, record in enumerate(records)
    ]
    path = tmp_path_factory.mktemp("augment") / "train.jsonl"
    write_records(path, records)
    return path


def _rationales(output_dir: Path) -> dict[str, str | None]:
    return {record.id: record.rationale for record in read_records(output_dir / OUTPUT_FILENAME)}


def test_output_has_every_record_once_with_teacher_rationales(workspace, augment_data, tmp_path):
    options = {**LIMITS, "shard_size": 4, "batch_size": 3, "show_progress": False}
    out = tmp_path / "out"
    result = run_augment(workspace["teacher"], augment_data, out, **options)
    inputs = read_records(augment_data)
    outputs = read_records(result.output_file)
    assert [r.id for r in outputs] == [r.id for r in inputs]
    selected = [r.id for r in inputs if r.input.strip()]
    stats = json.loads((out / STATS_FILENAME).read_text())
    assert stats["total"] == 20 and stats["selected"] == len(selected) == 16
    assert stats["generated"] == 16 and stats["skipped_resumed"] == 0 and stats["num_shards"] == 4
    assert stats["with_rationale"] + stats["empty"] == 16 and stats["with_rationale"] >= 14
    for record, original in zip(outputs, inputs, strict=True):
        assert record.model_dump(exclude={"rationale"}) == original.model_dump(
            exclude={"rationale"}
        )
        if record.id not in selected:
            assert record.rationale is None  # the input's gold rationale is not kept
    # The rationale is the teacher's generation as written in its shard, cut and stripped.
    raw = {}
    for index in range(4):
        raw.update(
            (row["id"], row["generation"])
            for row in map(json.loads, shard_path(out, index).read_text().splitlines())
        )
    assert set(raw) == set(selected)
    for record in outputs:
        if record.id in raw:
            assert record.rationale == (cut_rationale(raw[record.id]) or None)
    assert len({r.rationale for r in outputs if r.rationale}) == stats["with_rationale"]
    examples = make_examples(outputs, template="compact", cot_records="non_empty_input")
    cot = [example for example in examples if example.is_cot]
    assert len(cot) == stats["with_rationale"]
    by_id = {record.id: record for record in outputs}
    for example in cot:
        record = by_id[example.id.removesuffix("#cot")]
        assert example.answer == record.rationale + COT_ANSWER_JOINER + record.output

    # Rerun on the finished directory: nothing regenerated, same output.
    again = run_augment(workspace["teacher"], augment_data, out, **options)
    assert again.stats.generated == 0 and again.stats.skipped_resumed == 16
    assert read_records(again.output_file) == outputs
    # The filter applies at the merge: switching it on regenerates nothing.
    filtered = run_augment(
        workspace["teacher"], augment_data, out, filter_contradicting=True, **options
    )
    assert filtered.stats.generated == 0
    gold = {record.id: record.output for record in inputs}
    for record in read_records(filtered.output_file):
        if record.id in raw:
            dropped = not cut_rationale(raw[record.id]) or contradicts(
                raw[record.id], gold[record.id]
            )
            assert (record.rationale is None) is dropped
    assert filtered.stats.filtered == sum(
        bool(cut_rationale(text)) and contradicts(text, gold[id_]) for id_, text in raw.items()
    )
    # Another seed is refused in the same directory. Elsewhere it gives other rationales: shown
    # on the first 5 records, whose shard 0 is the same 4 prompts as the full run's shard 0.
    with pytest.raises(AugmentError, match="seed: 42 -> 7"):
        run_augment(workspace["teacher"], augment_data, out, **{**options, "seed": 7})
    head = tmp_path / "head.jsonl"
    write_records(head, inputs[:5])
    other = run_augment(workspace["teacher"], head, tmp_path / "seed7", **{**options, "seed": 7})
    seed7, seed42 = _rationales(other.output_file.parent), _rationales(out)
    assert [seed7[id_] != seed42[id_] for id_ in selected[:4]] == [True] * 4


# The killed run: the real command, slowed down per batch so the kill lands between shards.
_SLOW_RUN = """
import sys, time
import torch
from cot2align_ds.data import augment
torch.set_num_threads(1)
original = augment.generate_ids
def slow_generate_ids(*args, **kwargs):
    time.sleep(1.0)
    return original(*args, **kwargs)
augment.generate_ids = slow_generate_ids
augment.run_augment(sys.argv[1], sys.argv[2], sys.argv[3], template="compact",
    max_prompt_tokens=64, max_total_tokens=80, shard_size=2, batch_size=2, show_progress=False)
"""


def _kill_after_first_shard(teacher: Path, data: Path, out: Path, log: Path) -> None:
    """Start the slow run, SIGKILL it as soon as shard 0 is on disk."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", _SLOW_RUN, str(teacher), str(data), str(out)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": python_path},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 120
    while not shard_path(out, 0).exists():
        if process.poll() is not None:
            pytest.fail(f"augment subprocess exited early: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            pytest.fail("no shard appeared within 120 s")
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def test_resume_after_sigkill_matches_an_uninterrupted_run(workspace, augment_data, tmp_path):
    # 10 records, 8 selected: 4 shards of 2, one batch each.
    data = tmp_path / "data.jsonl"
    write_records(data, read_records(augment_data)[:10])
    options = {**LIMITS, "shard_size": 2, "batch_size": 2, "show_progress": False}
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    _kill_after_first_shard(workspace["teacher"], data, interrupted, tmp_path / "log")
    finished = sorted((interrupted / "shards").glob("shard-*.jsonl"))
    assert 1 <= len(finished) < 4, "the kill must land mid-run"
    assert not (interrupted / OUTPUT_FILENAME).exists()
    first_mtime = shard_path(interrupted, 0).stat().st_mtime_ns
    stale = interrupted / "shards" / ".shard-00003.jsonl.tmpxyz"  # a write cut short
    stale.write_text('{"id": "half')

    resumed = run_augment(workspace["teacher"], data, interrupted, **options)
    assert resumed.stats.skipped_resumed == 2 * len(finished)
    assert resumed.stats.generated == 8 - 2 * len(finished)
    assert shard_path(interrupted, 0).stat().st_mtime_ns == first_mtime  # not regenerated
    assert not stale.exists()

    reference = run_augment(workspace["teacher"], data, straight, **options)
    assert reference.stats.generated == 8
    resumed_records = read_records(resumed.output_file)
    ids = [record.id for record in resumed_records]
    assert len(ids) == len(set(ids)) == 10
    assert resumed_records == read_records(reference.output_file)
    assert sum(record.rationale is not None for record in resumed_records) >= 7
