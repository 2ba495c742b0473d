"""Security review of the app: each guarantee checked against a real `python app.py` over plain HTTP.

- `/gradio_api/file=` serves the app's output images and nothing else;
- text from a request (caption, method, style, keep ratio, file name) never comes back as live markup;
- uploads are capped at 10 MB, inline images too;
- no request can make the app read a file of its choosing on the server;
- the installed and the pinned gradio are past the 2026 advisories.

Events are run the way the page runs them (queue/join, then the event stream;
benchmarks/app_server.py), so the private UI events are covered as well as `/analyze`.
"""

from __future__ import annotations

import http.client
import re
import urllib.parse
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from benchmarks.app_server import EXAMPLES, ROOT, call, running_app, upload
from conftest import make_checkpoints

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

SCENE = EXAMPLES / "scene_7000.png"
CAPTION = "a large yellow star in the center"
XSS = "<img src=x onerror=alert(1)><script>alert(2)</script>"
LIVE_TAG = re.compile(r"<\s*/?\s*[a-z!]", re.IGNORECASE)  # the start of an HTML tag or comment
MAX_UPLOAD = 10 * 1024 * 1024  # app.MAX_UPLOAD_BYTES
FIXED_IN = Version("6.16")  # GHSA-j36p-7w88-g82j (path traversal, < 6.16.0); CVE-2026-28414 (< 6.7)
REFUSED = "must be a file uploaded to this app"  # app.uploaded_only


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return make_checkpoints(tmp_path_factory.mktemp("security") / "ckpt", "default")


@pytest.fixture(scope="module")
def server(checkpoints):
    with running_app(checkpoints, checkpoints.parent / "server.log", "--no-warmup", "--no-prefill") as srv:
        yield srv


@pytest.fixture(scope="module")
def image(server) -> dict:
    """The scene, uploaded the way the page uploads it."""
    return upload(server.url, SCENE)


@pytest.fixture(scope="module")
def places(server, checkpoints, image) -> dict[str, str]:
    """Folders and files of this server: what the probes aim at."""
    msg = call(server.url, "analyze", [image, CAPTION, "learned", 0.5])
    assert msg["success"], msg
    overlay = msg["output"]["data"][0]
    return {
        "root": str(ROOT),
        "ckpt": str(checkpoints),  # the folder this server loaded
        "out": str(Path(overlay["path"]).parent),  # the app's output folder
        "upload": str(Path(image["path"]).parents[1]),  # Gradio's upload folder
        "overlay_url": overlay["url"],
        "url": server.url,
    }


def get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte: no client tidies up ``../`` or percent-escapes on the way."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def strings(value) -> list[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


# ----------------------------------------------------------------------------- file serving


PROBES = [
    "/etc/passwd",
    "/proc/self/environ",
    "../../../../../etc/passwd",
    "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "%2Fetc%2Fpasswd",
    "//etc/passwd",
    "....//....//....//....//etc/passwd",
    "{out}/../../../../etc/passwd",
    "{out}/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "{upload}/../../../../etc/passwd",
    "{upload}/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "{out}/../../../..{root}/app.py",
    "app.py",
    "README.md",
    "checkpoints/baseline/model.safetensors",
    "{root}/app.py",
    "{root}/README.md",
    "{root}/checkpoints/baseline/model.safetensors",
    "{root}/checkpoints/metrics.json",
    "{root}/docs/examples/scene_7000.png",
    "{root}/.git/config",
    "{ckpt}/baseline/model.safetensors",
    "{ckpt}/caption_bank.json",
]


@pytest.mark.parametrize("route", ["/gradio_api/file=", "/file="])
@pytest.mark.parametrize("probe", PROBES)
def test_file_route_refuses_everything_but_outputs(server, places, route, probe):
    status, body = get(server.url, route + probe.format(**places))
    assert status in (403, 404), (status, body[:200])
    assert b"root:" not in body and b"def main" not in body and not body.startswith(b"\x89PNG")


