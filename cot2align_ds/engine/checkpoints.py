"""Read DeepSpeed ZeRO checkpoints (as written by ``engine.save_checkpoint``) back into weights.

A checkpoint directory holds one folder per tag with the model-state and optimizer-state
shards of every rank, and a ``latest`` file naming a tag (unless saved with
``save_latest=False``). The full fp32 weights live, partitioned,
in the optimizer shards; DeepSpeed's ``zero_to_fp32`` utilities stitch them together.

DeepSpeed unpickles those shards with ``weights_only=False``. Before handing a directory to it,
every shard is opened here with ``torch.load(weights_only=True)``, allowing only the few plain
data classes DeepSpeed writes into them, so a tampered checkpoint fails with a clear error
instead of running code.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

from cot2align_ds.errors import UserError

LATEST_FILENAME = "latest"
MODEL_STATES_GLOB = "*_model_states.pt"


class CheckpointError(UserError):
    """A DeepSpeed checkpoint directory is incomplete or unreadable."""


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob(MODEL_STATES_GLOB))


def _step_number(path: Path) -> int:
    digits = re.findall(r"\d+", path.name)
    return int(digits[-1]) if digits else -1


def _tag_dirs(path: Path) -> list[Path]:
    """Tag folders in a checkpoint directory, oldest first by the step number in their name.

    Where some tags carry a ``<tag>.complete`` marker (written after every rank finished, see
    ``train/checkpointing.py``), only those count: an unmarked one may be half written.
    """
    tags = [child for child in path.iterdir() if _is_tag_dir(child)] if path.is_dir() else []
    complete = [tag for tag in tags if tag.with_name(f"{tag.name}.complete").is_file()]
    return sorted(complete or tags, key=_step_number)


def is_zero_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint directory (``latest`` file or tag folders with model-state shards)
    or for one tag folder."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / LATEST_FILENAME).is_file() or _is_tag_dir(path):
        return True
    return bool(_tag_dirs(path))


def resolve_zero_checkpoint(path: str | Path) -> tuple[Path, str]:
    """``(checkpoint_dir, tag)`` for a checkpoint directory or for one tag folder inside it.

    A checkpoint directory resolves to the tag its ``latest`` file names, else to the newest
    tag folder (highest step number in its name).
    """
    path = Path(path)
    latest = path / LATEST_FILENAME
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if not tag or not _is_tag_dir(path / tag):
            raise CheckpointError(
                f"{latest} names tag '{tag}' but {path / tag} holds no {MODEL_STATES_GLOB}; "
                "the save was interrupted: pass one complete tag folder instead"
            )
        return path, tag
    if _is_tag_dir(path):
        return path.parent, path.name
    tags = _tag_dirs(path)
    if not tags:
        raise CheckpointError(
            f"{path} is not a DeepSpeed checkpoint (no '{LATEST_FILENAME}' file and no "
            f"folder with {MODEL_STATES_GLOB}); pass the directory given to save_checkpoint"
        )
    return path, tags[-1].name


def _safe_deepspeed_globals() -> list[type]:
    # Imported here, not at the top: detecting a checkpoint must not pay for importing deepspeed.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Plain data records DeepSpeed pickles into its shards (seen in ZeRO-2/3, fp32 and bf16).
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def check_shards_are_plain_data(tag_dir: Path) -> None:
    """Refuse shards that hold anything but tensors, plain containers and DeepSpeed's records."""
    allowed = _safe_deepspeed_globals()
    for shard in sorted(tag_dir.glob("*_states.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:  # any failure means: do not unpickle this file
            reason = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()
            raise CheckpointError(
                f"{shard}: not a plain-data DeepSpeed shard ({reason[0][:160] if reason else error}); "
                "refusing to unpickle it. If you trust it, convert it with the zero_to_fp32.py "
                "saved next to it"
            ) from None


def consolidated_state_dict_from_zero_checkpoint(
    checkpoint_dir: str | Path,
) -> dict[str, torch.Tensor]:
    """Full fp32 weights (names as in the engine's module) of a ZeRO-1/2/3 checkpoint.

    ``checkpoint_dir`` is the directory given to ``save_checkpoint`` (see
    ``resolve_zero_checkpoint`` for the tag it picks) or one tag folder inside it. Runs on the
    CPU in one process, whatever the world size that saved it.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = resolve_zero_checkpoint(checkpoint_dir)
    check_shards_are_plain_data(root / tag)
    try:
        # DeepSpeed prints progress lines to stdout; the caller reports what matters.
        with contextlib.redirect_stdout(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except (FileNotFoundError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{root / tag}: cannot consolidate the ZeRO checkpoint ({first}); the fp32 weights "
            "are in the *_optim_states.pt shards of every rank: copy them all"
        ) from None
    return {name: tensor.contiguous() for name, tensor in state.items()}
