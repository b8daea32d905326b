"""CoT augmentation: the fine-tuned teacher writes a rationale for every selected training record.

docs/method.md section 1, as one resumable command instead of hand edits of an evaluation script.
The teacher samples a continuation of each selected record's CoT prompt (which ends with
"Let's think step by step."); the rationale is that text cut before the first "Therefore, the
answer is" the teacher wrote itself, so the training CoT answer (rationale + joiner + gold) never
states two answers. Decoding defaults are the reference's: sampling, temperature 1, top_p 1, no
top-k, no-repeat n-gram 6 (inherited from its evaluation script), prompt cut to 256 tokens,
prompt + rationale <= 512 tokens (each prompt gets ``max_total_tokens - its length`` new tokens).

Layout of ``output_dir``::

    shards/manifest.json         settings + input fingerprint, written before any shard
    shards/shard-00000.jsonl     raw teacher output for selected records 0..shard_size-1
    train_cot.jsonl              every input record once, in input order; ``rationale`` is the
                                 teacher's (absent when not selected, empty or filtered)
    augment_stats.json           counts and wall time

Crash safety and resume: shard i always holds the same records (the i-th ``shard_size`` block of
the selected records, in input order) and is written atomically once complete, so a shard file
that exists is finished; a restart skips those and generates the rest. Sampling is seeded from
(seed, shard index, batch index), so an interrupted-and-resumed run gives the same rationales as
an uninterrupted one (on the same hardware and software). A restart with different settings or
different input is refused rather than mixing two runs in one file. Shards keep the raw
generation; cutting and filtering happen at the merge, so a filter change needs no regeneration.
Shard i -> rank ``i % world_size`` (``assigned_shards``) is how a multi-rank run would split them.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cot2align_ds.atomic import write_jsonl_atomic, write_text_atomic
from cot2align_ds.data.answers import extract_answer, parse_number
from cot2align_ds.data.records import Record, RecordError, read_records, write_records
from cot2align_ds.data.templates import CHAT, TEMPLATE_NAMES, cot_prompt
from cot2align_ds.errors import UserError
from cot2align_ds.inference.generation import DecodingConfig, encode_prompts, generate_ids
from cot2align_ds.inference.loading import LoadOptions, load_model_for_eval, require_safetensors

AugmentSelection = Literal["non_empty_input", "all"]
SHARDS_DIRNAME = "shards"
MANIFEST_FILENAME = "manifest.json"
OUTPUT_FILENAME = "train_cot.jsonl"
STATS_FILENAME = "augment_stats.json"
_MANIFEST_FORMAT = 1
_SELECTIONS = ("non_empty_input", "all")
# The teacher was fine-tuned on "...\nTherefore, the answer is: y" (COT_ANSWER_JOINER); it may
# drift in case or punctuation, and everything from that cue on is its answer, not reasoning.
_ANSWER_CUE = re.compile(r"therefore\s*,?\s*the\s+answer\s+is", re.IGNORECASE)


class AugmentError(UserError):
    """CoT augmentation cannot run (bad settings, or an output_dir from a different run)."""


# ---------------------------------------------------------------------------------------------
# Rationale post-processing (pure functions)
# ---------------------------------------------------------------------------------------------


def cut_rationale(generation: str) -> str:
    """The reasoning part of a teacher generation: the text before its first "Therefore, the
    answer is", stripped ("" when the generation starts with the answer)."""
    match = _ANSWER_CUE.search(generation)
    return (generation if match is None else generation[: match.start()]).strip()


def stated_answer(generation: str) -> str:
    """The answer the teacher itself gave: after its first "Therefore, the answer is" (up to the
    end of that line or the next cue), else what ``extract_answer`` finds (the last number, or
    the text). The first answer is the one its reasoning (the kept rationale) led to."""
    match = _ANSWER_CUE.search(generation)
    if match is not None:
        following = _ANSWER_CUE.search(generation, match.end())
        line_end = generation.find("\n", match.end())
        ends = [len(generation), line_end, following.start() if following else -1]
        generation = generation[: min(end for end in ends if end >= 0)]
    return extract_answer(generation)


def contradicts(generation: str, gold: str) -> bool:
    """True when the teacher's own answer and the gold are both numbers and differ."""
    own_value, gold_value = parse_number(stated_answer(generation)), parse_number(gold)
    return own_value is not None and gold_value is not None and own_value != gold_value


