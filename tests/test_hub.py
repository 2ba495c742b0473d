"""Hub push and pull with the network unreachable: fast, clear failures; the offline cache path works."""

import shutil
import time

import pytest

from training import hub
from vlm_demo import api
from vlm_demo.hub import looks_like_repo_id, pull


@pytest.fixture()
def unreachable(monkeypatch):
    # A closed local port: every connection is refused, as on a machine without network.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_repo_ids_and_local_paths_are_told_apart(tmp_path):
    assert looks_like_repo_id("someone/vlm-demo")
    assert not looks_like_repo_id(str(tmp_path))
    assert not looks_like_repo_id("checkpoints")


def test_push_fails_fast_offline(unreachable, tiny_checkpoints):
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot be reached"):
        hub.push(tiny_checkpoints, "someone/vlm-demo")
    assert time.monotonic() - t0 < 10


def test_push_rejects_a_non_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="train first"):
        hub.push(tmp_path, "someone/vlm-demo")


def test_pull_and_load_fail_fast_offline(unreachable):
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="local checkpoint folder"):
        pull("someone/vlm-demo")
    with pytest.raises(ConnectionError):
        api.load("someone/vlm-demo")
    assert time.monotonic() - t0 < 10


def test_cli_reports_the_error(unreachable, capsys):
    assert hub.main(["pull", "someone/vlm-demo", "--out", "/tmp/never"]) == 2
    assert "cannot be reached" in capsys.readouterr().err


def test_offline_mode_reads_the_hub_cache(tmp_path, monkeypatch, tiny_checkpoints):
    # Lay out a Hub cache entry by hand, as huggingface_hub writes it, then load through it.
    cache = tmp_path / "hub"
    repo = cache / "models--someone--vlm-demo"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_checkpoints, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert pull("someone/vlm-demo", cache_dir=cache) == snapshot
    with pytest.raises(ConnectionError, match="not in the Hub cache"):
        pull("someone/missing", cache_dir=cache)
    session = api.load(pull("someone/vlm-demo", cache_dir=cache))
    assert session.embed_texts(["a red circle"]).shape == (1, 32)
