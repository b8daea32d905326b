"""The paper's datasets as train/dev/test records: Dolly, Alpaca, S-NI and DialogSum.

``run_prepare`` loads one dataset with the ``datasets`` library (its hub copy by default, or a
local JSON/JSONL file or directory through ``source``), maps its fields to ``Record``, drops
unusable examples, splits with a seeded shuffle and writes ``train.jsonl``, ``dev.jsonl``,
``test.jsonl`` and, last, ``prepare_stats.json`` (so its presence means the split is complete).

Filters, in this order; an example is counted under the first reason that drops it:

1. ``empty_instruction`` / ``empty_output``: nothing to prompt with or nothing to learn.
2. ``duplicate``: the same (instruction, input) as an earlier example. A prompt seen in training
   must not be scored in test, and a repeated prompt with two answers teaches neither.
3. ``prompt_too_long``: the standard (Alpaca) prompt is longer than ``max_prompt_tokens``.
   MiniLLM's Dolly processing (which DSKD's split comes from) drops prompts over 256 tokens.
4. ``total_too_long``: prompt + answer + EOS is longer than ``max_total_tokens`` (512, the
   training budget): such an answer would lose its end and its EOS when truncated, teaching the
   student to stop mid-sentence. This is the "response too long" filter of DSKD/MiniLLM.
5. ``over_task_cap`` (S-NI only): more than ``max_per_task`` examples of one task; Super-NI's
   own evaluation uses at most 100 instances per task, so no task dominates the split.

Lengths are counted with ``tokenizer`` when given (e.g. the student's), else estimated as
``ceil(characters / chars_per_token)`` with 4 characters per token, the usual figure for
English BPE vocabularies; ``prepare_stats.json`` records which was used.

Splits: ``resplit`` pools every loaded example, shuffles with ``seed`` and takes test, then dev,
then train (so changing the train size never changes dev or test). ``source`` keeps the
source's own train/validation/test splits (sizes are then caps, sampled with ``seed``); its test
split is never length-filtered, so the benchmark stays the published one.

| dataset | hub copy | mapping (instruction / input / output) | split | train/dev/test |
|---|---|---|---|---|
| dolly | databricks/databricks-dolly-15k | instruction / context / response | resplit | 11,435/1,000/500 |
| alpaca | tatsu-lab/alpaca | instruction / input / output | resplit | 11,435/1,000/500 |
| sni | Muennighoff/natural-instructions (test tasks) | definition / inputs / targets | resplit | all/500/500 |
| dialogsum | knkarthick/dialogsum | instruction naming the topic / dialogue / summary | source | all/500/1,500 |
| gsm8k | openai/gsm8k (main) | question / - / the number after "####"; the worked solution is the gold `rationale` | source (dev from train) | all/500/1,319 |

Dolly's sizes are DSKD's (docs/method.md section 5). The paper's sizes for the other three are not
available to us: Alpaca uses Dolly's, so a recipe costs the same per dataset; S-NI uses the 119
held-out Super-NI test tasks that MiniLLM/DSKD evaluate on (the hub's training split is several
GB); DialogSum keeps its published splits (its test split lists each dialogue three times, with
three summaries: the duplicate filter keeps the first, one reference per dialogue). DialogSum has
no length filter by default: its dialogues are long, and a 256-token prompt budget would remove
a large share of them.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.data.records import Record, write_records
from cot2align_ds.data.templates import TEMPLATES, standard_prompt
from cot2align_ds.errors import UserError, first_line

DatasetName = Literal["dolly", "alpaca", "sni", "dialogsum", "gsm8k"]
SplitMode = Literal["auto", "resplit", "source"]
SPLITS = ("train", "dev", "test")
STATS_FILENAME = "prepare_stats.json"
# As the research code asks: a summary focused on the dialogue's topic, named in the instruction.
DIALOGSUM_INSTRUCTION = (
    "Summarize the following dialogue, focusing specifically on the provided topic: {topic}."
)
DIALOGSUM_INSTRUCTION_NO_TOPIC = "Summarize the following dialogue."
CHARS_PER_TOKEN = 4.0
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "dev",
    "valid": "dev",
    "dev": "dev",
    "test": "test",
}
_JSON_SUFFIXES = (".json", ".jsonl")


class PrepareError(UserError):
    """A dataset cannot be loaded or split; the message is one line saying what to do."""


@dataclass(frozen=True)
class _Fields:
    instruction: str
    input: str
    output: str
    group: str | None = None  # the S-NI task, for the per-task cap
    rationale: str | None = None  # a gold rationale (GSM8K's worked solution)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from, how its rows become records, and its default split."""

    hub_name: str
    hub_splits: tuple[str, ...] | None  # None: every split the hub copy has
    required: tuple[str, ...]
    to_fields: Callable[[Mapping[str, Any]], _Fields]
    split_mode: Literal["resplit", "source"]
    sizes: tuple[int | None, int, int]  # train (None: all that is left), dev, test
    max_prompt_tokens: int = 256
    max_total_tokens: int = 512
    max_per_task: int | None = None
    hub_config: str | None = None  # the hub dataset's configuration name (GSM8K: "main")


