"""The models the page offers: the shipped checkpoints, plus HuggingFace CLIPs named on the command line.

Each model loads on first use (with a progress message) and stays cached; a model
that cannot load (offline, missing repo, pickle-only weights) gives a clear message
and the page keeps serving the others.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from collections.abc import Callable, Iterable

from vlm_demo import api

log = logging.getLogger("app")

MODELS_ENV = "VLM_DEMO_MODELS"  # comma-separated extra model sources
SPACE_MODEL = "wkcn/TinyCLIP-ViT-8M-16-Text-3M-YFCC15M"  # preloaded on the Space (README front matter)


def sources(cli: Iterable[str] = (), env: str | None = None) -> list[str]:
    """Extra model sources: `cli` (``--models``, repeatable) then ``$VLM_DEMO_MODELS``, duplicates dropped."""
    env = os.environ.get(MODELS_ENV, "") if env is None else env
    found = [s.strip() for s in [*cli, *env.split(",")] if s.strip()]
    return list(dict.fromkeys(found))


def preloaded(repo: str = SPACE_MODEL) -> bool:
    """Whether `repo` sits in the Hub cache (a Space's ``preload_from_hub``); no network call."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


class Models:
    """Loaded sessions by source, the first one (the shipped checkpoints) loaded up front.

    Args:
        first: the session of `first_source`, already loaded.
        first_source: what ``--checkpoints`` named.
        extra: the other sources, loaded on first use.
        device: torch device for the others.
        loader: how a source becomes a session (`api.load`; tests pass their own).
    """

    def __init__(
        self, first: api.Session, first_source: str, extra: Iterable[str] = (), device: str = "cpu",
        loader: Callable[[str, str], api.Session] = api.load,
    ):  # fmt: skip
        self.shipped = self.default = first_source
        self._sessions: dict[str, api.Session] = {first_source: first}
        self._order = list(dict.fromkeys([first_source, *extra]))
        self._device, self._loader = device, loader
        self._lock = threading.Lock()

    def choices(self) -> list[tuple[str, str]]:
        """(label, source) for the selector: the shipped model first."""
        def label(source: str) -> str:
            return f"shipped model ({Path(source).name}/, offline)" if source == self.shipped else source

        return [(label(s), s) for s in self._order]

    def loaded(self, source: str) -> bool:
        return source in self._sessions

    def get(self, source: str | None) -> api.Session:
        """The session of `source` (None: the default), loading it on first use.

        Raises:
            ValueError: for a source the page does not offer, or one that cannot load
                (the loader's own message: offline, missing, pickle-only, ...).
        """
        source = source or self.default
        if source not in self._order:
            raise ValueError(f"The page offers no model {source!r}; pick one from the list.")
        with self._lock:  # one load at a time; a second request for the same model waits for the first
            if source not in self._sessions:
                log.info("Loading model %s", source)
                try:
                    self._sessions[source] = self._loader(source, self._device)
                except ConnectionError as e:
                    raise ValueError(str(e)) from None
                log.info("Loaded model %s", source)
        return self._sessions[source]
