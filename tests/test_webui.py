"""The app's plumbing in `webui`, in-process: formatting, the file store, the upload guard, warm-up and start-up.

The app end to end (a real server) is tests/test_app.py; its exit on signals is tests/test_app_process.py.
"""

from __future__ import annotations

import ast
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from vlm_demo import api, pruning
from vlm_demo.latency import Timing
from webui import formatting as fmt
from webui import lifecycle, warmup
from webui.files import OutputFiles
from webui.inputs import image_source, load_examples, parse_gmacs_ratio, parse_keep_ratio, parse_placement, uploaded_only

ROOT = Path(__file__).resolve().parents[1]


def _analysis(method: str = "learned", bs32: bool = False, truncated: bool = False) -> api.Analysis:
    base = api.Side(0.31, 196, [196, 196, 196], 0.298, 7.0, 0.5, 10, [("a red circle", 0.3), ("a blue square", 0.2)])
    pruned = api.Side(0.29, 99, [196, 140, 99], 0.19, 5.0, 0.25, 10, [("a red circle", 0.28)])
    timing = {"baseline": Timing(170.0, 4.0, 3), "pruned": Timing(100.0, 2.0, 3)} if bs32 else None
    return api.Analysis(method, 0.5, "paper", "a red circle", base, pruned, trace=None, overlays={},  # type: ignore[arg-type]
                        latency_bs32=timing, caption_truncated=truncated)  # fmt: skip


# ----------------------------------------------------------------------------- formatting


def test_method_choices_and_notes_come_from_the_registry():
    assert [v for _, v in fmt.METHOD_CHOICES] == list(pruning.names(prunes_only=True))
    assert [lab for lab, _ in fmt.METHOD_CHOICES] == [pruning.get(m).label for m in pruning.names(prunes_only=True)]
    for m in pruning.names():
        info = pruning.get(m)
        note = fmt.method_note_text(m)
        assert note.startswith(info.summary) and (f"*{info.checkpoint}* checkpoint" in note) == info.needs_predictor
    for bad in ("magic", None, ["learned"], "<script>"):
        assert fmt.method_note_text(bad) == ""


def test_cost_table():
    rows = fmt.cost_rows(_analysis())
    assert [r[0].split(",")[0].split(" (")[0] for r in rows] == [
        "Tokens per stage", "GMACs", "Latency", "Latency", "Caption's rank among the bank's captions"
    ]
    assert rows[4][1:] == ["—", "—", "—"]  # no bank figures in this analysis
    assert "10 interleaved pairs" in rows[2][0]
    assert rows[0][1:] == ["196 → 196 → 196", "196 → 140 → 99", "0.51×"]
    assert rows[1][3] == "0.64×" and rows[2][1:] == ["7.0 ± 0.5", "5.0 ± 0.2", "0.71×"]
    assert rows[3][1:] == ["—", "—", "—"]  # batch 32 not timed
    assert fmt.cost_rows(_analysis(bs32=True))[3][1:] == ["170.0 ± 4.0", "100.0 ± 2.0", "0.59×"]
    assert fmt.fmt_ratio(1.0, 0.0) == "—"


def test_captions_and_status():
    assert fmt.caption_rows(_analysis()) == [
        [1, "a red circle  (0.300)", "a red circle  (0.280)"],
        [2, "a blue square  (0.200)", "—"],
    ]
    status = fmt.status_line(_analysis(), 32)
    assert status.startswith(f"**{pruning.get('learned').label}** at keep ratio 0.5: 196 → 140 → 99 tokens")
    assert "0.64× the baseline's GMACs" in status and "context" not in status
    assert "32-token context" in fmt.status_line(_analysis(truncated=True), 32)


# ----------------------------------------------------------------------------- the file store


def test_output_files_are_unique_and_swept(tmp_path):
    files = OutputFiles(tmp_path / "out", max_age_s=60, sweep_every_s=0)
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    a, b, kept = files.save(image), files.save(image), files.save(image, keep=True)
    assert len({a, b, kept}) == 3 and Image.open(a).format == "PNG"
    old = time.time() - 120
    for p in (a, kept):
        os.utime(p, (old, old))
    assert files.sweep(force=True) == 1
    assert not Path(a).exists() and Path(b).exists() and Path(kept).exists()
    files.remove()
    assert not (tmp_path / "out").exists()


def test_output_files_from_many_threads_never_share_a_name(tmp_path):
    files = OutputFiles(tmp_path / "out")
    image = Image.new("RGB", (4, 4))
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.extend(files.save(image) for _ in range(20))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 80


# ----------------------------------------------------------------------------- the upload guard


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "abc", None, True, float("nan"), float("inf")])
def test_keep_ratio_parsing_rejects(bad):
    with pytest.raises(ValueError, match="keep ratio"):
        parse_keep_ratio(bad, 196)


def test_keep_ratio_parsing_hits_the_slider_stops():
    assert parse_keep_ratio(0.15000000000000002, 196) == 0.15
    assert parse_keep_ratio("0.5", 196) == 0.5 and parse_keep_ratio(1, 196) == 1.0


def test_placement_and_gmacs_ratio_parsing():
    assert parse_placement(None) == "paper" and parse_placement("shared") == "shared"
    for bad in ("everywhere", 3, ["paper"], "<b>x</b>"):
        with pytest.raises(ValueError, match="placement must be one of paper, shared"):
            parse_placement(bad)
    assert parse_gmacs_ratio("0.5") == 0.5 and parse_gmacs_ratio(1) == 1.0
    for bad in (0, 1.5, float("nan"), True, None, "half"):
        with pytest.raises(ValueError, match="GMACs ratio"):
            parse_gmacs_ratio(bad)