def _text(value: Any) -> str:
    """A field as stripped text; a list of references (S-NI ``targets``) gives its first."""
    if isinstance(value, list):
        value = value[0] if value else ""
    return "" if value is None else str(value).strip()


def _dolly(row: Mapping[str, Any]) -> _Fields:
    return _Fields(_text(row["instruction"]), _text(row["context"]), _text(row["response"]))


def _alpaca(row: Mapping[str, Any]) -> _Fields:
    return _Fields(_text(row["instruction"]), _text(row["input"]), _text(row["output"]))


def _sni(row: Mapping[str, Any]) -> _Fields:
    task = _text(row.get("task_name")) or None
    return _Fields(_text(row["definition"]), _text(row["inputs"]), _text(row["targets"]), task)


def _dialogsum(row: Mapping[str, Any]) -> _Fields:
    topic = _text(row.get("topic"))
    instruction = (
        DIALOGSUM_INSTRUCTION.format(topic=topic) if topic else DIALOGSUM_INSTRUCTION_NO_TOPIC
    )
    return _Fields(instruction, _text(row["dialogue"]), _text(row["summary"]))


def _gsm8k(row: Mapping[str, Any]) -> _Fields:
    """GSM8K: the worked solution ends with ``#### <answer>``; the solution (its ``<<3*4=12>>``
    calculator annotations removed) becomes the gold rationale, the number the answer."""
    solution, _, final = _text(row["answer"]).rpartition("####")
    rationale = re.sub(r"<<[^>]*>>", "", solution).strip()
    return _Fields(
        _text(row["question"]), "", final.strip().replace(",", ""), None, rationale or None
    )


DATASETS: dict[str, DatasetSpec] = {
    "dolly": DatasetSpec(
        "databricks/databricks-dolly-15k",
        ("train",),
        ("instruction", "context", "response"),
        _dolly,
        "resplit",
        (11_435, 1_000, 500),
    ),
    "alpaca": DatasetSpec(
        "tatsu-lab/alpaca",
        ("train",),
        ("instruction", "input", "output"),
        _alpaca,
        "resplit",
        (11_435, 1_000, 500),
    ),
    "sni": DatasetSpec(
        "Muennighoff/natural-instructions",
        ("test",),
        ("definition", "inputs", "targets"),
        _sni,
        "resplit",
        (None, 500, 500),
        max_per_task=100,
    ),
    "dialogsum": DatasetSpec(
        "knkarthick/dialogsum",
        None,
        ("dialogue", "summary"),
        _dialogsum,
        "source",
        (None, 500, 1_500),
        max_prompt_tokens=0,
        max_total_tokens=0,
    ),
    "gsm8k": DatasetSpec(
        "openai/gsm8k",
        ("train", "test"),
        ("question", "answer"),
        _gsm8k,
        "source",
        (None, 500, 1_319),
        hub_config="main",
    ),
}


def _dropped_text(dropped: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in dropped.items() if count) or "none"