def test_file_route_serves_the_outputs(server, places):
    overlay = urllib.parse.urlsplit(places["overlay_url"]).path
    assert overlay.startswith("/gradio_api/file=" + places["out"])
    status, body = get(server.url, overlay)
    assert status == 200 and body.startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- rendered text


def test_user_text_never_comes_back_as_markup(server):
    """A caption and a file name full of markup, through the page's events that render Markdown and tables."""
    named = upload(server.url, SCENE, name=f"{XSS}.png")
    caption = f"{XSS} {CAPTION} {XSS}"
    for event, data in [
        ("analyze_ui", [named, caption, "learned", 0.5, "dim", 2, False, None, None, None]),
        ("analyze_live", [named, caption, "tome", 0.3, "outline", 2, False, None, None]),
        ("sweep_ui", [named, caption, "random", 0.52, "outline", None, None, None]),
        ("compare", [named, caption, 0.5, "grey", None, None]),
        ("analyze", [named, caption, "text_guided", 0.5]),
    ]:
        msg = call(server.url, event, data)
        assert msg["success"], (event, msg)
        texts = [s for s in strings(msg["output"]["data"]) if not s.startswith("data:image/")]  # the plot is a PNG
        assert texts, event
        assert not [s for s in texts if "onerror" in s or "alert(" in s], event
        if event != "sweep_ui":  # the sweep's own frames are markup the app writes; none of the user's text is in it
            assert not [s for s in texts if LIVE_TAG.search(s)], event


@pytest.mark.parametrize(
    "event, data",
    [
        ("analyze", ["{image}", CAPTION, XSS, 0.5]),
        ("analyze", ["{image}", CAPTION, "learned", XSS]),
        ("analyze", ["{missing}", CAPTION, "learned", 0.5]),
        ("analyze_ui", ["{image}", CAPTION, "learned", 0.5, XSS, 2, False, None, None, None]),
        ("compare", ["{image}", CAPTION, XSS, "dim", None, None]),
    ],
    ids=["method", "keep-ratio", "file-name", "style", "compare-keep-ratio"],
)
def test_refusals_escape_what_they_echo(server, image, event, data):
    # A file name with markup that is not on disk: the refusal names the path.
    missing = {**image, "path": str(Path(image["path"]).parent / f"gone{XSS}.png")}
    data = [{"{image}": image, "{missing}": missing}.get(d, d) if isinstance(d, str) else d for d in data]
    msg = call(server.url, event, data)
    error = msg["output"]["error"] or ""
    assert not msg["success"] and "&lt;img" in error, error  # the markup was echoed, escaped
    assert not LIVE_TAG.search(error), error


def test_method_note_does_not_echo_a_bad_method(server):
    # Gradio's own check of a Radio value echoes it unescaped in its error; the app skips that check here.
    msg = call(server.url, "method_note", [XSS])
    assert msg["success"] and msg["output"]["data"] == [""], msg


# ----------------------------------------------------------------------------- upload size


def test_uploads_are_capped(server, tmp_path):
    assert httpx.get(f"{server.url}/config", timeout=30).json()["max_file_size"] == MAX_UPLOAD
    sizes = {"at-cap.png": MAX_UPLOAD, "over-cap.png": MAX_UPLOAD + 1}
    for name, size in sizes.items():
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    answers = {}
    for name in sizes:
        with open(tmp_path / name, "rb") as f:
            answers[name] = httpx.post(f"{server.url}/gradio_api/upload", files={"files": (name, f)}, timeout=60)
    assert answers["at-cap.png"].status_code == 200
    assert answers["over-cap.png"].status_code == 413, answers["over-cap.png"].text

    client = Client(server.url, verbose=False)
    with pytest.raises(ValueError, match="exceeds the maximum file size") as info:
        client.predict(handle_file(str(tmp_path / "over-cap.png")), CAPTION, "learned", 0.5, api_name="/analyze")
    assert not isinstance(info.value, AppError)  # refused by the client, before any upload


