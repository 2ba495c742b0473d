"""`python app.py` as a process: its command line, and a clean exit on SIGINT or SIGTERM at any moment.

Before the fix, a signal during the background GMACs warm-up (a daemon thread
inside an fvcore trace) ended in "terminate called without an active
exception" and SIGABRT (exit -6), and SIGTERM printed a KeyboardInterrupt
traceback. Each case here starts the real app on the default preset, signals
it at one moment, and holds it to exit status 0 with nothing alarming in its
output.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from benchmarks.app_server import ROOT, Server, fn_index, free_port, join, running_app, wait_for_output
from conftest import make_checkpoints

ALARMS = ("Traceback", "Aborted", "terminate called", "KeyboardInterrupt", "Exception ignored")
WARMING, WARM = "Warming the GMACs cache", "GMACs cache warm"
STOP_S = 30  # the most a stop may take (the server's own close waits up to 5 s)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return make_checkpoints(tmp_path_factory.mktemp("ckpt") / "ckpt", "default")


@pytest.fixture
def tmpdir_env(tmp_path) -> dict[str, str]:
    """The app's temporary folders go under the test's, so that the test sees the output folder go."""
    (tmp_path / "tmp").mkdir()
    return {"TMPDIR": str(tmp_path / "tmp")}


def _stopped_cleanly(proc: subprocess.Popen, log: Path, tmp: Path) -> str:
    """Wait for the process to end; assert status 0, no alarm in its output, no output folder left."""
    try:
        rc = proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"app.py still running {STOP_S} s after the signal:\n{log.read_text()[-3000:]}")
    out = log.read_text(errors="replace")
    assert rc == 0, f"exit status {rc}:\n{out[-3000:]}"
    assert not [a for a in ALARMS if a in out], out[-3000:]
    assert not list(tmp.glob("vlm-demo-outputs-*")), "the output folder was left behind"
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_start_up(checkpoints, tmp_path, tmpdir_env, signum):
    """Mid-import (gradio takes seconds to import): the handler is installed before, and exits at once."""
    log = tmp_path / "app.log"
    cmd = [sys.executable, str(ROOT / "app.py"), "--checkpoints", str(checkpoints), "--port", str(free_port())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **tmpdir_env})
    time.sleep(1.5)
    assert proc.poll() is None
    proc.send_signal(signum)
    out = _stopped_cleanly(proc, log, tmp_path / "tmp")
    assert f"{signal.Signals(signum).name} during start-up: exiting." in out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_the_warm_up(checkpoints, tmp_path, tmpdir_env, signum):
    with running_app(checkpoints, tmp_path / "app.log", "--no-prefill", env=tmpdir_env) as server:
        wait_for_output(server, WARMING, 30)
        time.sleep(1.0)
        assert WARM not in server.output(), "the warm-up ended before the signal: it no longer tests the warm-up"
        server.proc.send_signal(signum)
        out = _stopped_cleanly(server.proc, server.log, tmp_path / "tmp")
    assert f"{signal.Signals(signum).name}: shutting down." in out
    assert "GMACs warm-up stopped after" in out and out.rstrip().endswith("Stopped.")


def test_sigterm_once_ready(checkpoints, tmp_path, tmpdir_env):
    with running_app(checkpoints, tmp_path / "app.log", env=tmpdir_env) as server:
        wait_for_output(server, WARM, 180)
        server.proc.send_signal(signal.SIGTERM)
        out = _stopped_cleanly(server.proc, server.log, tmp_path / "tmp")
    assert "SIGTERM: shutting down." in out


def test_sigterm_during_a_request(checkpoints, tmp_path, tmpdir_env):
    """A Gradio worker inside a forward pass at exit aborted the process just like the warm-up."""
    with running_app(checkpoints, tmp_path / "app.log", "--no-warmup", env=tmpdir_env) as server:
        _start_a_long_request(server)
        server.proc.send_signal(signal.SIGTERM)
        _stopped_cleanly(server.proc, server.log, tmp_path / "tmp")


def _start_a_long_request(server: Server) -> None:
    """Queue a batch-32 analysis (seconds of torch work) and wait until it runs."""
    from benchmarks.app_server import completed, upload

    image = upload(server.url, ROOT / "docs" / "examples" / "scene_7005.png")
    data = [image, "a green cross", "learned", 0.5, "dim", 50, True, None, None, None]
    session = uuid.uuid4().hex
    join(server.url, fn_index(server.url, "analyze_ui"), data, session).raise_for_status()
    threading.Thread(target=lambda: _ignore(completed, server.url, session), daemon=True).start()
    time.sleep(1.5)  # queued, then running: a batch-32 timing at 50 repeats takes far longer than this


def _ignore(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the server goes away mid-stream, as intended
        pass


# ----------------------------------------------------------------------------- the command line


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "app.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})


MISTAKES = [
    (["--port", "abc"], None, "invalid port 'abc'"),
    (["--port", "70000"], None, "1 to 65535"),
    (["--queue-size", "0"], None, "at least 1"),
    (["--device", "tpu"], None, "invalid choice"),
    (["--warmup"], None, "unrecognized arguments"),
    ([], {"GRADIO_SERVER_PORT": "abc"}, "$GRADIO_SERVER_PORT"),
    (["--host", "no-such-host.invalid"], None, "cannot resolve"),
]


@pytest.mark.parametrize("args, env, words", MISTAKES, ids=[" ".join(m[0]) or "env" for m in MISTAKES])
def test_a_mistake_is_one_error_line_and_status_2(args, env, words):
    proc = _run(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and words in proc.stderr


def test_a_busy_port_is_one_error_line(checkpoints):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = _run("--checkpoints", str(checkpoints), "--port", str(s.getsockname()[1]))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: port ") and "in use" in proc.stderr


def test_every_option_says_its_default():
    proc = _run("--help")
    assert proc.returncode == 0
    for option in ("--checkpoints", "--host", "--port", "--share", "--device", "--no-warmup", "--no-prefill",
                   "--queue-size"):  # fmt: skip
        assert option in proc.stdout
    helps = proc.stdout.split("options:")[1].split("\n  -")[2:]  # one chunk per option, --help's left out
    assert len(helps) == 9 and all("(default: " in " ".join(h.split()) for h in helps), proc.stdout


def test_start_up_log_is_one_line_per_checkpoint(checkpoints, tmp_path):
    with running_app(checkpoints, tmp_path / "app.log", "--no-warmup", "--no-prefill") as server:
        wait_for_output(server, "Serving on", timeout=30)  # logged just after the server starts answering
        out = server.output()
    assert "Loading weights from local directory" not in out  # huggingface_hub's print, once per checkpoint
    assert out.count("Loaded baseline/") == 1 and out.count("Loaded pruned/") == 1
    assert "Serving on http://127.0.0.1:" in out and "HTTP Request" not in out  # no per-request httpx lines
