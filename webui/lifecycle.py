"""The app process: start-up logging, signals and a clean exit.

Standard library only (no gradio, no torch), so that `app.py` can install the
signal handlers before its slow imports: a signal at any moment then exits 0.

**Why the exit is `os._exit`.** A thread that is inside torch when the
interpreter finalises (the GMACs warm-up in an fvcore trace, or a Gradio worker
in a forward pass) makes the process abort at exit: C++ static destructors run
under it, and libstdc++ prints "terminate called without an active exception"
(exit -6). So the app never finalises with such threads: on SIGINT or SIGTERM
it stops the warm-up, closes the server, runs its own clean-ups (the output
folder), flushes, and leaves with ``os._exit(0)``, which runs no destructors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType

log = logging.getLogger("app")

HUB_NOISE = ("Loading weights from local directory",)  # huggingface_hub's mixin prints it once per checkpoint
QUIET_LOGGERS = ("httpx", "httpcore")  # one INFO line per HTTP request, Gradio's own start-up probes included


class Shutdown:
    """SIGINT and SIGTERM handling for a server process; `install` makes the one instance.

    Before `serve` the process is starting (imports, loading, prefill) and has
    nothing to wind down: a signal runs the clean-ups registered so far and
    exits at once. While serving, a signal only sets a flag (a handler must not
    take locks), `serve` returns, and the caller stops the warm-up and the
    server (clean-ups registered with `on_exit`) before `exit`. A second signal
    during that exits at once.
    """

    _instance: Shutdown | None = None

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal that asked to stop
        self._serving = False
        self._cleanups: list[Callable[[], object]] = []

    @classmethod
    def install(cls) -> Shutdown:
        """Handle SIGINT and SIGTERM from now on (idempotent); returns the process's `Shutdown`."""
        if cls._instance is None:
            cls._instance = cls()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, cls._instance._on_signal)
        return cls._instance

    def on_exit(self, fn: Callable[[], object]) -> None:
        """Run `fn` before the process exits; the last registered runs first."""
        self._cleanups.append(fn)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._serving and self.signum is None:
            self.signum = signum
            return
        self.signum = self.signum or signum
        self.exit(0)

    def serve(self, poll_s: float = 0.1) -> int:
        """Block until SIGINT or SIGTERM; returns the signal number."""
        self._serving = True
        while self.signum is None:
            time.sleep(poll_s)
        _say(f"{signal.Signals(self.signum).name}: shutting down.")
        return self.signum

    def exit(self, code: int = 0) -> None:
        """Run the clean-ups (last first, each on its own), flush, and end the process with `code`."""
        if not self._serving:
            _say(f"{signal.Signals(self.signum).name if self.signum else 'Exit'} during start-up: exiting.")
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - the process is leaving; the other clean-ups still run
                _say(f"clean-up {getattr(fn, '__qualname__', fn)!s} failed: {e}")
        if self._serving:
            _say("Stopped.")
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):  # closed, or interrupted mid-write by the signal
                stream.flush()
        os._exit(code)


def _say(message: str) -> None:
    """A log line written with one system call: a signal handler may have interrupted a write to stderr."""
    now = time.time()
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))},{int(now % 1 * 1000):03d} INFO app: {message}\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode(errors="replace"))


def configure_logging(level: int = logging.INFO) -> None:
    """One line per event, with a timestamp; per-request HTTP chatter left out."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def without_prints(noise: tuple[str, ...] = HUB_NOISE) -> Iterator[None]:
    """Drop the lines in `noise` that code inside prints to stdout; pass every other line on.

    huggingface_hub's `from_pretrained` prints "Loading weights from local
    directory" with `print`, not logging, so no log level silences it.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True) if line.strip() not in noise]
        sys.stdout.write("".join(kept))


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc malloc's arenas, as ``MALLOC_ARENA_MAX`` would; returns whether it did.

    Gradio runs handlers on a pool of up to 40 threads, and glibc gives threads
    their own arenas (up to 8 per core), which keep what they once held: under
    load the server's RSS crept up by about 50 MB a minute. With 2 arenas it
    stays flat, at the same throughput (tests/soak_app.py). A no-op off glibc,
    or when ``MALLOC_ARENA_MAX`` is already set.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-8, arenas) == 1  # -8: M_ARENA_MAX in <malloc.h>
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False


def bind_error(host: str | None, port: int | None) -> str | None:
    """Why a server could not listen on `host`:`port`, or None if it can.

    Checked before loading anything, because Gradio reports every bind failure
    (a busy port, a host that is not this machine's, one that does not resolve)
    as "Cannot find empty port". `port` None means any: Gradio then tries from
    7860 on, so only the host is checked.
    """
    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        return f"cannot resolve --host {host!r}: {getattr(e, 'strerror', None) or e}"
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gradio's own check and uvicorn do
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use; choose another with --port"
            where = f"{host}:{port}" if port else host
            return f"cannot listen on {where}: {e.strerror or e} (--host must be an address of this machine)"
    return None


def close_server(demo: object) -> None:
    """Close a launched ``gr.Blocks`` (its queue and server, at most ~5 s) and any share tunnel."""
    demo.close(verbose=False)  # type: ignore[attr-defined]
    from gradio.tunneling import CURRENT_TUNNELS  # loaded by then; a share link runs a helper process

    for tunnel in list(CURRENT_TUNNELS):
        with contextlib.suppress(Exception):
            tunnel.kill()
