"""The app under load, in the suite: a short soak (benchmarks.soak_app) and a flooded queue.

One server (default preset, random weights) runs with a queue of `CONCURRENCY`
places (``--queue-size``): the soak's clients can never overflow it, and the
flood must.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.app_server import EXAMPLES, completed, fn_index, join, running_app, upload
from conftest import make_checkpoints

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.utils import QueueError  # noqa: E402
from benchmarks.soak_app import report, soak  # noqa: E402

CONCURRENCY = 8  # the soak's clients, and the queue's places
SOAK_S = 15.0
SCENE = EXAMPLES / "scene_7005.png"
CAPTION = "a little green cross in the bottom right corner"
P = 196  # patches of the default preset


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("soak")
    ckpt = make_checkpoints(folder / "ckpt", "default")
    flags = ["--no-warmup", "--no-prefill", "--queue-size", str(CONCURRENCY)]
    with running_app(ckpt, folder / "server.log", *flags) as srv:
        yield srv


def test_short_soak_has_no_unexpected_errors(server):
    result = soak(server, SOAK_S, CONCURRENCY, warmup_s=0)
    text = report(result, f"# tests/test_soak.py: {SOAK_S:g} s at concurrency {CONCURRENCY} (RSS not judged here)")
    assert not result.unexpected, text
    t = result.tally
    assert t.valid >= CONCURRENCY and t.invalid >= 1 and t.rejected == t.invalid, text
    assert t.burst_requests >= CONCURRENCY, text  # at least one burst of identical requests, every one answered
    assert server.proc.poll() is None


def test_a_full_queue_answers_busy_and_the_server_stays_up(server):
    """A slow job holds the model; requests pile up behind it until the queue is full, then get "busy"."""
    client = Client(server.url, verbose=False)
    image = upload(server.url, SCENE)
    slow = uuid.uuid4().hex  # the page's Analyze button with 50 latency repeats and batch-32 timing
    join(server.url, fn_index(server.url, "analyze_ui"), [image, CAPTION, "learned", 0.5, "dim", 50, True, None, None, None],
         slow).raise_for_status()  # fmt: skip

    # Plain HTTP, as the page joins the queue: past its places, HTTP 503 and Gradio's "Queue is full".
    analyze = fn_index(server.url, "analyze")
    sessions = [uuid.uuid4().hex for _ in range(3 * CONCURRENCY)]
    with ThreadPoolExecutor(len(sessions)) as pool:
        answers = list(pool.map(lambda s: join(server.url, analyze, [image, CAPTION, "learned", 0.5], s), sessions))
    assert {a.status_code for a in answers} == {200, 503}, [a.status_code for a in answers]
    assert all("Queue is full" in a.json()["detail"] for a in answers if a.status_code == 503)
    accepted = [s for s, a in zip(sessions, answers, strict=True) if a.status_code == 200]
    assert len(accepted) <= CONCURRENCY + 2, len(accepted)  # what was refused was not kept: the queue is bounded

    # gradio_client, while the queue is still full: QueueError with its "busy" message.
    with pytest.raises(QueueError, match="Queue is full! Please try again"):
        client.predict(handle_file(str(SCENE)), CAPTION, "learned", 0.5, api_name="/analyze")

    # Every request the queue took is still answered, and the server serves the next one.
    assert completed(server.url, slow, timeout=300)["success"]
    for s in accepted:
        msg = completed(server.url, s, timeout=300)
        assert msg["success"] and msg["output"]["data"][1]["pruned"]["tokens_per_stage"][0] == P
    _, readout = client.predict(handle_file(str(SCENE)), CAPTION, "learned", 0.5, api_name="/analyze")
    assert readout["baseline"]["tokens"] == P
    assert server.proc.poll() is None
    assert "Traceback" not in server.output()
