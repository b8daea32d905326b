"""Dataset preparation: real field layouts in local JSON/JSONL fixtures, filters, splits, errors.

Nothing downloads: tests/conftest.py sets HF_DATASETS_OFFLINE=1, so the hub path must fail at
once with one line, and hub loading itself is checked with ``datasets.load_dataset`` replaced.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from cot2align_ds.data.prepare import (
    DATASETS,
    DIALOGSUM_INSTRUCTION,
    STATS_FILENAME,
    PrepareError,
    run_prepare,
)
from cot2align_ds.data.records import Record, read_records
from cot2align_ds.data.templates import standard_prompt
from cot2align_ds.errors import UserError


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _dolly_rows(count: int) -> list[dict]:
    """databricks-dolly-15k's layout: instruction, context, response, category."""
    return [
        {
            "instruction": f"Question number {index}?",
            "context": f"Some context {index}." if index % 3 == 0 else "",
            "response": f"Answer {index}.",
            "category": "open_qa" if index % 3 else "closed_qa",
        }
        for index in range(count)
    ]


def _prepare(tmp_path: Path, dataset: str, source: Path, name: str = "out", **options):
    options.setdefault("cache_dir", tmp_path / "hf_cache")
    return run_prepare(dataset, tmp_path / name, source=source, **options)


def _read_split(result, split: str) -> list[Record]:
    return read_records(result.files[split])


def _ids(result, split: str) -> list[str]:
    return [record.id for record in _read_split(result, split)]


# ---------------------------------------------------------------------------------------------
# Dolly: mapping, split sizes, determinism
# ---------------------------------------------------------------------------------------------


def test_dolly_fields_map_to_records(tmp_path):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(40))
    result = _prepare(tmp_path, "dolly", source, dev_size=5, test_size=5)
    records = {r.id: r for split in ("train", "dev", "test") for r in _read_split(result, split)}
    assert records["dolly-3"] == Record(
        id="dolly-3", instruction="Question number 3?", input="Some context 3.", output="Answer 3."
    )
    assert records["dolly-4"].input == ""
    assert set(records) == {f"dolly-{index}" for index in range(40)}


def test_dolly_split_sizes_are_disjoint_and_cover_the_usable_examples(tmp_path):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(60))
    result = _prepare(tmp_path, "dolly", source, dev_size=10, test_size=5)
    train, dev, test = (set(_ids(result, split)) for split in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (45, 10, 5)
    assert not (train & dev or train & test or dev & test)
    stats = json.loads((tmp_path / "out" / STATS_FILENAME).read_text())
    assert stats["counts"] | {"dropped": None} == {
        "loaded": 60,
        "dropped": None,
        "train": 45,
        "dev": 10,
        "test": 5,
        "unused": 0,
    }
    # DSKD's train size is a cap that 60 examples cannot meet: said in stats and summary.
    assert stats["requested"] == {"train": 11_435, "dev": 10, "test": 5}
    assert "short of the requested 11435" in result.summary()


def test_dolly_defaults_are_dskd_split_sizes():
    assert DATASETS["dolly"].sizes == (11_435, 1_000, 500)
    assert DATASETS["dolly"].hub_name == "databricks/databricks-dolly-15k"


def test_train_size_caps_train_and_counts_the_rest_unused(tmp_path):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(60))
    result = _prepare(tmp_path, "dolly", source, train_size=20, dev_size=10, test_size=5)
    assert len(_ids(result, "train")) == 20
    assert result.stats["counts"]["unused"] == 25


def test_same_seed_gives_identical_files_and_another_seed_another_split(tmp_path):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(80))
    first = _prepare(tmp_path, "dolly", source, "a", dev_size=10, test_size=10, seed=1)
    again = _prepare(tmp_path, "dolly", source, "b", dev_size=10, test_size=10, seed=1)
    other = _prepare(tmp_path, "dolly", source, "c", dev_size=10, test_size=10, seed=2)
    for split in ("train", "dev", "test"):
        assert first.files[split].read_bytes() == again.files[split].read_bytes()
    assert set(_ids(first, "test")) != set(_ids(other, "test"))


def test_train_size_does_not_change_dev_or_test(tmp_path):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(80))
    full = _prepare(tmp_path, "dolly", source, "a", dev_size=10, test_size=10)
    capped = _prepare(tmp_path, "dolly", source, "b", train_size=7, dev_size=10, test_size=10)
    for split in ("dev", "test"):
        assert full.files[split].read_bytes() == capped.files[split].read_bytes()


