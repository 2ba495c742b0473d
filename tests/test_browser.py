"""The page in a real browser (Debian's chromium, driven by Playwright).

Upload an image, type a caption, wait for the overlay and the cost table, then
move the keep-ratio slider and check that both update live. A screenshot goes
to the test's tmp folder, and to docs/screenshot.png with UPDATE_SCREENSHOT=1 (which
also runs the app on the shipped checkpoints).

Under CI=true this test must run: a missing browser is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks.app_server import EXAMPLES, ROOT, running_app
from conftest import make_checkpoints
from gradio_client import Client, handle_file

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() == "true"
UPDATE_SCREENSHOT = os.environ.get("UPDATE_SCREENSHOT") == "1"  # also copy the screenshot to docs/
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip
TIMEOUT_MS = 90_000
VISIBLE = """() => { const f = [...document.querySelectorAll('#kept-overlay .frame')]
  .find(e => e.style.display !== 'none'); return f ? f.dataset.r : null; }"""
KEY = "() => document.querySelector('#kept-overlay .scrub')?.dataset.key || null"
# The pruned cosine in the visible frame's figures (last row, third cell).
COSINE = """() => { const f = [...document.querySelectorAll('#kept-overlay .frame')]
  .find(e => e.style.display !== 'none'); const rows = f.querySelectorAll('table tr');
  return rows[rows.length - 1].children[2].innerText; }"""
# A new input's sweep is on screen, complete (no progress line), its visible frame fully loaded.
SWEPT = """old => { const s = document.querySelector('#kept-overlay .scrub');
  if (!s || s.dataset.key === old || s.querySelector('.scrub-status')) return false;
  const f = [...s.querySelectorAll('.frame')].find(e => e.style.display !== 'none');
  const i = f && f.querySelector('img.kept'); return !!i && i.complete && i.naturalWidth > 0; }"""


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    missing = _browser_missing()
    if missing:
        if IN_CI:
            pytest.fail(f"CI=true but {missing}")
        pytest.skip(missing)
    folder = tmp_path_factory.mktemp("browser")
    # The README's screenshot shows the shipped checkpoints; the test itself needs only the architecture.
    ckpt = ROOT / "checkpoints" if UPDATE_SCREENSHOT else make_checkpoints(folder / "ckpt", "default")
    with running_app(ckpt, folder / "server.log", "--no-warmup") as srv:
        yield srv


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def _settled(page, tokens: str) -> None:
    """Wait until the cost table shows `tokens` and is no longer marked stale (latency measured)."""
    page.wait_for_function(
        "t => { const c = document.querySelector('#costs');"
        " return !!c && c.innerText.includes(t) && !c.classList.contains('stale'); }", arg=tokens
    )


def test_upload_caption_and_live_scrubbing(server, tmp_path):
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
                (server.url, "data:", "blob:")) else None)  # fmt: skip
            page.goto(server.url)
            page.wait_for_function(SWEPT, arg=None)  # the page opens with the first example swept
            page.wait_for_function("(document.querySelector('#costs')?.innerText || '').includes('→')")
            assert page.evaluate(VISIBLE) == "0.52"

            # Upload another image and type a caption: a new sweep replaces the frames, the table follows.
            key0 = page.evaluate(KEY)
            page.locator("input[type=file]").first.set_input_files(str(EXAMPLES / "scene_7005.png"))
            page.wait_for_function(SWEPT, arg=key0)
            key_image = page.evaluate(KEY)
            page.locator("#caption textarea").fill("a green cross and a large green diamond")
            page.wait_for_function(SWEPT, arg=key_image)
            frames = page.locator("#kept-overlay .frame").count()
            assert frames == 25  # every slider stop, 0.04 apart
            _settled(page, "196 → 142 → 103")  # keep 0.52: 141 and 102 patches, plus learned's fused token
            costs1 = _text(page, "#costs")
            assert "GMACs" in costs1 and "0.53×" in costs1 and "interleaved pairs" in costs1

            # Drag the slider across its range: the overlay changes while the mouse is still down.
            page.locator("#keep-ratio input[type=range]").scroll_into_view_if_needed()
            box = page.locator("#keep-ratio input[type=range]").bounding_box()
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + 2, y)
            page.mouse.down()
            seen = []
            for i in range(31):
                page.mouse.move(box["x"] + 2 + (box["width"] - 4) * i / 30, y)
                seen.append(page.evaluate(VISIBLE))
            assert len(set(seen)) >= 10, seen  # frames swapped during the drag, not only after it
            page.mouse.up()
            assert page.evaluate(VISIBLE) == "1.00"
            _settled(page, "196 → 196 → 196")

            # The keyboard: five steps of 0.04 down from 1.0 reach 0.8.
            slider = page.locator("#keep-ratio input[type=range]")
            slider.focus()
            for _ in range(5):
                slider.press("ArrowLeft")
            page.wait_for_function(f"() => ({VISIBLE})() === '0.80'")
            _settled(page, "196 → 176 → 158")  # round(196 * 0.8 ** 0.5) = 175 and 157, plus the fused token
            # A caption edit in the middle of a sweep: the page ends on the new caption's results, never a mix.
            key1 = page.evaluate(KEY)
            page.locator("#caption textarea").fill("a large red circle")
            page.wait_for_timeout(150)  # the first caption's sweep is under way
            page.locator("#caption textarea").fill("a small blue square")
            page.wait_for_function(SWEPT, arg=key1)
            _settled(page, "196 → 176 → 158")
            page.wait_for_timeout(1500)  # anything still queued would land now
            client = Client(server.url, verbose=False)
            want = client.predict(handle_file(str(EXAMPLES / "scene_7005.png")), "a small blue square", "learned",
                                  api_name="/sweep")  # fmt: skip
            score = next(s["score"] for s in want["stops"] if s["keep_ratio"] == 0.8)
            shown = page.evaluate(COSINE)
            assert shown == f"{score:.3f}", (shown, score)
            _, settled = client.predict(handle_file(str(EXAMPLES / "scene_7005.png")), "a small blue square",
                                        "learned", 0.8, api_name="/analyze")  # fmt: skip
            rank = f"#{settled['pruned']['bank_rank']} ({settled['pruned']['bank_probability']:.2f})"
            assert rank in _text(page, "#costs")  # the settled analysis is the new caption's too
            assert "Something went wrong" not in page.content()

            shot = tmp_path / "screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if UPDATE_SCREENSHOT:
                shutil.copyfile(shot, ROOT / "docs" / "screenshot.png")
        finally:
            browser.close()
    assert not outside, f"the page fetched resources from outside the server: {outside}"
