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

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() == "true"
UPDATE_SCREENSHOT = os.environ.get("UPDATE_SCREENSHOT") == "1"  # also copy the screenshot to docs/
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip
TIMEOUT_MS = 90_000
# The overlay shows a new file, fully loaded (Gradio keeps a heartbeat open, so "networkidle" never comes).
CHANGED = (
    "old => { const i = document.querySelector('#overlay img');"
    " return !!i && !!i.src && i.src !== old && i.complete && i.naturalWidth > 0; }"
)


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


def _src(page) -> str | None:
    return page.locator("#overlay img").first.get_attribute("src")


def test_upload_caption_and_live_slider(server, tmp_path):
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
            page.wait_for_selector("#overlay img")  # the page opens with the first example analysed
            page.wait_for_function("(document.querySelector('#costs')?.innerText || '').includes('→')")
            src0 = _src(page)

            # Upload another image and type a caption: the overlay and the table follow.
            page.locator("input[type=file]").first.set_input_files(str(EXAMPLES / "scene_7005.png"))
            page.locator("#caption textarea").fill("a green cross and a large green diamond")
            page.wait_for_function(CHANGED, arg=src0)
            page.wait_for_function("document.querySelector('#costs').innerText.includes('196 → 140 → 99')")
            src1, costs1 = _src(page), _text(page, "#costs")
            assert "GMACs" in costs1 and "0.51×" in costs1  # 99 / 196 tokens (98 patches + the fused one)

            # Move the slider from 0.5 to 0.3 with the keyboard: four steps of 0.05.
            slider = page.locator("#keep-ratio input[type=range]")
            slider.focus()
            for _ in range(4):
                slider.press("ArrowLeft")
            page.wait_for_function("document.querySelector('#costs').innerText.includes('196 → 108 → 60')")
            page.wait_for_function(CHANGED, arg=src1)
            src2, costs2 = _src(page), _text(page, "#costs")
            assert src2 != src1 and costs2 != costs1
            assert "0.31×" in costs2  # 60 / 196 tokens
            assert "Something went wrong" not in page.content()

            shot = tmp_path / "screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if UPDATE_SCREENSHOT:
                shutil.copyfile(shot, ROOT / "docs" / "screenshot.png")
        finally:
            browser.close()
    assert not outside, f"the page fetched resources from outside the server: {outside}"