def test_stats_file_is_written_with_the_splits(tmp_path):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(30))
    result = _prepare(tmp_path, "dolly", source, dev_size=5, test_size=5)
    stats = json.loads((tmp_path / "out" / STATS_FILENAME).read_text())
    assert stats == json.loads(json.dumps(result.stats))
    assert stats["filters"]["length_unit"] == "estimated tokens: ceil(characters / 4)"
    assert stats["split_mode"] == "resplit"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dev.jsonl",
        STATS_FILENAME,
        "test.jsonl",
        "train.jsonl",
    ]


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------


def _estimated_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _response_for_total(instruction: str, total: int) -> str:
    """A response whose prompt + response + EOS is exactly ``total`` estimated tokens."""
    prompt = standard_prompt(Record(id="x", instruction=instruction, output="x"), "alpaca")
    response = "y" * ((total - 1) * 4 - len(prompt))
    assert _estimated_tokens(prompt + response) + 1 == total
    return response


def test_filters_drop_and_count_each_reason(tmp_path):
    rows = _dolly_rows(30)
    rows += [
        {"instruction": "Empty answer?", "context": "", "response": "", "category": "qa"},
        {"instruction": "Blank answer?", "context": "", "response": "  \n", "category": "qa"},
        {"instruction": "   ", "context": "", "response": "No question.", "category": "qa"},
        {**rows[4], "response": "A second answer to the same prompt."},
        {"instruction": "Long context?", "context": "c" * 1100, "response": "x", "category": "qa"},
        {"instruction": "Fits", "context": "", "response": _response_for_total("Fits", 512)},
        {
            "instruction": "Too long",
            "context": "",
            "response": _response_for_total("Too long", 513),
        },
    ]
    for row in rows[-2:]:
        row["category"] = "qa"
    source = _write_jsonl(tmp_path / "dolly.jsonl", rows)
    result = _prepare(tmp_path, "dolly", source, dev_size=5, test_size=5)
    assert result.stats["counts"]["dropped"] == {
        "empty_instruction": 1,
        "empty_output": 2,
        "duplicate": 1,
        "prompt_too_long": 1,
        "total_too_long": 1,
        "over_task_cap": 0,
    }
    kept = {r.instruction for split in ("train", "dev", "test") for r in _read_split(result, split)}
    assert "Fits" in kept and "Too long" not in kept and "Long context?" not in kept
    # The first of two identical prompts is the one kept.
    first = next(
        r for s in ("train", "dev", "test") for r in _read_split(result, s) if r.id == "dolly-4"
    )
    assert first.output == "Answer 4."


def test_length_limits_can_be_changed_or_turned_off(tmp_path):
    rows = _dolly_rows(20) + [
        {"instruction": "Long", "context": "c" * 1100, "response": "x", "category": "qa"}
    ]
    source = _write_jsonl(tmp_path / "dolly.jsonl", rows)
    off = _prepare(tmp_path, "dolly", source, "off", dev_size=2, test_size=2, max_prompt_tokens=0)
    assert off.stats["counts"]["dropped"]["prompt_too_long"] == 0
    assert off.stats["filters"]["max_prompt_tokens"] is None
    tight = _prepare(
        tmp_path, "dolly", source, "tight", dev_size=2, test_size=2, max_total_tokens=52
    )
    assert tight.stats["counts"]["dropped"]["total_too_long"] > 0


def test_tokenizer_counts_real_tokens_instead_of_the_estimate(tmp_path, toy_teacher_tokenizer):
    # "€" is 3 UTF-8 bytes: a byte-level BPE not trained on it spends 3 tokens per character,
    # so 300 of them fit the character estimate (75 tokens) but not the 256-token prompt budget.
    toy_teacher_tokenizer.save_pretrained(tmp_path / "tok")
    rows = _dolly_rows(20) + [
        {"instruction": "Euros?", "context": "€" * 300, "response": "x", "category": "qa"}
    ]
    source = _write_jsonl(tmp_path / "dolly.jsonl", rows)
    estimated = _prepare(tmp_path, "dolly", source, "estimate", dev_size=2, test_size=2)
    counted = _prepare(
        tmp_path, "dolly", source, "tokens", dev_size=2, test_size=2, tokenizer=tmp_path / "tok"
    )
    assert estimated.stats["counts"]["dropped"]["prompt_too_long"] == 0
    assert counted.stats["counts"]["dropped"]["prompt_too_long"] == 1
    assert counted.stats["filters"]["length_unit"] == f"tokens of {tmp_path / 'tok'}"