@dataclass
class PrepareResult:
    output_dir: Path
    files: dict[str, Path]
    stats: dict[str, Any]

    def summary(self) -> str:
        counts = self.stats["counts"]
        dropped = _dropped_text(counts["dropped"])
        text = (
            f"{self.stats['dataset']}: {counts['loaded']} loaded, dropped: {dropped}; wrote "
            f"train {counts['train']} / dev {counts['dev']} / test {counts['test']} "
            f"to {self.output_dir}"
        )
        wanted = self.stats["requested"]["train"]
        if wanted is not None and counts["train"] < wanted:
            text += f" (train is short of the requested {wanted})"
        return text


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _load_hub(spec: DatasetSpec, cache_dir: Path | None) -> dict[str, Any]:
    import datasets

    try:
        if spec.hub_splits is None:
            return dict(datasets.load_dataset(spec.hub_name, spec.hub_config, cache_dir=cache_dir))
        return {
            split: datasets.load_dataset(
                spec.hub_name, spec.hub_config, split=split, cache_dir=cache_dir
            )
            for split in spec.hub_splits
        }
    except ConnectionError:
        # HF_DATASETS_OFFLINE / no network: the hub raises this at once, before any download.
        raise PrepareError(
            f"cannot download {spec.hub_name} offline; pass --source with a local copy"
        ) from None
    except (OSError, ValueError) as error:
        raise PrepareError(
            f"cannot load {spec.hub_name} ({first_line(error)}); pass --source with a local copy"
        ) from None


def _json_files(source: Path) -> list[Path]:
    if source.is_file():
        if source.suffix not in _JSON_SUFFIXES:
            raise PrepareError(f"--source {source}: expected a .json or .jsonl file")
        return [source]
    if not source.is_dir():
        raise PrepareError(f"--source {source}: no such file or directory")
    files = sorted(path for path in source.iterdir() if path.suffix in _JSON_SUFFIXES)
    if not files:
        raise PrepareError(f"--source {source}: no .json or .jsonl files in the directory")
    return files


def _split_of(path: Path) -> str | None:
    """train*, validation*/valid*/dev*, test* file names name a split; others do not."""
    stem = path.name.split(".")[0].lower()
    return next((split for alias, split in _SPLIT_ALIASES.items() if stem.startswith(alias)), None)


def _local_data_files(source: Path) -> dict[str, list[str]]:
    """Files grouped by the split their name gives (``pooled`` when names give none)."""
    groups: dict[str, list[str]] = {}
    files = _json_files(source)
    named = {path: _split_of(path) for path in files}
    if source.is_file() or not all(named.values()):
        return {"pooled": [str(path) for path in files]}
    for path, split in named.items():
        groups.setdefault(split, []).append(str(path))
    return groups


def _load_local(source: Path, cache_dir: Path | None) -> dict[str, Any]:
    import datasets

    try:
        loaded = datasets.load_dataset(
            "json", data_files=_local_data_files(source), cache_dir=cache_dir
        )
    except FileNotFoundError as error:
        raise PrepareError(f"--source {source}: {first_line(error)}") from None
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise PrepareError(
            f"--source {source}: not readable as JSON/JSONL ({first_line(cause)}); fix the file"
        ) from None
    return dict(loaded)


# ---------------------------------------------------------------------------------------------
# Rows -> records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Example:
    record: Record
    group: str | None


def _check_fields(columns: Iterable[str], spec: DatasetSpec, dataset: str, where: str) -> None:
    columns = list(columns)
    for name in spec.required:
        if name not in columns:
            raise PrepareError(
                f"{where}: field '{name}' missing; {dataset} rows need "
                f"{', '.join(spec.required)} (found: {', '.join(columns) or 'none'})"
            )


def _examples(rows: Any, spec: DatasetSpec, id_prefix: str) -> list[_Example]:
    examples = []
    for index, row in enumerate(rows):
        fields = spec.to_fields(row)
        # The source's own id when it has one (S-NI, DialogSum), so records trace back to it.
        source_id = _text(row.get("id"))
        record = Record(
            id=source_id or f"{id_prefix}-{index}",
            instruction=fields.instruction,
            input=fields.input,
            output=fields.output,
            rationale=fields.rationale,
        )
        examples.append(_Example(record, fields.group))
    return examples


def _load_examples(
    spec: DatasetSpec, dataset: str, source: Path | None, cache_dir: Path | None
) -> dict[str, list[_Example]]:
    """Split name ("train"/"dev"/"test", or "pooled") -> examples, in source order."""
    loaded = _load_hub(spec, cache_dir) if source is None else _load_local(source, cache_dir)
    where = spec.hub_name if source is None else f"--source {source}"
    by_split: dict[str, list[_Example]] = {}
    for name, rows in loaded.items():
        _check_fields(rows.column_names, spec, dataset, where)
        split = _SPLIT_ALIASES.get(name.lower(), name)
        # One source split (Dolly, Alpaca, a single file): ids are "<dataset>-<row>", the same
        # for the hub and a local copy of it, so both give identical files.
        prefix = dataset if len(loaded) == 1 else f"{dataset}-{name}"
        by_split.setdefault(split, []).extend(_examples(rows, spec, prefix))
    return by_split


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------


