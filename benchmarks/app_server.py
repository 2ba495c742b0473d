"""Start `python app.py` in a subprocess on a free port, for the app and browser tests; speak its protocol."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

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


def wait_for_output(server: Server, text: str, timeout: float) -> float:
    """Seconds until `text` shows in the server's log (e.g. the end of its warm-up).

    Raises:
        RuntimeError: the process exited, or `text` did not show within `timeout` seconds.
    """
    t0 = time.perf_counter()
    while text not in server.output():
        if server.proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {server.proc.returncode}:\n{server.output()[-3000:]}")
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{text!r} not in the app's log after {timeout:.0f} s:\n{server.output()[-3000:]}")
        time.sleep(0.5)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the page's own protocol, over plain HTTP


def upload(url: str, path: Path, name: str | None = None) -> dict:
    """POST a file to Gradio's upload route, as the page does; returns the FileData payload for an event."""
    with open(path, "rb") as f:
        r = httpx.post(f"{url}/gradio_api/upload", files={"files": (name or path.name, f)}, timeout=60)
    r.raise_for_status()
    return {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}


def fn_index(url: str, api_name: str) -> int:
    """The index the page uses for an event, private ones included (from /config)."""
    deps = httpx.get(f"{url}/config", timeout=30).json()["dependencies"]
    return next(d["id"] for d in deps if d.get("api_name") == api_name)


def join(url: str, fn: int, data: list, session: str) -> httpx.Response:
    """POST /queue/join as the page does: 200 with an event id, or an HTTP error (503 when the queue is full)."""
    body = {"data": data, "fn_index": fn, "session_hash": session, "event_data": None, "trigger_id": None}
    return httpx.post(f"{url}/gradio_api/queue/join", json=body, timeout=60)


def completed(url: str, session: str, timeout: float = 120) -> dict:
    """Read a session's event stream until its event completes; returns that message (output, success)."""
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=timeout) as s:
        for line in s.iter_lines():
            if line.startswith("data:") and (msg := json.loads(line[5:])).get("msg") == "process_completed":
                return msg
    raise RuntimeError(f"no process_completed message for session {session}")


def call(url: str, api_name: str, data: list) -> dict:
    """Run any event, private ones included, the way the page runs it; returns the process_completed message."""
    session = uuid.uuid4().hex
    join(url, fn_index(url, api_name), data, session).raise_for_status()
    return completed(url, session)