# ---------------------------------------------------------------------------------------------
# Alpaca, S-NI, DialogSum layouts
# ---------------------------------------------------------------------------------------------


def test_alpaca_json_array_maps_fields_and_null_input(tmp_path):
    rows = [
        {
            "instruction": f"Do task {index}.",
            "input": None if index % 2 else f"input {index}",
            "output": f"done {index}",
            "text": "ignored",
        }
        for index in range(20)
    ]
    source = tmp_path / "alpaca_data.json"
    source.write_text(json.dumps(rows), encoding="utf-8")
    result = _prepare(tmp_path, "alpaca", source, dev_size=3, test_size=3)
    records = {r.id: r for split in ("train", "dev", "test") for r in _read_split(result, split)}
    assert records["alpaca-2"] == Record(
        id="alpaca-2", instruction="Do task 2.", input="input 2", output="done 2"
    )
    assert records["alpaca-1"].input == ""


def _sni_rows() -> list[dict]:
    """Muennighoff/natural-instructions' layout: task_name, id, definition, inputs, targets."""
    return [
        {
            "task_name": f"task{task:03d}_demo",
            "id": f"task{task:03d}-{index}",
            "definition": f"Definition of task {task}.",
            "inputs": f"Input {index} of task {task}.",
            "targets": [f"Target {index}", "another reference"]
            if index == 0
            else f"Target {index}",
        }
        for task in range(3)
        for index in range(6)
    ]


def test_sni_maps_fields_keeps_source_ids_and_caps_each_task(tmp_path):
    source = _write_jsonl(tmp_path / "sni.jsonl", _sni_rows())
    result = _prepare(tmp_path, "sni", source, dev_size=2, test_size=2, max_per_task=4)
    records = [r for split in ("train", "dev", "test") for r in _read_split(result, split)]
    assert result.stats["counts"]["dropped"]["over_task_cap"] == 6
    assert len(records) == 12
    per_task = {
        task: sum(r.id.startswith(f"task{task:03d}-") for r in records) for task in range(3)
    }
    assert per_task == {0: 4, 1: 4, 2: 4}
    by_id = {r.id: r for r in records}
    any_id = next(iter(by_id))
    task, index = any_id.removeprefix("task").split("-")
    assert by_id[any_id] == Record(
        id=any_id,
        instruction=f"Definition of task {int(task)}.",
        input=f"Input {index} of task {int(task)}.",
        output=f"Target {index}",  # a list of references gives its first
    )


def test_sni_default_caps_at_100_per_task():
    assert DATASETS["sni"].max_per_task == 100
    assert DATASETS["sni"].hub_splits == ("test",)


def _dialogsum_dir(root: Path) -> Path:
    """knkarthick/dialogsum's layout: id, dialogue, summary, topic; test has 3 summaries each."""

    def row(row_id: str, dialogue: str, summary: str) -> dict:
        return {"id": row_id, "dialogue": dialogue, "summary": summary, "topic": "t"}

    train = [
        row(f"train_{i}", f"#Person1#: hello {i}\n#Person2#: hi", f"sum {i}") for i in range(12)
    ]
    train.append(row("train_long", "#Person1#: " + "word " * 400, "long"))
    train.append(row("train_leak", "#Person1#: test dialogue 0", "leaked"))
    dev = [row(f"dev_{i}", f"#Person1#: dev {i}", f"dev sum {i}") for i in range(4)]
    test = [
        row(f"test_{i}_{k}", f"#Person1#: test dialogue {i}", f"test sum {i} v{k}")
        for i in range(3)
        for k in (1, 2, 3)
    ]
    test.append(row("test_long_1", "#Person1#: " + "talk " * 400, "long test"))
    for name, rows in (("train", train), ("validation", dev), ("test", test)):
        _write_jsonl(root / f"{name}.jsonl", rows)
    return root


