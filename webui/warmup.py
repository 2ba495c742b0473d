"""Start-up work that keeps one-off costs out of the first requests, and stops when asked."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from vlm_demo import api, pruning
from vlm_demo.pruning import BASELINE

log = logging.getLogger("app")

PAUSE_S = 0.02  # between steps, so that a waiting request gets the model lock
DONE = "GMACs cache warm"  # the log line at the end (benchmarks wait for it)


def gmacs_steps(first: str, ratios: tuple[float, ...] = api.SWEEP_STOPS) -> list[tuple[str, float]]:
    """(method, keep ratio) in warm-up order: `first`, the baseline (ratio 1 only), then the registry's order."""
    order = [first, BASELINE] + [m for m in pruning.names(prunes_only=True) if m != first]
    return [(m, r) for m in dict.fromkeys(order) for r in (ratios if pruning.get(m).prunes else [1.0])]


class GmacsWarmup:
    """Fill the fvcore GMACs cache for every slider stop in a background thread, one step at a time.

    Each step holds the request lock, so a request waits for at most one trace
    and its timings never overlap the warm-up. A lock is not fair: released and
    re-acquired at once, it starved the first request for the whole warm-up
    (10 s), so each step ends with a short pause in which a waiting request takes
    the lock. `stop` ends it between two steps (about 0.2 s each).

    Args:
        session: the loaded checkpoints.
        lock: the lock every model call holds.
        first: the method warmed first (the page's default).
    """

    def __init__(self, session: api.Session, lock: threading.Lock, first: str):
        self.session, self.lock = session, lock
        self.steps = gmacs_steps(first)
        self.done = 0  # steps finished
        self._stop = threading.Event()
        # A daemon, so that nothing waits for it; `stop` and the app's os._exit end it (see webui.lifecycle).
        self._thread = threading.Thread(target=self._run, name="warm-gmacs", daemon=True)

    def start(self) -> GmacsWarmup:
        log.info("Warming the GMACs cache in the background: %d (method, keep ratio) steps", len(self.steps))
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.perf_counter()
        for method, ratio in self.steps:
            if self._stop.is_set():
                log.info("GMACs warm-up stopped after %d of %d steps", self.done, len(self.steps))
                return
            with self.lock:
                self.session.warm_gmacs([ratio], (method,))
            self.done += 1
            self._stop.wait(PAUSE_S)
        log.info("%s: %d steps in %.0f s", DONE, self.done, time.perf_counter() - t0)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the step under way; returns whether the thread ended within `timeout` seconds."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()


def prefill(app: Any, example: list[str], method: str, keep_ratio: float) -> dict[str, Any]:
    """The views of the first example, so that the page opens populated; {} if that fails.

    The process's first forward passes pay one-off costs: a throwaway run keeps
    them out of the timings shown.

    Args:
        app: the `webui.handlers.Explorer`.
        example: [image path, caption].
        method: the page's default method.
        keep_ratio: the page's default keep ratio.
    """
    image, caption = Path(example[0]), example[1]
    try:
        app.analysis(image, caption, method, keep_ratio, repeats=1)
        views = app.views(app.analysis(image, caption, method, keep_ratio))
        *_, frames = app.frames(image, caption, method, keep_ratio)
        return {**views, "frames": frames}
    except Exception:  # a page that opens empty is still a working page
        log.exception("could not prefill the first example")
        return {}
