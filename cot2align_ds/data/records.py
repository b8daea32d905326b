"""Training/evaluation records and their JSONL I/O.

A record is one example: an instruction, an optional input (context), the gold answer, and an
optional rationale (gold, or written by the teacher during CoT augmentation). Records are
read and written as JSON Lines; every write is atomic (temporary file, then rename) so an
interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from cot2align_ds.atomic import write_jsonl_atomic
from cot2align_ds.errors import UserError


class RecordError(UserError):
    """A data file is malformed; the message names the file, line and field."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class Record(BaseModel):
    """One example. Three input shapes are read into it: Alpaca-style (``instruction``,
    optional ``input``, ``output``), ``prompt`` / ``completion``, and chat ``messages`` whose
    last message is the assistant's answer (the earlier ones stay in ``messages``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    instruction: str
    input: str = ""
    output: str
    rationale: str | None = None
    messages: tuple[ChatMessage, ...] | None = None  # the conversation before the answer


def read_records(path: str | Path) -> list[Record]:
    """Read a JSONL file of records; raise ``RecordError`` naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: data file not found; check the path in data.*_file")
    records = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            records.append(_parse_line(path, line_number, raw))
    records = [record for record in records if record is not None]
    if not records:
        raise RecordError(f"{path}: no records; the file is empty")
    return records


def read_hub_records(name: str, config: str | None, split: str) -> list[Record]:
    """Records of one split of a Hugging Face dataset (a hub name, or a local dataset folder or
    file that ``datasets.load_dataset`` reads), in any of the three record shapes."""
    import datasets

    where = f"{name}[{split}]"
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all end the run here
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecordError(
            f"data.hub_dataset: cannot load {where} ({message[:200]}); check the name, "
            "data.hub_config and the split, or use data.train_file"
        ) from None
    records = []
    for index, row in enumerate(rows, start=1):
        payload = _normalise_shape(f"{where} row {index}", dict(row))
        records.append(_validated(f"{where} row {index}", payload, f"{split}-{index}"))
    if not records:
        raise RecordError(f"data.hub_dataset: {where} has no rows")
    return records


def _parse_line(path: Path, line_number: int, raw: bytes) -> Record | None:
    where = f"{path}:{line_number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(f"{where}: not UTF-8 text ({error.reason}); re-encode the file") from None
    if not text.strip():
        return None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(
            f"{where}: malformed JSON ({error.msg}); fix or remove the line"
        ) from None
    if not isinstance(payload, dict):
        raise RecordError(f"{where}: expected a JSON object per line")
    payload = _normalise_shape(where, payload)
    return _validated(where, payload, f"{path.stem}-{line_number}")


def _validated(where: str, payload: dict, default_id: str) -> Record:
    """A ``Record`` from a payload in the Alpaca field names; one line naming ``where``."""
    if "output" not in payload:
        raise RecordError(f"{where}: field 'output' is missing; every record needs a gold answer")
    if payload.get("id") is None:
        payload = {**payload, "id": default_id}
    payload["id"] = str(payload["id"])
    try:
        record = Record.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "record"
        raise RecordError(f"{where}: field '{field}': {first['msg']}") from None
    if not record.output.strip():
        raise RecordError(f"{where}: field 'output' is empty; every record needs a gold answer")
    return record


def _normalise_shape(where: str, payload: dict) -> dict:
    """``prompt``/``completion`` and chat ``messages`` records in the Alpaca field names."""
    if "output" in payload:
        return payload
    if "completion" in payload or "prompt" in payload:
        if not isinstance(payload.get("prompt"), str):
            raise RecordError(f"{where}: field 'prompt': a string is needed beside 'completion'")
        return {**payload, "instruction": payload["prompt"], "output": payload.get("completion")}
    messages = payload.get("messages")
    if messages is None:
        return payload
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RecordError(f"{where}: field 'messages': a list of {{role, content}} objects")
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise RecordError(
            f"{where}: field 'messages': end with the assistant's answer, after a user turn"
        )
    users = [m for m in messages[:-1] if m.get("role") == "user"]
    if not users:
        raise RecordError(f"{where}: field 'messages': no user turn before the answer")
    return {
        **payload,
        "instruction": users[-1].get("content"),
        "output": messages[-1].get("content"),
        "messages": messages[:-1],
    }


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    write_jsonl_atomic(path, (record.model_dump(exclude_none=True) for record in records))


def train_records(config) -> list[Record]:
    """The training records: ``data.train_file``, or the train split of ``data.hub_dataset``."""
    data = config.data
    if data.hub_dataset is not None:
        return read_hub_records(data.hub_dataset, data.hub_config, data.train_split)
    return read_records(data.train_file)


def dev_records(config) -> list[Record] | None:
    """The dev records, if the run has any: ``data.dev_file`` or ``data.dev_split``."""
    data = config.data
    if data.hub_dataset is not None and data.dev_split is not None:
        return read_hub_records(data.hub_dataset, data.hub_config, data.dev_split)
    return read_records(data.dev_file) if data.dev_file is not None else None