def test_dialogsum_keeps_source_splits_one_summary_per_dialogue(tmp_path):
    source = _dialogsum_dir(tmp_path / "dialogsum")
    result = _prepare(tmp_path, "dialogsum", source, max_prompt_tokens=120)
    assert result.stats["split_mode"] == "source"
    test = _read_split(result, "test")
    # Source order, the first summary of each dialogue, and no length filter on test.
    assert [r.id for r in test] == ["test_0_1", "test_1_1", "test_2_1", "test_long_1"]
    assert test[0] == Record(
        id="test_0_1",
        instruction=DIALOGSUM_INSTRUCTION.format(topic="t"),  # the topic, as the reference
        input="#Person1#: test dialogue 0",
        output="test sum 0 v1",
    )
    train_ids = _ids(result, "train")
    assert "train_long" not in train_ids  # length-filtered outside test
    assert "train_leak" not in train_ids  # its prompt is a test prompt
    assert len(train_ids) == 12 and len(_ids(result, "dev")) == 4
    assert result.stats["counts"]["dropped"]["duplicate"] == 7


def test_a_source_split_emptied_by_the_filters_is_refused(tmp_path):
    source = _dialogsum_dir(tmp_path / "dialogsum")
    with pytest.raises(PrepareError) as caught:
        _prepare(tmp_path, "dialogsum", source, max_prompt_tokens=20)
    assert "no usable dev examples after filtering (dropped: duplicate 6, prompt_too_long" in (
        _one_line(caught)
    )


def test_dialogsum_has_no_length_filter_by_default(tmp_path):
    source = _dialogsum_dir(tmp_path / "dialogsum")
    result = _prepare(tmp_path, "dialogsum", source)
    assert "train_long" in _ids(result, "train")
    assert result.stats["filters"]["length_unit"] == "none (no length filter)"


def test_dialogsum_single_file_is_resplit_and_source_mode_needs_splits(tmp_path):
    source = _dialogsum_dir(tmp_path / "dialogsum") / "train.jsonl"
    result = _prepare(tmp_path, "dialogsum", source, dev_size=3, test_size=3)
    assert result.stats["split_mode"] == "resplit"
    with pytest.raises(PrepareError, match="--split-mode source needs train and test splits"):
        _prepare(tmp_path, "dialogsum", source, "b", split_mode="source")


# ---------------------------------------------------------------------------------------------
# The hub path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_hub_path_fails_at_once_offline_with_one_line(tmp_path, dataset):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by tests/conftest.py
    start = time.perf_counter()
    with pytest.raises(PrepareError) as caught:
        run_prepare(dataset, tmp_path / "out", cache_dir=tmp_path / "hf_cache")
    elapsed = time.perf_counter() - start
    hub_name = DATASETS[dataset].hub_name
    assert str(caught.value) == (
        f"cannot download {hub_name} offline; pass --source with a local copy"
    )
    assert isinstance(caught.value, UserError)
    assert elapsed < 10.0  # an online lookup takes ~50 s to fail
    assert not (tmp_path / "out").exists()


def test_hub_copy_and_local_copy_give_identical_files(tmp_path, monkeypatch):
    import datasets

    rows = _dolly_rows(30)
    calls = []

    def fake_load_dataset(path, *args, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_list(rows)

    source = _write_jsonl(tmp_path / "dolly.jsonl", rows)
    local = _prepare(tmp_path, "dolly", source, "local", dev_size=4, test_size=4)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = run_prepare("dolly", tmp_path / "hub", dev_size=4, test_size=4)
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    for split in ("train", "dev", "test"):
        assert hub.files[split].read_bytes() == local.files[split].read_bytes()
    assert hub.stats["source"] == "databricks/databricks-dolly-15k"


def test_hub_dataset_with_splits_uses_them(tmp_path, monkeypatch):
    import datasets

    by_split = {
        name: [r for r in _rows_of(_dialogsum_dir(tmp_path / "ds") / f"{name}.jsonl")]
        for name in ("train", "validation", "test")
    }

    def fake_load_dataset(path, *args, split=None, **kwargs):
        assert path == "knkarthick/dialogsum" and split is None
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in by_split.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = run_prepare("dialogsum", tmp_path / "out")
    assert result.stats["split_mode"] == "source"
    assert _ids(result, "test") == ["test_0_1", "test_1_1", "test_2_1", "test_long_1"]


def _rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line that says what to fix
# ---------------------------------------------------------------------------------------------


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, UserError)
    return message


def test_missing_field_is_named(tmp_path):
    rows = [{"instruction": "q", "context": "", "answer": "a"} for _ in range(10)]
    source = _write_jsonl(tmp_path / "dolly.jsonl", rows)
    with pytest.raises(PrepareError) as caught:
        _prepare(tmp_path, "dolly", source)
    message = _one_line(caught)
    assert "field 'response' missing" in message
    assert "instruction, context, response" in message and "found: instruction" in message


