"""Fetching checkpoint folders from the HuggingFace Hub, failing fast when offline.

huggingface_hub retries for about 24 s before it gives up on an unreachable
network. `ensure_online` answers in a few seconds instead, so a user gets a
clear message rather than a hang. ``HF_HUB_OFFLINE=1`` uses the local cache only.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # owner/name, optionally @revision


def looks_like_repo_id(source: str) -> bool:
    """True for ``owner/name`` or ``owner/name@revision`` strings that are not an existing local path."""
    return bool(REPO_ID.match(source)) and not Path(source).exists()


def split_revision(source: str) -> tuple[str, str | None]:
    """``owner/name@revision`` -> (``owner/name``, ``revision``); without ``@`` the revision is None.

    A revision is a branch, tag, commit or ref, e.g. ``refs/pr/3``, the Hub's usual
    address of a pull request that converts a pickle checkpoint to safetensors.
    """
    repo_id, _, revision = source.partition("@")
    return repo_id, revision or None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def ensure_online(timeout: float = 3.0) -> None:
    """Raise quickly if the Hub cannot be reached.

    Args:
        timeout: seconds for the DNS look-up and the TCP connection together.

    Raises:
        ConnectionError: with a message that says what to do instead.
    """
    url = urlparse(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)

    def connect() -> None:
        socket.create_connection((host, port), timeout=timeout).close()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=timeout)
    except (OSError, concurrent.futures.TimeoutError) as e:
        raise ConnectionError(
            f"The HuggingFace Hub ({host}) cannot be reached: {e or 'timed out'}. "
            "Use a local checkpoint folder instead, or set HF_HUB_OFFLINE=1 to use files already in the Hub cache."
        ) from None
    finally:
        pool.shutdown(wait=False)


def pull(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Download (or reuse from the cache) a Hub repository and return its local folder.

    Args:
        repo_id: ``owner/name``.
        revision: branch, tag or commit; None is the default branch.
        cache_dir: the Hub cache; None is huggingface_hub's default.
        allow_patterns: fetch only the files matching these glob patterns; None fetches all.

    Returns:
        The local snapshot folder.

    Raises:
        ConnectionError: when offline and the files are not cached.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = {"revision": revision, "cache_dir": cache_dir, "allow_patterns": allow_patterns}
    if offline_mode():
        try:
            return Path(snapshot_download(repo_id, local_files_only=True, **where))
        except LocalEntryNotFoundError:
            raise ConnectionError(
                f"HF_HUB_OFFLINE is set and {repo_id} is not in the Hub cache; unset it or use a local folder."
            ) from None
    ensure_online()
    return Path(snapshot_download(repo_id, **where))
