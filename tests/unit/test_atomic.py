"""Atomic writes: all or nothing, and readable by teammates (not the temporary file's 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from cot2align_ds.atomic import atomic_write, write_jsonl_atomic, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_the_ordinary_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        write_jsonl_atomic(tmp_path / "deep" / "b.jsonl", [{"x": 1}])
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "deep" / "b.jsonl") == 0o644
    assert (tmp_path / "deep" / "b.jsonl").read_text() == '{"x": 1}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_text_atomic(path, "old\n")

    def broken(handle):
        handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_exchange_paths_swaps_two_directories_in_one_step(tmp_path):
    from cot2align_ds.atomic import exchange_paths

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").write_text("a")
    (tmp_path / "b" / "from_b").write_text("b")
    if not exchange_paths(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this filesystem has no atomic exchange (the fallback is tested elsewhere)")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["from_b"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from_a"]
    with pytest.raises(FileNotFoundError):
        exchange_paths(tmp_path / "a", tmp_path / "missing")