def finalize_record(
    record: Record, generation: str, *, filter_contradicting: bool
) -> tuple[Record, str]:
    """The output record for one selected record and its status: kept, empty or filtered.

    The rationale field is replaced (or removed: a gold rationale the input may carry is not
    the teacher's and would mix two sources in one training file).
    """
    rationale = cut_rationale(generation)
    if not rationale:
        status = "empty"
    elif filter_contradicting and contradicts(generation, record.output):
        status = "filtered"
    else:
        status = "kept"
    return record.model_copy(update={"rationale": rationale if status == "kept" else None}), status


# ---------------------------------------------------------------------------------------------
# Settings, selection and the shard plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentSettings:
    """Everything that decides which text the teacher writes (stored in the manifest; a resume
    must match it). Device, progress and the filter are left out: they do not change shards."""

    teacher_path: str
    template: str = "alpaca"
    selection: AugmentSelection = "non_empty_input"
    max_prompt_tokens: int = 256
    max_total_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6
    batch_size: int = 8
    shard_size: int = 256
    seed: int = 42
    dtype: str | None = None
    tokenizer_path: str | None = None
    base_model: str | None = None

    def check(self) -> None:
        """Fail on bad values before anything loads."""
        if self.template not in TEMPLATE_NAMES:
            raise AugmentError(f"unknown template '{self.template}'; choose {TEMPLATE_NAMES}")
        if self.selection not in _SELECTIONS:
            raise AugmentError(f"unknown selection '{self.selection}'; choose {list(_SELECTIONS)}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise AugmentError(
                f"batch_size and shard_size must be >= 1 (got {self.batch_size}, {self.shard_size})"
            )
        if not 1 <= self.max_prompt_tokens < self.max_total_tokens:
            raise AugmentError(
                f"need 1 <= max_prompt_tokens < max_total_tokens (got {self.max_prompt_tokens}, "
                f"{self.max_total_tokens}): the rationale needs room after the prompt"
            )
        self.decoding()  # DecodingConfig validates temperature, top_p, top_k

    def decoding(self, max_new_tokens: int = 1) -> DecodingConfig:
        return DecodingConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            max_prompt_tokens=self.max_prompt_tokens,
            prompt_special_tokens=self.template != CHAT,  # a chat template writes its own BOS
        )


def check_unique_ids(records: Sequence[Record], path: str | Path) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise RecordError(f"{path}: duplicate id '{record.id}'; every record needs its own id")
        seen.add(record.id)


def select_records(records: Sequence[Record], selection: AugmentSelection) -> list[Record]:
    """The records the teacher writes a rationale for, in input order."""
    if selection == "all":
        return list(records)
    return [record for record in records if record.input.strip()]


def shard_plan(selected: Sequence[Record], shard_size: int) -> list[list[Record]]:
    """Consecutive blocks of ``shard_size`` selected records: shard i is fixed by the input."""
    return [
        list(selected[start : start + shard_size]) for start in range(0, len(selected), shard_size)
    ]


def assigned_shards(num_shards: int, rank: int = 0, world_size: int = 1) -> range:
    """The shards one rank generates: i % world_size == rank (round robin keeps ranks even)."""
    return range(rank, num_shards, world_size)