@dataclass
class _Filter:
    """Drops unusable examples (module docstring, steps 1-4) and counts why."""

    count_tokens: Callable[[str], int]
    max_prompt_tokens: int
    max_total_tokens: int
    template: str = "alpaca"
    seen: set[tuple[str, str]] = field(default_factory=set)
    dropped: Counter = field(default_factory=Counter)

    def reason(self, record: Record, check_length: bool) -> str | None:
        if not record.instruction:
            return "empty_instruction"
        if not record.output:
            return "empty_output"
        key = (record.instruction, record.input)
        if key in self.seen:
            return "duplicate"
        self.seen.add(key)
        if check_length:
            return self._length_reason(record)
        return None

    def _length_reason(self, record: Record) -> str | None:
        if not (self.max_prompt_tokens or self.max_total_tokens):
            return None
        prompt = standard_prompt(record, self.template)
        if self.max_prompt_tokens and self.count_tokens(prompt) > self.max_prompt_tokens:
            return "prompt_too_long"
        total = self.count_tokens(prompt + record.output) + 1  # + EOS
        if self.max_total_tokens and total > self.max_total_tokens:
            return "total_too_long"
        return None

    def keep(self, examples: list[_Example], check_length: bool = True) -> list[_Example]:
        kept = []
        for example in examples:
            reason = self.reason(example.record, check_length)
            if reason is None:
                kept.append(example)
            else:
                self.dropped[reason] += 1
        return kept


def cap_per_task(
    examples: list[_Example], max_per_task: int | None, rng: random.Random
) -> tuple[list[_Example], int]:
    """At most ``max_per_task`` examples per task, chosen with ``rng``; source order is kept."""
    if max_per_task is None:
        return examples, 0
    by_task: dict[str | None, list[int]] = {}
    for index, example in enumerate(examples):
        by_task.setdefault(example.group, []).append(index)
    chosen: set[int] = set()
    for indices in by_task.values():
        chosen.update(rng.sample(indices, max_per_task) if len(indices) > max_per_task else indices)
    kept = [example for index, example in enumerate(examples) if index in chosen]
    return kept, len(examples) - len(kept)


