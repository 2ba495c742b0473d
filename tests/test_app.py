"""The Gradio app end to end: a real `python app.py` server driven through `gradio_client`.

One server (default preset, random weights, 196 patches) serves the whole module.
It starts with the Hub pointed at a closed port and ``HF_HUB_OFFLINE`` unset, so
its start-up also proves that a local checkpoint folder needs no network.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.app_server import EXAMPLES, ROOT, call, running_app, upload
from benchmarks.cases import BAD, CAPTION
from conftest import make_checkpoints, make_clip
from vlm_demo.api import SWEEP_STOPS

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

P = 196  # patches of the default preset: 14 x 14
SCENE = EXAMPLES / "scene_7005.png"


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory, tokenizer_file) -> dict[str, Path]:
    """A tiny random HuggingFace CLIP, and a folder whose weights exist only as a pickle."""
    folder = tmp_path_factory.mktemp("clips")
    vision = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=3)  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    make_clip(folder / "clip", tokenizer_file, vision, text, 24, legacy=False)
    pickled = folder / "pickle-only"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "clip" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    return {"clip": folder / "clip", "pickle": pickled}


@pytest.fixture(scope="module")
def server(tmp_path_factory, clip_folders):
    folder = tmp_path_factory.mktemp("app")
    ckpt = make_checkpoints(folder / "ckpt", "default")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "",  # the Hub is unreachable; offline mode off
           "VLM_DEMO_MODELS": str(clip_folders["pickle"])}  # fmt: skip
    extra = ["--models", str(clip_folders["clip"])]
    with running_app(ckpt, folder / "server.log", "--no-warmup", "--no-prefill", *extra, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every upload the tests send, written once with Pillow."""
    d = tmp_path_factory.mktemp("uploads")

    def save(name: str, image: Image.Image, **kw) -> Path:
        image.save(d / name, **kw)
        return d / name

    out = {
        "wide": save("wide.png", Image.new("RGB", (160, 96), (30, 160, 60))),
        "rgba": save("rgba.png", Image.new("RGBA", (40, 30), (0, 0, 255, 100))),
        "16bit": save("16bit.png", Image.fromarray(np.linspace(0, 65535, 48 * 40).astype(np.uint16).reshape(40, 48))),
        "cmyk": save("cmyk.jpg", Image.new("CMYK", (32, 24), (0, 255, 255, 0)), quality=95),
        "tiny": save("tiny.png", Image.new("RGB", (1, 3), (200, 10, 10))),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: a 60x40 file is a 40x60 picture
    out["exif"] = save("exif.jpg", Image.new("RGB", (60, 40), (220, 20, 20)), quality=95, exif=exif)

    (d / "not_image.png").write_bytes(b"this is plain text, not a picture\n" * 10)
    (d / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # A decompression bomb that costs nothing to build: a 1x1 PNG whose header claims 50000x50000.
    bomb = bytearray(_png(Image.new("1", (1, 1))))
    bomb[16:24] = struct.pack(">II", 50_000, 50_000)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    (d / "bomb.png").write_bytes(bytes(bomb))
    out.update({k: d / f"{k}.png" for k in ("not_image", "empty", "truncated", "bomb")})
    assert Image.open(out["16bit"]).mode.startswith("I;16") and Image.open(out["cmyk"]).mode == "CMYK"
    return out


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def analyze(client: Client, image: Path, caption: str = CAPTION, method: str = "learned", keep_ratio: float = 0.5):
    return client.predict(handle_file(str(image)), caption, method, keep_ratio, api_name="/analyze")


# ----------------------------------------------------------------------------- models


def test_the_model_selector_offers_a_clip_and_survives_a_bad_one(server, clip_folders):
    shipped = str(server.proc.args[server.proc.args.index("--checkpoints") + 1])
    choice, methods, captions, plot, note, placement = call(
        server.url, "select_model", [str(clip_folders["clip"]), "learned"])["output"]["data"]  # fmt: skip
    assert choice["value"] == str(clip_folders["clip"])
    assert [v for _, v in methods["choices"]] == ["cls_attention", "tome", "random"]  # no predictors, of either kind
    assert methods["value"] == "cls_attention" and not captions["visible"] and not plot["visible"]
    assert "centre-cropped" in note
    assert "blocks 0–1" in placement["info"]  # the CLIP's depth (2), where the tiny shipped model has 4
    image = upload(server.url, SCENE)
    msg = call(server.url, "compare", [image, CAPTION, 0.5, "dim", str(clip_folders["clip"]), "paper"])
    assert msg["success"] and len(msg["output"]["data"][0]) == 3  # every method the CLIP can run, matched GMACs
    assert all("×)" in item["caption"] for item in msg["output"]["data"][0])
    # A pickle-only folder is refused unopened: a warning, and the page stays on the shipped model.
    msg = call(server.url, "select_model", [str(clip_folders["pickle"]), "tome"])
    assert msg["success"] and msg["output"]["data"][0]["value"] == shipped
    assert "learned" in [v for _, v in msg["output"]["data"][1]["choices"]]
    assert server.proc.poll() is None


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("method", ["learned", "tome"])
def test_sweep_equals_analyze_at_its_stops(client, method):
    sweep = client.predict(handle_file(str(SCENE)), CAPTION, method, api_name="/sweep")
    assert [s["keep_ratio"] for s in sweep["stops"]] == list(SWEEP_STOPS)
    by_ratio = {s["keep_ratio"]: s for s in sweep["stops"]}
    for ratio in (0.2, 0.52, 1.0):
        _, d = analyze(client, SCENE, method=method, keep_ratio=ratio)
        stop = by_ratio[ratio]
        assert (stop["tokens"], stop["gmacs"], stop["score"]) == (d["pruned"]["tokens"], d["pruned"]["gmacs"],
                                                                  d["pruned"]["score"]), ratio  # fmt: skip
        assert stop["tokens_per_stage"] == d["pruned"]["tokens_per_stage"]
    assert sweep["baseline"]["score"] == d["baseline"]["score"] and "overlay" not in json.dumps(sweep)


def test_two_public_endpoints_with_the_contract_inputs(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert sorted(info["named_endpoints"]) == ["/analyze", "/sweep"]
    assert [p["parameter_name"] for p in info["named_endpoints"]["/sweep"]["parameters"]] == [
        "image", "caption", "method"
    ]
    assert not info["unnamed_endpoints"]
    params = info["named_endpoints"]["/analyze"]["parameters"]
    assert [p["parameter_name"] for p in params] == ["image", "caption", "method", "keep_ratio"]
    assert [p["component"] for p in params] == ["Image", "Textbox", "Radio", "Slider"]
    returns = info["named_endpoints"]["/analyze"]["returns"]
    assert [r["component"] for r in returns] == ["Image", "Json"]


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_analyze_shape_tokens_and_gmacs(client, files, ratio):
    overlay, d = analyze(client, files["wide"], method="learned", keep_ratio=ratio)
    assert {"method", "keep_ratio", "baseline", "pruned"} <= set(d)
    assert d["method"] == "learned" and d["keep_ratio"] == ratio
    assert {"score", "tokens", "gmacs", "latency_ms"} <= set(d["baseline"])
    assert {"score", "tokens", "tokens_per_stage", "gmacs", "latency_ms"} <= set(d["pruned"])
    for side in ("baseline", "pruned"):
        assert -1.0 <= d[side]["score"] <= 1.0 and d[side]["latency_ms"] > 0
    assert d["baseline"]["tokens"] == P
    assert d["pruned"]["tokens"] == round(P * ratio) + 1  # the kept patches and learned's fused token
    stages = d["pruned"]["tokens_per_stage"]
    assert stages[0] == P and stages[-1] == round(P * ratio) + 1 and stages == sorted(stages, reverse=True)
    assert d["pruned"]["gmacs"] < d["baseline"]["gmacs"]
    with Image.open(overlay) as im:  # a real image file, of the input's size
        im.load()
        assert im.format == "PNG" and im.size == (160, 96)


def test_api_accepts_none_the_baseline(client):
    _, d = analyze(client, SCENE, method="none", keep_ratio=0.5)
    assert d["pruned"]["tokens_per_stage"] == [P]  # the baseline has no stages
    assert d["pruned"]["score"] == d["baseline"]["score"]
    assert d["pruned"]["gmacs"] == d["baseline"]["gmacs"]


@pytest.mark.parametrize("method", ["cls_attention", "tome", "random"])
def test_training_free_methods_at_keep_ratio_one_are_the_baseline(client, method):
    overlay, d = analyze(client, SCENE, method=method, keep_ratio=1.0)
    assert d["pruned"]["score"] == d["baseline"]["score"]
    assert d["pruned"]["tokens"] == P and d["pruned"]["gmacs"] == d["baseline"]["gmacs"]
    assert Image.open(overlay).size == (336, 336)


def test_text_guided_follows_the_caption(client):
    _, a = analyze(client, SCENE, "a green cross at the bottom right", "text_guided", 0.3)
    _, b = analyze(client, SCENE, "a green diamond at the bottom left", "text_guided", 0.3)
    assert a["pruned"]["tokens"] == b["pruned"]["tokens"] == round(P * 0.3) + 1  # and the background token
    assert a["baseline"]["score"] != b["baseline"]["score"]  # the caption reached the model


# ----------------------------------------------------------------------------- bad inputs (benchmarks.cases.BAD)


@pytest.mark.parametrize("key, caption, method, ratio, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_a_message(client, files, key, caption, method, ratio, words):
    image = files[key] if key else SCENE
    with pytest.raises(AppError) as info:
        analyze(client, image, caption, method, ratio)
    message = str(info.value)
    assert words in message.lower(), message
    assert "Traceback" not in message and "upstream Gradio app has raised an exception" not in message
    assert any(w in message.lower() for w in ("image", "caption", "method", "keep ratio", "file")), message


def test_server_survives_bad_inputs(client, files, server):
    for key in ("bomb", "not_image", "truncated"):
        with pytest.raises(AppError):
            analyze(client, files[key])
    _, d = analyze(client, SCENE)
    assert d["pruned"]["tokens"] == round(P * 0.5) + 1  # learned's fused token
    assert server.proc.poll() is None
    assert "Traceback" not in server.output()  # bad input is expected: nothing is logged as a crash


# ----------------------------------------------------------------------------- odd but valid inputs


@pytest.mark.parametrize(
    "key, size",
    [("rgba", (40, 30)), ("16bit", (48, 40)), ("cmyk", (32, 24)), ("tiny", (1, 3)), ("exif", (40, 60))],
)
def test_odd_images_work(client, files, key, size):
    overlay, d = analyze(client, files[key], keep_ratio=0.3)
    assert d["pruned"]["tokens"] == round(P * 0.3) + 1  # learned's fused token
    assert Image.open(overlay).size == size  # EXIF orientation applied: 60x40 on disk, 40x60 shown


def test_overlay_of_a_16bit_image_is_not_washed_out(client, files):
    overlay, _ = analyze(client, files["16bit"], method="random", keep_ratio=1.0)  # nothing dimmed
    pixels = np.asarray(Image.open(overlay).convert("L"), dtype=np.float32)
    assert pixels.min() < 60 and pixels.max() > 190  # the 0..65535 ramp kept its range


@pytest.mark.parametrize(
    "caption", ["a yellow star ⭐ in the middle 🙂", "<script>alert('x')</script> a green <b>cross</b>"]
)
def test_odd_captions_work(client, caption):
    _, d = analyze(client, SCENE, caption, "text_guided", 0.5)
    assert d["pruned"]["tokens"] == round(P * 0.5) + 1  # and the background token
    assert "<script" not in json.dumps(d)  # the readout echoes nothing executable


# ----------------------------------------------------------------------------- serving


def test_concurrent_requests_for_the_same_image(server):
    errors: list[BaseException] = []
    sizes: list[tuple[int, int]] = []

    def worker() -> None:
        c = Client(server.url, verbose=False)
        for _ in range(3):
            try:
                overlay, d = analyze(c, SCENE, keep_ratio=0.5)
                sizes.append(Image.open(overlay).size)
                assert d["pruned"]["tokens"] == round(P * 0.5) + 1  # learned's fused token
            except BaseException as e:  # noqa: BLE001 - collected, asserted below
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert sizes == [(336, 336)] * 12
    assert "LocalProtocolError" not in server.output()


def test_starts_offline_and_fast(server):
    # The fixture pointed HF_ENDPOINT at a closed port: a Hub call would hang or fail, not answer quickly.
    assert server.start_s < 60, f"app.py took {server.start_s:.0f} s to answer"
    assert "huggingface.co" not in server.output()


def test_missing_checkpoints_exit_with_a_clear_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--checkpoints", str(tmp_path / "nonexistent")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: No checkpoints at") and "python -m training.train" in last