def shard_path(output_dir: Path, index: int) -> Path:
    return output_dir / SHARDS_DIRNAME / f"shard-{index:05d}.jsonl"


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, shard, batch): distinct streams without arithmetic collisions."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------
# Manifest and shard files
# ---------------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(settings: AugmentSettings, data_file: Path, num_records: int, plan: list) -> dict:
    return {
        "format": _MANIFEST_FORMAT,
        "settings": asdict(settings),
        "input": {"sha256": _file_sha256(data_file), "num_records": num_records},
        "num_selected": sum(len(shard) for shard in plan),
        "num_shards": len(plan),
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            found.extend(_differences(before, after, f"{prefix}{key}."))
        elif before != after:
            found.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return found


def prepare_shards_dir(output_dir: Path, manifest: dict) -> None:
    """Write the manifest, or check it against an earlier run's; drop stale temporary files.

    With several ranks, only rank 0 may call this (before a barrier): the cleanup would delete
    another rank's in-flight temporary files.
    """
    shards_dir = output_dir / SHARDS_DIRNAME
    if output_dir.exists() and not output_dir.is_dir():
        raise AugmentError(f"output_dir '{output_dir}' is a file; give a directory")
    shards_dir.mkdir(parents=True, exist_ok=True)
    # Hidden files here are temporaries of atomic writes cut short by a crash.
    for stale in shards_dir.glob(".*"):
        stale.unlink(missing_ok=True)
    path = shards_dir / MANIFEST_FILENAME
    if not path.exists():
        if any(shards_dir.glob("shard-*.jsonl")):
            raise AugmentError(f"{shards_dir} has shards but no {MANIFEST_FILENAME}; delete it")
        write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AugmentError(f"{path}: unreadable manifest; delete {shards_dir} and rerun") from None
    changed = _differences(previous, manifest)
    if changed:
        raise AugmentError(
            f"{output_dir} holds shards from a different run ({'; '.join(changed[:3])}); "
            "use another output_dir or delete it"
        )


def read_shard(path: Path, expected_ids: list[str]) -> list[dict]:
    """A finished shard's rows; its ids must be exactly the plan's (same order)."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AugmentError(f"{path}: unreadable shard; delete it to regenerate it") from None
    if [row.get("id") for row in rows] != expected_ids:
        raise AugmentError(f"{path}: ids differ from the input's; delete {path.parent} and rerun")
    return rows


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def generate_shard(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    settings: AugmentSettings,
    shard_index: int,
    bar: tqdm | None = None,
) -> list[dict]:
    """Raw teacher output per record of one shard: ``{id, generation, truncated}``.

    Prompts go longest first in batches of ``batch_size`` (less padding); each batch samples up
    to the largest budget among its rows and each row is cut to its own budget
    ``max_total_tokens - prompt length``. ``truncated``: the budget ran out before EOS.
    """
    prompts = [cot_prompt(record, settings.template, tokenizer) for record in records]
    special = settings.template != CHAT
    encoded = encode_prompts(tokenizer, prompts, settings.max_prompt_tokens, special_tokens=special)
    lengths = [len(ids) for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda index: -lengths[index])
    rows: list[dict] = [{} for _ in prompts]
    for batch_index, start in enumerate(range(0, len(order), settings.batch_size)):
        indices = order[start : start + settings.batch_size]
        budgets = [settings.max_total_tokens - lengths[index] for index in indices]
        new_ids = generate_ids(
            model,
            tokenizer,
            [prompts[index] for index in indices],
            settings.decoding(max(budgets)),
            seed=derive_seed(settings.seed, shard_index, batch_index),
            batch_size=len(indices),
        )
        for index, ids, budget in zip(indices, new_ids, budgets, strict=True):
            text = tokenizer.decode(ids[:budget], skip_special_tokens=True)
            rows[index] = {
                "id": records[index].id,
                "generation": text,
                "truncated": len(ids) >= budget,
            }
        if bar is not None:
            bar.update(len(indices))
    return rows


def _load_teacher(
    settings: AugmentSettings, device: str | None, trust_remote_code: bool, allow_pickle: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_model_for_eval(
        settings.teacher_path,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=settings.dtype,
        trust_remote_code=trust_remote_code,
        tokenizer_path=settings.tokenizer_path,
        base_model=settings.base_model,
        allow_pickle=allow_pickle,
    )


# ---------------------------------------------------------------------------------------------
# Merge and the command
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentStats:
    """Counts of one ``run_augment`` call.

    ``generated``: rationales sampled by this call; ``skipped_resumed``: selected records found in
    shards an earlier call finished (generated + skipped_resumed = selected). ``with_rationale``,
    ``filtered`` (teacher's number != gold number), ``empty`` (nothing before the answer cue) and
    ``truncated`` (hit the token budget) describe the whole output.
    """

    total: int
    selected: int
    generated: int
    skipped_resumed: int
    with_rationale: int
    filtered: int
    empty: int
    truncated: int
    num_shards: int
    wall_time_s: float


@dataclass(frozen=True)
class AugmentResult:
    output_file: Path
    stats_file: Path
    stats: AugmentStats

    def summary(self) -> str:
        s = self.stats
        return (
            f"{s.with_rationale}/{s.total} records with a teacher rationale "
            f"({s.generated} generated, {s.skipped_resumed} resumed, {s.filtered} filtered, "
            f"{s.empty} empty, {s.truncated} truncated) -> {self.output_file}"
        )


def merge_records(
    records: Sequence[Record], generations: dict[str, str], *, filter_contradicting: bool
) -> tuple[list[Record], dict[str, int]]:
    """Every input record once, in input order: selected ones with the teacher's rationale
    (unless empty or filtered), the others without any rationale; and the status counts."""
    merged, counts = [], {"kept": 0, "empty": 0, "filtered": 0}
    for record in records:
        if record.id not in generations:
            merged.append(record.model_copy(update={"rationale": None}))
            continue
        final, status = finalize_record(
            record, generations[record.id], filter_contradicting=filter_contradicting
        )
        merged.append(final)
        counts[status] += 1
    return merged, counts


def run_augment(
    teacher_path: str | Path,
    data_file: str | Path,
    output_dir: str | Path,
    *,
    template: str = "alpaca",
    selection: AugmentSelection = "non_empty_input",
    max_prompt_tokens: int = 256,
    max_total_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = 6,
    batch_size: int = 8,
    shard_size: int = 256,
    seed: int = 42,
    filter_contradicting: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer_path: str | Path | None = None,
    base_model: str | Path | None = None,
    show_progress: bool = True,
    allow_pickle: bool = False,
) -> AugmentResult:
    """Have the teacher write rationales for ``data_file`` into ``output_dir/train_cot.jsonl``.

    Resumable: rerunning with the same arguments after an interruption finishes the missing
    shards only. ``teacher_path``: a saved model directory, LoRA adapter or ZeRO checkpoint
    (``base_model`` as for ``cot2align eval``). Writes ``augment_stats.json`` next to the output.
    """
    optional = {"tokenizer_path": tokenizer_path, "base_model": base_model}
    settings = AugmentSettings(
        teacher_path=str(Path(teacher_path).resolve()),
        template=template,
        selection=selection,
        max_prompt_tokens=max_prompt_tokens,
        max_total_tokens=max_total_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        no_repeat_ngram_size=no_repeat_ngram_size,
        batch_size=batch_size,
        shard_size=shard_size,
        seed=seed,
        dtype=dtype,
        **{key: None if value is None else str(value) for key, value in optional.items()},
    )
    return augment_from_settings(
        settings,
        data_file,
        output_dir,
        filter_contradicting=filter_contradicting,
        trust_remote_code=trust_remote_code,
        device=device,
        show_progress=show_progress,
        allow_pickle=allow_pickle,
    )


def augment_from_settings(
    settings: AugmentSettings,
    data_file: str | Path,
    output_dir: str | Path,
    *,
    filter_contradicting: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    show_progress: bool = True,
    allow_pickle: bool = False,
) -> AugmentResult:
    """``run_augment`` with the generation settings as one object (e.g. from a run config)."""
    started = time.perf_counter()
    settings.check()
    teacher_dir = Path(settings.teacher_path)
    if teacher_dir.is_dir():  # refused before anything is written
        require_safetensors(teacher_dir, LoadOptions(allow_pickle=allow_pickle))
    data_file, output_dir = Path(data_file), Path(output_dir)
    records = read_records(data_file)
    check_unique_ids(records, data_file)
    plan = shard_plan(select_records(records, settings.selection), settings.shard_size)
    if not plan:
        raise AugmentError(
            f"{data_file}: no record selected (selection '{settings.selection}' needs a "
            "non-empty input); use selection 'all'"
        )
    prepare_shards_dir(output_dir, _manifest(settings, data_file, len(records), plan))
    generated = _generate_missing(
        settings, plan, output_dir, device, (trust_remote_code, allow_pickle), show_progress
    )
    rows = [
        row
        for index, shard in enumerate(plan)
        for row in read_shard(shard_path(output_dir, index), [r.id for r in shard])
    ]
    merged, counts = merge_records(
        records,
        {row["id"]: row["generation"] for row in rows},
        filter_contradicting=filter_contradicting,
    )
    write_records(output_dir / OUTPUT_FILENAME, merged)
    stats = AugmentStats(
        total=len(records),
        selected=len(rows),
        generated=generated,
        skipped_resumed=len(rows) - generated,
        with_rationale=counts["kept"],
        filtered=counts["filtered"],
        empty=counts["empty"],
        truncated=sum(bool(row["truncated"]) for row in rows),
        num_shards=len(plan),
        wall_time_s=round(time.perf_counter() - started, 3),
    )
    write_text_atomic(output_dir / STATS_FILENAME, json.dumps(asdict(stats), indent=2) + "\n")
    return AugmentResult(output_dir / OUTPUT_FILENAME, output_dir / STATS_FILENAME, stats)


def _generate_missing(
    settings: AugmentSettings,
    plan: list[list[Record]],
    output_dir: Path,
    device: str | None,
    trust: tuple[bool, bool],
    show_progress: bool,
) -> int:
    """Generate and write every shard without a file (single process: rank 0 of 1); the
    number of records generated. The teacher loads only when a shard is missing, with
    ``trust`` = (trust_remote_code, allow_pickle)."""
    missing = [i for i in assigned_shards(len(plan)) if not shard_path(output_dir, i).exists()]
    if not missing:
        return 0
    model, tokenizer = _load_teacher(settings, device, *trust)
    total = sum(len(shard) for shard in plan)
    done = total - sum(len(plan[i]) for i in missing)
    bar = tqdm(total=total, initial=done, desc="augment", unit="example", disable=not show_progress)
    with bar:
        for index in missing:
            rows = generate_shard(model, tokenizer, plan[index], settings, index, bar)
            write_jsonl_atomic(shard_path(output_dir, index), rows)
    return total - done