def token_counter(
    tokenizer: str | Path | None, chars_per_token: float = CHARS_PER_TOKEN
) -> tuple[Callable[[str], int], str]:
    """A length function and the words that describe it in ``prepare_stats.json``."""
    if tokenizer is None:
        return (
            lambda text: math.ceil(len(text) / chars_per_token),
            f"estimated tokens: ceil(characters / {chars_per_token:g})",
        )
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as error:
        raise PrepareError(
            f"--tokenizer {tokenizer}: cannot load ({first_line(error)}); pass a local "
            "tokenizer directory"
        ) from None
    return (
        lambda text: len(loaded(text, add_special_tokens=False)["input_ids"]),
        f"tokens of {tokenizer}",
    )


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Resolved options: the dataset's defaults with the caller's overrides applied."""

    dataset: str
    spec: DatasetSpec
    split_mode: Literal["resplit", "source"]
    sizes: dict[str, int | None]
    max_prompt_tokens: int
    max_total_tokens: int
    max_per_task: int | None
    seed: int


def _resplit(examples: list[_Example], plan: _Plan) -> dict[str, list[Record]]:
    sizes = plan.sizes
    needed = sizes["dev"] + sizes["test"] + 1
    if len(examples) < needed:
        raise PrepareError(
            f"{plan.dataset}: only {len(examples)} usable examples after filtering; dev "
            f"{sizes['dev']} + test {sizes['test']} + at least one for train need {needed} "
            "(lower --dev-size/--test-size)"
        )
    order = list(range(len(examples)))
    random.Random(plan.seed).shuffle(order)
    records = [examples[index].record for index in order]
    test_end = sizes["test"]
    dev_end = test_end + sizes["dev"]
    train_end = None if sizes["train"] is None else dev_end + sizes["train"]
    return {
        "train": records[dev_end:train_end],
        "dev": records[test_end:dev_end],
        "test": records[:test_end],
    }


def _capped(examples: list[_Example], cap: int | None, seed: int) -> list[Record]:
    """Source order when under the cap, else a seeded sample of ``cap`` examples."""
    if cap is None or len(examples) <= cap:
        return [example.record for example in examples]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[index].record for index in order[:cap]]


def _split(
    by_split: dict[str, list[_Example]], plan: _Plan, keep: _Filter
) -> tuple[dict[str, list[Record]], int]:
    """Filtered records per split, and how many usable examples went unused."""
    rng = random.Random(plan.seed)
    if plan.split_mode == "resplit":
        pooled = [example for examples in by_split.values() for example in examples]
        usable, over_cap = cap_per_task(keep.keep(pooled), plan.max_per_task, rng)
        keep.dropped["over_task_cap"] += over_cap
        splits = _resplit(usable, plan)
        return splits, len(usable) - sum(len(records) for records in splits.values())
    splits, unused = {}, 0
    carve_dev = "dev" not in by_split  # GSM8K: train and test only; dev comes from train
    for split in ("test", "dev", "train"):  # test first: a duplicate is dropped from train
        if split == "dev" and carve_dev:
            continue
        usable = keep.keep(by_split[split], check_length=split != "test")
        if split == "train" and carve_dev:
            order = list(range(len(usable)))
            random.Random(plan.seed).shuffle(order)
            dev_count = min(plan.sizes["dev"], max(len(usable) - 1, 0))
            splits["dev"] = [usable[index].record for index in order[:dev_count]]
            usable = [usable[index] for index in sorted(order[dev_count:])]
        usable, over_cap = cap_per_task(usable, plan.max_per_task, rng)
        keep.dropped["over_task_cap"] += over_cap
        if not usable:
            raise PrepareError(
                f"{plan.dataset}: no usable {split} examples after filtering (dropped: "
                f"{_dropped_text(keep.dropped)}); relax --max-prompt-tokens/--max-total-tokens"
            )
        splits[split] = _capped(usable, plan.sizes[split], plan.seed)
        unused += len(usable) - len(splits[split])
    return splits, unused


def _split_mode(
    requested: SplitMode, spec: DatasetSpec, by_split: dict[str, list[_Example]], where: str
) -> Literal["resplit", "source"]:
    # A source with train and test but no dev gets its dev carved from train.
    has_splits = "train" in by_split and "test" in by_split
    if requested == "source" and not has_splits:
        raise PrepareError(
            f"{where}: --split-mode source needs train and test splits (and validation/dev) "
            f"(found: {', '.join(sorted(by_split))}); name the files train/dev/test.jsonl or "
            "use --split-mode resplit"
        )
    if requested == "auto":
        return "source" if spec.split_mode == "source" and has_splits else "resplit"
    return requested


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise PrepareError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _or_default(value: int | None, default: int | None) -> int | None:
    return default if value is None else value


def _check_options(
    sizes: dict[str, int | None], split_mode: str, template: str, chars_per_token: float
) -> None:
    for split, size in sizes.items():
        if size is not None and size < 1:
            raise PrepareError(f"--{split}-size {size}: must be at least 1")
    if split_mode not in ("auto", "resplit", "source"):
        raise PrepareError(f"--split-mode {split_mode}: choose auto, resplit or source")
    if template not in TEMPLATES:
        raise PrepareError(f"--template {template}: choose one of {', '.join(TEMPLATES)}")
    if chars_per_token <= 0:
        raise PrepareError(f"--chars-per-token {chars_per_token}: must be positive")


def _make_filter(
    plan: _Plan, tokenizer: str | Path | None, chars_per_token: float, template: str
) -> tuple[_Filter, str]:
    if not (plan.max_prompt_tokens or plan.max_total_tokens):
        return _Filter(len, 0, 0, template), "none (no length filter)"
    count_tokens, unit = token_counter(tokenizer, chars_per_token)
    return _Filter(count_tokens, plan.max_prompt_tokens, plan.max_total_tokens, template), unit


def _write(output_dir: Path, splits: dict[str, list[Record]], stats: dict) -> dict[str, Path]:
    if output_dir.exists() and not output_dir.is_dir():
        raise PrepareError(f"--output-dir {output_dir}: is a file; give a directory")
    files = {split: output_dir / f"{split}.jsonl" for split in SPLITS}
    for split in SPLITS:
        write_records(files[split], splits[split])
    stats["files"] = {split: str(path) for split, path in files.items()}
    # Last, so that its presence means the three splits above are complete.
    write_text_atomic(output_dir / STATS_FILENAME, json.dumps(stats, indent=2) + "\n")
    return files


def _check_unique_ids(splits: dict[str, list[Record]], dataset: str) -> None:
    counts = Counter(record.id for records in splits.values() for record in records)
    repeated = [record_id for record_id, count in counts.items() if count > 1]
    if repeated:
        raise PrepareError(
            f"{dataset}: record id '{repeated[0]}' appears {counts[repeated[0]]} times in the "
            "source; ids must be unique (remove or rename the 'id' field)"
        )


def run_prepare(
    dataset: DatasetName | str,
    output_dir: str | Path,
    *,
    source: str | Path | None = None,
    seed: int = 42,
    train_size: int | None = None,
    dev_size: int | None = None,
    test_size: int | None = None,
    split_mode: SplitMode | str = "auto",
    max_prompt_tokens: int | None = None,
    max_total_tokens: int | None = None,
    max_per_task: int | None = None,
    tokenizer: str | Path | None = None,
    chars_per_token: float = CHARS_PER_TOKEN,
    template: str = "alpaca",
    cache_dir: str | Path | None = None,
) -> PrepareResult:
    """Load, filter, split and write one dataset (see the module docstring for every rule).

    ``None`` for a size or a limit means the dataset's default (the table above); a length
    limit of 0 turns that filter off. ``train_size`` is a cap: train gets what is left after dev
    and test when fewer examples survive the filters (``prepare_stats.json`` says so).
    ``cache_dir`` is the ``datasets`` cache (default: its own, under ~/.cache/huggingface).
    """
    spec = _spec(dataset)
    requested = (train_size, dev_size, test_size)
    sizes = dict(zip(SPLITS, map(_or_default, requested, spec.sizes), strict=True))
    _check_options(sizes, split_mode, template, chars_per_token)
    source_path = None if source is None else Path(source).expanduser()
    by_split = _load_examples(spec, dataset, source_path, cache_dir and Path(cache_dir))
    where = spec.hub_name if source_path is None else f"--source {source_path}"
    plan = _Plan(
        dataset=dataset,
        spec=spec,
        split_mode=_split_mode(split_mode, spec, by_split, where),  # type: ignore[arg-type]
        sizes=sizes,
        max_prompt_tokens=_or_default(max_prompt_tokens, spec.max_prompt_tokens) or 0,
        max_total_tokens=_or_default(max_total_tokens, spec.max_total_tokens) or 0,
        max_per_task=_or_default(max_per_task, spec.max_per_task),
        seed=seed,
    )
    keep, unit = _make_filter(plan, tokenizer, chars_per_token, template)
    splits, unused = _split(by_split, plan, keep)
    _check_unique_ids(splits, dataset)
    stats = _stats(plan, by_split, splits, keep, unused, where, unit)
    output = Path(output_dir)
    return PrepareResult(output, _write(output, splits, stats), stats)


_DROP_REASONS = (
    "empty_instruction",
    "empty_output",
    "duplicate",
    "prompt_too_long",
    "total_too_long",
    "over_task_cap",
)


def _stats(
    plan: _Plan,
    by_split: dict[str, list[_Example]],
    splits: dict[str, list[Record]],
    keep: _Filter,
    unused: int,
    where: str,
    unit: str,
) -> dict[str, Any]:
    return {
        "dataset": plan.dataset,
        "source": where,
        "split_mode": plan.split_mode,
        "seed": plan.seed,
        "requested": plan.sizes,
        "filters": {
            "template": keep.template,
            "max_prompt_tokens": plan.max_prompt_tokens or None,
            "max_total_tokens": plan.max_total_tokens or None,
            "length_unit": unit,
            "max_per_task": plan.max_per_task,
            "test_length_filtered": plan.split_mode == "resplit",
        },
        "counts": {
            "loaded": sum(len(examples) for examples in by_split.values()),
            "dropped": {reason: keep.dropped[reason] for reason in _DROP_REASONS},
            **{split: len(splits[split]) for split in SPLITS},
            "unused": unused,
        },
    }
