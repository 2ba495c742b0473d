"""Atomic file writes: the old file or the new one, never half of one, and no temporary left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_demo.atomic import atomic_path, write_text_atomic


def test_write_text_atomic_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("old")
    assert write_text_atomic(path, "new\nline") == path
    assert path.read_bytes() == b"new\nline"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "tradeoff.png"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".png"
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tradeoff.png"]


def test_a_leftover_temporary_is_reused(tmp_path: Path) -> None:
    # What a SIGKILL between the write and the rename leaves; the next write consumes it.
    path = tmp_path / "report.md"
    with pytest.raises(KeyError), atomic_path(path) as tmp:
        raise KeyError
    tmp.write_text("stale")
    write_text_atomic(path, "fresh")
    assert path.read_text() == "fresh" and not tmp.exists()
