"""Atomic file writes: a reader, or a writer killed part-way (even by SIGKILL), sees the old file or the new one.

Write to a hidden sibling, then rename it over the target (`os.replace` is atomic
within one file system). The temporary name is fixed per target, so a rerun after a
kill overwrites, then consumes, what the killed writer left.

Folders (checkpoints, resume state) are replaced whole by `vlm_demo.model.atomic_folder`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `path` only if the block succeeds.

    Example::

        with atomic_path(out / "tradeoff.png") as tmp:
            fig.savefig(tmp)

    Args:
        path: the file to (re)place; its folder must exist.

    Yields:
        The hidden sibling ``.NAME.tmp.EXT``, which keeps `path`'s extension.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")  # the extension kept: savefig reads the format from it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` (``\\n`` line ends on every platform) to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
    return Path(path)