def test_image_payloads():
    assert image_source({"path": "/tmp/x.png", "url": None}) == "/tmp/x.png"
    assert image_source({"path": None, "url": "data:image/png;base64,aGVsbG8="}) == b"hello"
    for bad in (None, "/etc/passwd", {"path": None, "url": "http://example.com/x.png"}):
        with pytest.raises(ValueError, match="image"):
            image_source(bad)


def test_only_uploads_may_be_read(tmp_path):
    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    inside = uploads / "abc" / "x.png"
    assert uploaded_only(str(inside), str(uploads)) == str(inside.resolve())
    assert uploaded_only(b"bytes", str(uploads)) == b"bytes"
    (tmp_path / "link").symlink_to("/etc")
    for outside in ("/etc/passwd", f"{uploads}/../secret.png", str(tmp_path / "link" / "passwd")):
        with pytest.raises(ValueError, match="uploaded to this app"):
            uploaded_only(outside, str(uploads))


def test_examples_index():
    examples = load_examples(ROOT / "docs" / "examples")
    assert examples and all(Path(p).is_file() and isinstance(c, str) and c for p, c in examples)
    assert load_examples(ROOT / "nowhere") == []


# ----------------------------------------------------------------------------- warm-up and start-up


def test_warmup_order_default_first_then_baseline_once():
    steps = warmup.gmacs_steps("tome", [0.5, 1.0])
    assert steps[:3] == [("tome", 0.5), ("tome", 1.0), (pruning.BASELINE, 1.0)]
    assert sorted({m for m, _ in steps}) == sorted(pruning.names())
    assert len(steps) == 2 * len(pruning.names(prunes_only=True)) + 1


def test_warmup_stops_between_steps():
    class Slow:  # a Session whose every GMACs step takes 50 ms
        calls = 0

        def warm_gmacs(self, ratios, methods):
            Slow.calls += 1
            time.sleep(0.05)

    w = warmup.GmacsWarmup(Slow(), threading.Lock(), "learned").start()  # type: ignore[arg-type]
    time.sleep(0.2)
    t0 = time.perf_counter()
    assert w.stop(timeout=5) and time.perf_counter() - t0 < 1.0
    assert 0 < w.done == Slow.calls < len(w.steps)


def test_the_hub_print_is_dropped_and_other_prints_pass(capsys):
    with lifecycle.without_prints():
        print("Loading weights from local directory")
        print("something else")
    assert capsys.readouterr().out == "something else\n"


def test_bind_errors_are_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        message = lifecycle.bind_error("127.0.0.1", busy)
        assert message == f"port {busy} on 127.0.0.1 is in use; choose another with --port"
    assert "cannot resolve" in lifecycle.bind_error("no-such-host.invalid", 7860)
    assert "this machine" in lifecycle.bind_error("192.0.2.1", 7860)  # TEST-NET-1: never a local address
    assert lifecycle.bind_error("127.0.0.1", None) is None


# ----------------------------------------------------------------------------- layering


def _imports(path: Path, top_level: bool = False) -> set[str]:
    """The absolute modules `path` imports (at the top level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = list(tree.body if top_level else ast.walk(tree))
    names = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module or "" for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 0}


def test_dependencies_point_one_way():
    for path in (ROOT / "vlm_demo").glob("*.py"):
        top = {name.split(".")[0] for name in _imports(path)}
        assert not top & {"gradio", "webui", "training"}, path
    # lifecycle installs the signal handlers before the slow imports, so it must not make them itself.
    light = {name.split(".")[0] for name in _imports(ROOT / "webui" / "lifecycle.py", top_level=True)}
    assert not light & {"gradio", "torch", "vlm_demo"}
    for path in (ROOT / "webui").glob("*.py"):  # the checks test_model.py makes of the library, for the app side
        assert not {name.split(".")[0] for name in _imports(path)} & {"torchvision", "pickle", "joblib"}, path
        assert "torch.load(" not in path.read_text(), path
    tree = ast.parse((ROOT / "app.py").read_text())
    from_library = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and (n.module or "").startswith("vlm_demo") for a in n.names}  # fmt: skip
    assert from_library == {("vlm_demo", "api")}


def test_app_py_stays_thin():
    assert len((ROOT / "app.py").read_text().splitlines()) <= 300


def test_placement_info_names_each_methods_blocks_from_the_registry(tiny_checkpoints):
    session = api.load(tiny_checkpoints)
    info = fmt.placement_info(session)  # tiny: depth 4, predictors at blocks 1, 2
    assert "blocks 0–3" in info
    paper, shared = info.split("Shared")
    assert f"{pruning.get('cls_attention').label} in 1, 2, 3" in paper  # EViT at a quarter, half, three quarters
    assert f"{pruning.get('tome').label} in 0, 1, 2, 3" in paper  # ToMe in every block
    assert f"{pruning.get('learned').label} before 1, 2" in paper
    # DynamicViT before a quarter, half and three quarters: its own checkpoint's stages, at either placement.
    assert f"{pruning.get('dynamicvit').label} before 1, 2, 3" in paper
    assert f"{pruning.get('dynamicvit').label} before 1, 2, 3" in shared
    assert f"{pruning.get('cls_attention').label} in 1, 2" in shared and f"{pruning.get('tome').label} in 1, 2" in shared
    assert [v for _, v in fmt.placement_choices()] == list(pruning.PLACEMENTS)