def test_unknown_dataset(tmp_path):
    with pytest.raises(PrepareError, match="unknown dataset 'mmlu'; choose one of dolly"):
        run_prepare("mmlu", tmp_path / "out")


@pytest.mark.parametrize(
    ("make_source", "expected"),
    [
        (lambda root: root / "missing.jsonl", "no such file or directory"),
        (lambda root: root / "empty_dir", "no .json or .jsonl files"),
        (lambda root: root / "data.csv", "expected a .json or .jsonl file"),
        (lambda root: root / "broken.jsonl", "not readable as JSON/JSONL"),
    ],
)
def test_bad_source_is_one_line(tmp_path, make_source, expected):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "q", "context"\n')
    with pytest.raises(PrepareError) as caught:
        _prepare(tmp_path, "dolly", make_source(tmp_path))
    assert expected in _one_line(caught)


def test_too_few_examples_for_dev_and_test(tmp_path):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(12))
    with pytest.raises(PrepareError) as caught:
        _prepare(tmp_path, "dolly", source, dev_size=8, test_size=4)
    assert "only 12 usable examples" in _one_line(caught)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"dev_size": 0}, "--dev-size 0: must be at least 1"),
        ({"train_size": -3}, "--train-size -3: must be at least 1"),
        ({"split_mode": "random"}, "--split-mode random: choose auto"),
        ({"template": "chatml"}, "--template chatml: choose one of"),
        ({"chars_per_token": 0}, "--chars-per-token 0: must be positive"),
    ],
)
def test_bad_options(tmp_path, options, expected):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(12))
    with pytest.raises(PrepareError, match=expected.replace("-", r"\-")):
        _prepare(tmp_path, "dolly", source, **options)


def test_output_dir_that_is_a_file(tmp_path):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(20))
    (tmp_path / "out").write_text("a file")
    with pytest.raises(PrepareError, match="is a file; give a directory"):
        _prepare(tmp_path, "dolly", source, dev_size=2, test_size=2)


def test_repeated_source_ids_are_refused(tmp_path):
    rows = _sni_rows()
    rows[1]["id"] = rows[0]["id"]
    source = _write_jsonl(tmp_path / "sni.jsonl", rows)
    with pytest.raises(PrepareError) as caught:
        _prepare(tmp_path, "sni", source, dev_size=2, test_size=2)
    assert "record id 'task000-0' appears 2 times" in _one_line(caught)


def test_unreadable_tokenizer(tmp_path):
    source = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(20))
    with pytest.raises(PrepareError) as caught:
        _prepare(tmp_path, "dolly", source, tokenizer=tmp_path / "no_tokenizer_here")
    assert "--tokenizer" in _one_line(caught)


# ---------------------------------------------------------------------------------------------
# GSM8K: worked solutions become rationales; dev comes from train
# ---------------------------------------------------------------------------------------------


def _gsm8k_dir(root: Path) -> Path:
    """openai/gsm8k's layout (config "main"): question, answer = solution + "#### number"."""

    def row(i: int) -> dict:
        return {
            "question": f"Tom has {i} apples and buys {i + 2} more. How many does he have?",
            "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n"
            f"#### {2 * i + 2:,}",
        }

    _write_jsonl(root / "train.jsonl", [row(i) for i in range(1000, 1012)])
    _write_jsonl(root / "test.jsonl", [row(i) for i in range(5)])
    return root


def test_gsm8k_keeps_its_test_split_and_turns_solutions_into_rationales(tmp_path):
    source = _gsm8k_dir(tmp_path / "gsm8k")
    result = _prepare(tmp_path, "gsm8k", source, dev_size=3)
    test = _read_split(result, "test")
    assert [r.output for r in test] == ["2", "4", "6", "8", "10"]  # the published test, in order
    assert test[1].rationale == "He has 1 + 3 = 4 apples."  # calculator annotations removed
    train, dev = _read_split(result, "train"), _read_split(result, "dev")
    assert len(dev) == 3 and len(train) == 9  # dev carved from the 12 training problems
    assert not {r.id for r in dev} & {r.id for r in train}
    assert train[0].output == "2,002".replace(",", "") and train[0].rationale
    again = _prepare(tmp_path, "gsm8k", source, dev_size=3, name="again")
    assert _ids(again, "dev") == _ids(result, "dev")  # seeded
