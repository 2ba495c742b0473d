"""Start `python app.py` in a subprocess on a free port, for the app and browser tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
START_TIMEOUT_S = 90.0


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    start_s: float  # seconds from spawning the process to the first answer

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/gradio_api/info", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def running_app(
    checkpoints: Path, log: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = START_TIMEOUT_S
) -> Iterator[Server]:
    """Yield a `Server` once it answers; always stop the process (by its PID) afterwards."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "app.py"), "--checkpoints", str(checkpoints), "--host", "127.0.0.1",
           "--port", str(port), *extra]  # fmt: skip
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    try:
        while not _answers(url):
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            if time.perf_counter() - t0 > timeout:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"app.py did not answer within {timeout:.0f} s:\n{tail}")
            time.sleep(0.5)
        yield Server(url, proc, log, time.perf_counter() - t0)
    finally:
        _stop(proc)
