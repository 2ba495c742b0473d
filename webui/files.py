"""The output file store: every image the app returns is its own uniquely named PNG."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image


class OutputFiles:
    """Output images written as uniquely named PNGs in an app-owned folder.

    Gradio would copy returned files into a cache folder named by their content
    hash, where concurrent requests producing the same picture race on one path
    ("Too little data for declared Content-Length"). Here every output gets its
    own name, and the folder is a Gradio static path, so files are served in
    place, never copied. Files older than `max_age_s` are swept (cheaply, at
    most every `sweep_every_s`); `remove` deletes the folder at exit.

    Args:
        folder: where the files go (default: a new temporary folder).
        max_age_s: age after which a file may be swept.
        sweep_every_s: the shortest time between two sweeps.
    """

    def __init__(self, folder: str | os.PathLike | None = None, max_age_s: float = 1800, sweep_every_s: float = 60):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="vlm-demo-outputs-")).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_age_s, self.sweep_every_s = max_age_s, sweep_every_s
        self._last_sweep = time.monotonic()
        self._lock = threading.Lock()

    def save(self, image: Image.Image, keep: bool = False) -> str:
        """Write a PIL image as PNG (fast compression) and return its path; `keep` exempts it from sweeps."""
        self.sweep()
        fd, path = tempfile.mkstemp(suffix=".png", prefix="keep-" if keep else "out-", dir=self.folder)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", compress_level=1)
        return path

    def sweep(self, force: bool = False) -> int:
        """Delete files older than `max_age_s`; returns how many went."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_sweep < self.sweep_every_s:
                return 0
            self._last_sweep = now
        cutoff, removed = time.time() - self.max_age_s, 0
        for p in self.folder.glob("out-*.png"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
            except OSError:  # another thread swept it first
                pass
        return removed

    def remove(self) -> None:
        """Delete the folder and everything in it."""
        shutil.rmtree(self.folder, ignore_errors=True)