def test_inline_images_are_capped_too(server):
    inline = {"path": None, "url": "data:image/png;base64," + "A" * (MAX_UPLOAD * 4 // 3 + 8)}
    msg = call(server.url, "analyze", [inline, CAPTION, "learned", 0.5])
    assert not msg["success"] and "larger than 10 MB" in msg["output"]["error"], msg["output"]


# ----------------------------------------------------------------------------- server paths


SERVER_PATHS = [
    "/etc/passwd",
    "{root}/app.py",
    "{root}/docs/examples/scene_7000.png",  # a real image: read, it would be analysed and answered
    "{ckpt}/baseline/model.safetensors",
    "{upload}/../../../../etc/passwd",
    "{upload}/../../../..{root}/docs/examples/scene_7000.png",
    "{url}/gradio_api/file={out}/x.png",  # a URL: Gradio fetches public ones, but never this server's own
]


@pytest.mark.parametrize("form", ["string", "bare-dict", "filedata"])
@pytest.mark.parametrize("path", SERVER_PATHS)
def test_a_request_cannot_choose_a_server_file(server, places, form, path):
    path = path.format(**places)
    payload = {
        "string": path,
        "bare-dict": {"path": path},
        "filedata": {"path": path, "meta": {"_type": "gradio.FileData"}},
    }[form]
    log_before = len(server.output())
    msg = call(server.url, "analyze", [payload, CAPTION, "learned", 0.5])
    assert not msg["success"], msg  # no answer: nothing was analysed
    error = msg["output"]["error"]
    if error is None:  # Gradio refused it before the app saw it (a string, or FileData outside its upload folder)
        refusal = server.output()[log_before:]
        reasons = ("InvalidPathError", "validation error for ImageData", "failed validation")  # the last: SSRF guard
        assert any(r in refusal for r in reasons), refusal[-1000:]
    else:  # the app's own checks
        assert REFUSED in error or "must be an uploaded file" in error, error


PAGE_EVENTS = {  # the page's events and their inputs, the image first
    "analyze_ui": [CAPTION, "learned", 0.5, "dim", 2, False, None, None, None],
    "analyze_live": [CAPTION, "learned", 0.5, "dim", 2, False, None, None],
    "sweep_ui": [CAPTION, "learned", 0.52, "dim", None, None, None],
    "compare": [CAPTION, 0.5, "dim", None, None],
}


@pytest.mark.parametrize("event", PAGE_EVENTS)
def test_the_page_events_cannot_choose_a_server_file_either(server, event):
    bare = {"path": str(SCENE)}
    data = [bare, *PAGE_EVENTS[event]]
    msg = call(server.url, event, data)
    assert not msg["success"] and REFUSED in msg["output"]["error"], msg


def test_uploads_and_examples_are_still_read(server, image):
    example = call(server.url, "load_example", [0])["output"]["data"][0]["value"]  # a click on the first example
    for payload in (image, example):
        msg = call(server.url, "analyze", [payload, CAPTION, "learned", 0.5])
        assert msg["success"] and msg["output"]["data"][1]["baseline"]["tokens"] == 196, msg


# ----------------------------------------------------------------------------- dependencies


def test_gradio_is_past_the_2026_advisories():
    assert Version(version("gradio")) >= FIXED_IN
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    pin = next(r for r in (Requirement(ln) for ln in lines if ln and not ln.startswith("-")) if r.name == "gradio")
    assert version("gradio") in pin.specifier
    assert not pin.specifier.contains("6.15.2") and pin.specifier.contains(str(FIXED_IN))
    # A Space installs the README's sdk_version, not requirements.txt.
    sdk = re.search(r"^sdk_version:\s*(\S+)", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert sdk and Version(sdk.group(1)) >= FIXED_IN
