"""Atomic file writes: a temporary file in the target's folder, flushed, then renamed over it.

Readers (other ranks, a resumed run, a teammate's ``report``) see the old file or the new one,
never a partial one, and a failed write leaves the old file untouched. New files get the
ordinary mode (0666 minus the umask, like ``open``): the temporary file's private 0600 must not
leak into results that teammates on a shared cluster read.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(
    path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = False
) -> None:
    """Call ``write(handle)`` on a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mode = "wb" if binary else "w"
        encoding = None if binary else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _default_mode())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data), binary=True)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    """Rows as JSON Lines (UTF-8, one object per line)."""

    def write(handle: IO[str]) -> None:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write)


# renameat2(2) flag and the "relative to the working directory" descriptor, from <linux/fs.h>.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(first: str | Path, second: str | Path) -> bool:
    """Swap two existing paths (directories included) in one atomic step; False where the
    platform or the filesystem cannot (then nothing changed).

    Linux's ``renameat2(..., RENAME_EXCHANGE)``: a reader sees one of the two states, never a
    moment where either name is missing. Local filesystems (ext4, xfs, btrfs, tmpfs) support
    it; some network filesystems do not, and the caller falls back to two renames.
    """
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc older than 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    first_b, second_b = os.fsencode(first), os.fsencode(second)
    if renameat2(_AT_FDCWD, first_b, _AT_FDCWD, second_b, _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))
