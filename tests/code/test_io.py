"""Atomic writes: the old output survives a failure, and no temporary file is left behind."""

from __future__ import annotations

import pytest

from uservalue.io import atomic_dir, atomic_path


def test_atomic_path_replaces_on_success(tmp_path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers still see the old file meanwhile
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_keeps_old_file_on_failure(tmp_path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_dir_swaps_whole_directory(tmp_path) -> None:
    target = tmp_path / "features"
    target.mkdir()
    (target / "stale.parquet").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "train.parquet").write_text("t")
    assert sorted(p.name for p in target.iterdir()) == ["train.parquet"]
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "eval.parquet").write_text("e")
        raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["train.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]
