"""Visual token pruning explorer: a thin Gradio page over `vlm_demo.api`.

    python app.py [--checkpoints DIR_OR_HUB_REPO] [--host 127.0.0.1] [--port 7860] [--device cpu] [--queue-size 64]

Everything that computes lives in `vlm_demo.api`; this file only lays out the
page, turns an `Analysis` into widgets and files, and wires events.

Public API (stable): one endpoint, ``/analyze``, with inputs ``image``
(filepath), ``caption`` (str), ``method`` (learned, cls_attention, text_guided,
tome, random or none) and ``keep_ratio`` (float in (0, 1]); it returns the
kept-patch overlay (a PNG) and ``Analysis.to_dict()``. Every other event is
private.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import binascii
import ctypes
import functools
import html
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import matplotlib
from gradio.utils import get_upload_folder

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)
from PIL import Image, ImageChops  # noqa: E402

from vlm_demo import api, pruning  # noqa: E402
from vlm_demo.pruning import BASELINE  # noqa: E402

log = logging.getLogger("app")

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "docs" / "examples"

DEFAULT_METHOD = "learned"
DEFAULT_KEEP_RATIO = 0.5
DEFAULT_REPEATS = 10
DEFAULT_STYLE = api.overlay.STYLES[0]
SLIDER_RATIOS = [round(0.05 * i, 2) for i in range(1, 21)]  # the slider's stops, warmed at start-up
WARMUP_PAUSE_S = 0.02  # between warm-up steps, so a waiting request gets the model lock
DEDUPE_S = 1.0  # a live event identical to the run that ended less than this long ago is a duplicate
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # launch(max_file_size=...), and the same cap on images sent inline
QUEUE_SIZE = 64  # requests that may wait for the model; more are answered "busy" (HTTP 503)
GENERIC_ERROR = "Something went wrong analysing this image; try another image."

# (label, value): the order of the selector; the baseline is accepted by the API but not offered here.
METHOD_CHOICES = [(pruning.get(m).label, m) for m in pruning.names(prunes_only=True)]
def method_note_text(method: Any) -> str:
    """The registry's line for `method`, its paper, and which weights it runs."""
    if method not in pruning.REGISTRY:
        return ""
    info = pruning.get(method)
    paper = "" if info.paper == "-" else f" ({info.paper})"
    weights = " Runs the *pruned* checkpoint: the baseline plus the trained predictors." if info.needs_predictor else ""
    return f"{info.summary}{paper}.{weights}"


STYLE_CHOICES = [
    ("Dim dropped patches", "dim"),
    ("Grey out dropped patches", "grey"),
    ("Outline kept patches", "outline"),
]
COST_HEADERS = ["", "Baseline", "Pruned", "Ratio"]
CAPTION_HEADERS = ["rank", "baseline", "pruned"]

COST_NOTE = """\
**Why latency falls less than GMACs.** GMACs count multiply-adds (1 MAC = 2 FLOPs) and fall almost in \
proportion to the tokens removed. A call's wall-clock time also pays a fixed cost that pruning does not \
touch: Python, PyTorch's dispatch of every operator, and small matrix multiplies that wait on memory \
rather than arithmetic. On a model this small that overhead is a large share of a batch-1 call, so the \
saving is diluted. At batch 32 the arithmetic dominates (the compute-bound regime) and the latency ratio \
moves towards the GMACs ratio: tick *also time batch 32* under Advanced to see it. Latencies are medians \
± IQR of baseline and pruned runs interleaved on this machine, one request at a time.
"""

CSS = """
#title h1 { margin-bottom: 0.2rem; }
.pixel-art img { image-rendering: pixelated; }
#status { min-height: 1.5rem; }
"""


# ----------------------------------------------------------------------------- output files


class OutputFiles:
    """Output images written as uniquely named PNGs in an app-owned folder.

    Gradio would copy returned files into a cache folder named by their content
    hash, where concurrent requests producing the same picture race on one path
    ("Too little data for declared Content-Length"). Here every output gets its
    own name, and the folder is a Gradio static path, so files are served in
    place, never copied. Files older than `max_age_s` are swept (cheaply, at
    most every `sweep_every_s`); the folder goes at exit.
    """

    def __init__(self, folder: str | os.PathLike | None = None, max_age_s: float = 1800, sweep_every_s: float = 60):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="vlm-demo-outputs-")).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_age_s, self.sweep_every_s = max_age_s, sweep_every_s
        self._last_sweep = time.monotonic()
        self._lock = threading.Lock()

    def save(self, image: Image.Image, keep: bool = False) -> str:
        """Write a PIL image as PNG (fast compression) and return its path; `keep` exempts it from sweeps."""
        self.sweep()
        fd, path = tempfile.mkstemp(suffix=".png", prefix="keep-" if keep else "out-", dir=self.folder)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", compress_level=1)
        return path

    def sweep(self, force: bool = False) -> int:
        """Delete files older than `max_age_s`; returns how many went."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_sweep < self.sweep_every_s:
                return 0
            self._last_sweep = now
        cutoff, removed = time.time() - self.max_age_s, 0
        for p in self.folder.glob("out-*.png"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
            except OSError:  # another thread swept it first
                pass
        return removed

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------- inputs


def image_source(payload: Any) -> str | bytes:
    """The upload as a path (or bytes), straight from Gradio's payload.

    The events run with ``preprocess=False`` so that Gradio never opens the
    file itself (its preprocessing decodes bombs in full and turns non-images
    into opaque errors); `vlm_demo.images` decodes it safely inside the api.
    Where the path may point is checked by `uploaded_only`. An inline
    ``data:`` image gets the same size cap as an upload.
    """
    if payload is None:
        raise ValueError("Upload an image first (PNG, JPEG, WebP, GIF, BMP or TIFF).")
    if isinstance(payload, dict):
        if payload.get("path"):
            return str(payload["path"])
        url = payload.get("url") or ""
        if url.startswith("data:") and "," in url:
            data = url.split(",", 1)[1]
            if len(data) * 3 // 4 > MAX_UPLOAD_BYTES:
                raise ValueError(f"The image is larger than {MAX_UPLOAD_BYTES // 2**20} MB; upload a smaller one.")
            try:
                return base64.b64decode(data, validate=False)
            except (binascii.Error, ValueError):
                raise ValueError("The image data could not be read; upload the image as a file.") from None
    raise ValueError("The image must be an uploaded file (with gradio_client: handle_file(path)).")


def uploaded_only(source: str | bytes, upload_folder: str) -> str | bytes:
    """`source` if it is bytes or a file under Gradio's upload folder: no request may name another server file.

    Gradio refuses a FileData payload (one with ``meta``) outside its upload
    folder, but with ``preprocess=False`` it hands a bare ``{"path": ...}``
    dict to the event untouched, so without this check a request could make
    the app read any file on the server.
    """
    if isinstance(source, bytes):
        return source
    folder, path = os.path.realpath(upload_folder), os.path.realpath(source)
    if os.path.commonpath([folder, path]) != folder:
        raise ValueError("The image must be a file uploaded to this app (with gradio_client: handle_file(path)).")
    return path


def parse_keep_ratio(value: Any, num_patches: int) -> float:
    """A keep ratio in (0, 1], rounded to 4 decimals so that slider stops hit the GMACs cache."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = math.nan
    if isinstance(value, bool) or not math.isfinite(r) or not 0.0 < r <= 1.0:
        raise ValueError(
            f"The keep ratio must be a number in (0, 1]: the fraction of the {num_patches} image patches "
            f"left after the last stage (got {value!r})."
        )
    return round(r, 4)


# ----------------------------------------------------------------------------- presentation


def fmt_tokens(per_stage: list[int]) -> str:
    return " → ".join(str(n) for n in per_stage)


def fmt_ms(median: float, iqr: float) -> str:
    return f"{median:.1f} ± {iqr:.1f}"


def fmt_ratio(num: float, den: float) -> str:
    return f"{num / den:.2f}×" if den else "—"


def cost_rows(a: api.Analysis) -> list[list[str]]:
    """The cost table: tokens, GMACs and latency, baseline against pruned."""
    b, p = a.baseline, a.pruned
    rows = [
        ["Tokens per stage (a fused token counts)", fmt_tokens(b.tokens_per_stage), fmt_tokens(p.tokens_per_stage),
         fmt_ratio(p.tokens, b.tokens)],
        ["GMACs, batch 1 (fvcore; 1 MAC = 2 FLOPs)", f"{b.gmacs:.4g}", f"{p.gmacs:.4g}", fmt_ratio(p.gmacs, b.gmacs)],
        ["Latency, batch 1 (ms, median ± IQR)", fmt_ms(b.latency_ms, b.latency_iqr_ms),
         fmt_ms(p.latency_ms, p.latency_iqr_ms), fmt_ratio(p.latency_ms, b.latency_ms)],
    ]  # fmt: skip
    if a.latency_bs32:
        tb, tp = a.latency_bs32["baseline"], a.latency_bs32["pruned"]
        rows.append(["Latency, batch 32 (ms, median ± IQR)", fmt_ms(tb.median_ms, tb.iqr_ms),
                     fmt_ms(tp.median_ms, tp.iqr_ms), fmt_ratio(tp.median_ms, tb.median_ms)])  # fmt: skip
    else:
        rows.append(["Latency, batch 32 (ms)", "—", "—", "—"])
    return rows


def caption_rows(a: api.Analysis) -> list[list[Any]]:
    """Top captions of the test-set bank, baseline against pruned."""
    b, p = a.baseline.top_captions, a.pruned.top_captions
    if not b and not p:
        return [[1, "No caption bank (caption_bank.json) in the checkpoints folder.", "—"]]
    cell = lambda pairs, i: f"{pairs[i][0]}  ({pairs[i][1]:.3f})" if i < len(pairs) else "—"  # noqa: E731
    return [[i + 1, cell(b, i), cell(p, i)] for i in range(max(len(b), len(p)))]


def metric_curves(metrics: dict[str, Any] | None) -> dict[str, list[tuple[float, float, float | None, float | None]]]:
    """metrics.json rows per method: (keep_ratio, gmacs, mean R@1 or None, pair accuracy or None)."""
    curves: dict[str, list[tuple[float, float, float | None, float | None]]] = {}
    for row in (metrics or {}).get("rows", []) or []:
        method, ratio, gmacs = row.get("method"), row.get("keep_ratio"), row.get("gmacs")
        if method is None or ratio is None or gmacs is None:
            continue
        r1 = row.get("mean_r1")
        if r1 is None and row.get("r1_i2t") is not None and row.get("r1_t2i") is not None:
            r1 = (row["r1_i2t"] + row["r1_t2i"]) / 2
        curves.setdefault(method, []).append((float(ratio), float(gmacs), r1, row.get("pair_acc")))
    return {m: sorted(pts, key=lambda t: t[1]) for m, pts in curves.items()}


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Linear interpolation on sorted-or-not points (clamped at the ends); no numpy needed."""
    pts = sorted(zip(xs, ys))
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


def tradeoff_figure(metrics: dict[str, Any] | None, method: str, keep_ratio: float, gmacs_now: float) -> Figure:
    """Accuracy against GMACs per method (from metrics.json), with this analysis marked.

    A bare `Figure` (not pyplot) keeps no global state, so nothing leaks between requests.
    """
    curves = metric_curves(metrics)
    fig = Figure(figsize=(10, 3.4 if curves else 0.9), dpi=100, layout="constrained")
    if not curves:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(
            0.5, 0.5,
            "No evaluation results (metrics.json) in the checkpoints folder.\n"
            "Run `python -m training.evaluate --out checkpoints` to produce checkpoints/metrics.json.",
            ha="center", va="center", fontsize=11, color="#444",
        )  # fmt: skip
        return fig
    title = "Accuracy vs compute on the test set (checkpoints/metrics.json); star and dotted line: this analysis"
    fig.suptitle(title, fontsize=10)
    panels = ((2, "mean R@1 (i2t, t2i), %", "Retrieval vs compute"), (3, "pair accuracy, %", "Hard-negative pairs"))
    colours = {m: f"C{i}" for i, m in enumerate(pruning.names())}
    for k, (col, ylabel, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for m, pts in curves.items():
            xy = [(p[1], p[col]) for p in pts if p[col] is not None]
            if not xy:
                continue
            if not pruning.get(m).prunes:
                ax.plot(*zip(*xy), marker="D", ls="none", ms=7, color="black", label="baseline", zorder=4)
            else:
                current = m == method
                ax.plot(*zip(*xy), marker="o", ms=6 if current else 4, lw=2.4 if current else 1.2,
                        alpha=1.0 if current else 0.5, color=colours.get(m, "grey"), label=m)  # fmt: skip
        ax.axvline(gmacs_now, color="#444", ls=":", lw=1.2)
        own = [(p[0], p[col]) for p in curves.get(method, []) if p[col] is not None]
        if own:
            y = _interp(keep_ratio, [r for r, _ in own], [v for _, v in own])
            ax.plot([gmacs_now], [y], marker="*", ms=18, color="gold", mec="black", ls="none", zorder=5,
                    label=f"{method} @ {keep_ratio:g}")  # fmt: skip
        else:  # e.g. text_guided has no retrieval R@1: its pruning depends on the caption
            ax.text(0.02, 0.97, f"no {method} results here", ha="left", va="top", transform=ax.transAxes,
                    color="#444", fontsize=8)  # fmt: skip
        ax.set(xlabel="GMACs per image (fvcore)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    return fig


def status_line(a: api.Analysis, context_length: int) -> str:
    """One line under the inputs; holds no user text (nothing to escape)."""
    d = a.to_dict()
    text = (
        f"**{pruning.get(a.method).label}** at keep ratio {a.keep_ratio:g}: "
        f"{fmt_tokens(a.pruned.tokens_per_stage)} tokens, {d['gmacs_ratio']:.2f}× the baseline's GMACs, "
        f"{d['latency_ratio']:.2f}× its batch-1 latency."
    )
    if a.caption_truncated:
        text += f" The caption is longer than the text encoder's {context_length}-token context: the rest is ignored."
    return text


# ----------------------------------------------------------------------------- the page


class Explorer:
    """The request handlers: one `Session` (read-only), a lock, and the output folder.

    The lock keeps the background GMACs warm-up from running while a request is
    being timed; Gradio's queue already runs model events one at a time.
    """

    def __init__(
        self, session: api.Session, files: OutputFiles, lock: threading.Lock | None = None,
        upload_folder: str | None = None,
    ):  # fmt: skip
        self.session, self.files = session, files
        self.lock = lock or threading.Lock()
        self.upload_folder = upload_folder or get_upload_folder()
        self.num_patches = session.cfg.vision.num_patches
        self.context_length = session.tokenizer.context_length

    def source(self, image: Any) -> str | bytes:
        """What to decode. A `Path` is the app's own file (the prefilled example; no request can send one);
        anything else came in a request, so it may only be image bytes or an upload."""
        if isinstance(image, Path):
            return str(image)
        return uploaded_only(image_source(image), self.upload_folder)

    # ---- errors

    @staticmethod
    def guarded(fn: Callable[[], Any]) -> Any:
        """Bad input -> its own message; anything else -> logged here, a short message there."""
        try:
            return fn()
        except gr.Error:
            raise
        except ValueError as e:  # Gradio renders the message as HTML: escape any echoed input
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None
        except Exception:
            log.exception("analysis failed")
            raise gr.Error(GENERIC_ERROR, print_exception=False) from None

    # ---- computation (all in vlm_demo.api)

    def analysis(
        self, image: Any, caption: Any, method: Any, keep_ratio: Any,
        style: str = DEFAULT_STYLE, repeats: Any = DEFAULT_REPEATS, batch32: bool = False,
    ) -> api.Analysis:  # fmt: skip
        source = self.source(image)
        ratio = parse_keep_ratio(keep_ratio, self.num_patches)
        repeats = int(max(1, min(50, round(float(repeats or DEFAULT_REPEATS)))))
        t0 = time.perf_counter()
        with self.lock:
            a = self.session.analyze(
                source, caption, str(method), ratio, latency_repeats=repeats, style=style, batch32=bool(batch32)
            )
        log.info("analyze %s @ %g: %.2f s", a.method, a.keep_ratio, time.perf_counter() - t0)
        return a

    # ---- views

    def views(self, a: api.Analysis, keep: bool = False) -> dict[str, Any]:
        """Everything the page shows for one analysis (plain values; files already written).

        `keep` marks the files as permanent (the page's initial values, which every visitor loads).
        """
        save = functools.partial(self.files.save, keep=keep)
        detail_key = "groups" if "groups" in a.overlays else "heatmap" if "heatmap" in a.overlays else None
        detail_label = {
            "groups": "ToMe merge groups (one colour per token)",
            "heatmap": "Importance (yellow = high)",
            None: "No heat map (nothing pruned)",
        }[detail_key]
        return {
            "overlay": save(a.overlays["kept"]),
            "strip": save(trim_white(a.overlays["stages"])),
            "detail": save(a.overlays[detail_key]) if detail_key else None,
            "detail_label": detail_label,
            "score_base": round(a.baseline.score, 4),
            "score_pruned": round(a.pruned.score, 4),
            "score_delta": round(a.pruned.score - a.baseline.score, 4),
            "costs": cost_rows(a),
            "captions": caption_rows(a),
            "plot": tradeoff_figure(self.session.metrics, a.method, a.keep_ratio, a.pruned.gmacs),
            "readout": a.to_dict(),
            "status": status_line(a, self.context_length),
        }

    def compare(self, image: Any, caption: Any, keep_ratio: Any, style: str) -> list[tuple[str, str]]:
        def run() -> list[tuple[str, str]]:
            source = self.source(image)
            ratio = parse_keep_ratio(keep_ratio, self.num_patches)
            with self.lock:
                results = self.session.compare(source, caption, ratio, style=style)
            return [
                (self.files.save(s.overlay), f"{s.method} · {s.score:.3f} · {s.gmacs:.3g} GMACs")
                for s in results
            ]

        return self.guarded(run)


def trim_white(image: Image.Image) -> Image.Image:
    """Crop the white letterbox around the stage strip, so it fills its wide slot."""
    bg = Image.new("RGB", image.size, "white")
    box = ImageChops.difference(image.convert("RGB"), bg).getbbox()
    return image.crop(box) if box else image


def load_examples(folder: Path) -> list[list[str]]:
    """[[image path, caption], ...] from docs/examples/examples.json; [] if absent."""
    index = folder / "examples.json"
    if not index.is_file():
        return []
    out = []
    for item in json.loads(index.read_text()):
        path = folder / item["image"]
        if path.is_file():
            out.append([str(path), item["caption"]])
    return out


def build_demo(
    session: api.Session,
    *,
    files: OutputFiles | None = None,
    lock: threading.Lock | None = None,
    examples_dir: Path = EXAMPLES_DIR,
    prefill: bool = True,
) -> gr.Blocks:
    """The page.

    Args:
        session: the loaded checkpoints (read-only).
        files: where output images go (default: a new temporary folder).
        lock: held around every model call; share it with the warm-up thread.
        examples_dir: holds examples.json and the example images.
        prefill: analyse the first example once, so the page opens populated.
    """
    files = files or OutputFiles()
    gr.set_static_paths([str(files.folder)])  # served in place: no copy into Gradio's hash-named cache
    app = Explorer(session, files, lock)
    cfg = session.cfg
    P, grid = cfg.vision.num_patches, cfg.vision.image_size // cfg.vision.patch_size
    examples = load_examples(examples_dir)

    first: dict[str, Any] = {}
    if prefill and examples:
        try:
            # The process's first forward passes pay one-off costs: a throwaway run keeps them out of the timings.
            app.analysis(Path(examples[0][0]), examples[0][1], DEFAULT_METHOD, DEFAULT_KEEP_RATIO, repeats=1)
            a = app.analysis(Path(examples[0][0]), examples[0][1], DEFAULT_METHOD, DEFAULT_KEEP_RATIO)
            first = app.views(a, keep=True)
        except Exception:  # a page that opens empty is still a working page
            log.exception("could not prefill the first example")
    initial = (examples[0] if first else [None, ""])

    with gr.Blocks(title="Visual token pruning explorer", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(
            "# Visual token pruning explorer\n"
            f"A ViT image encoder cuts a picture into {P} patches ({grid} × {grid}) and runs a transformer over them; "
            "its cost grows with the number of patch tokens. *Token pruning* drops (or merges) the least useful "
            "tokens between blocks. Upload an image, write a caption, then pick a method and a keep ratio: the overlay "
            "shows which patches survive, the scores show how well image and caption still align (cosine similarity, "
            "full model against pruned), and the cost table shows the tokens, GMACs and measured latency saved.",
            elem_id="title",
        )
        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- inputs
            with gr.Column(scale=4, min_width=320):
                image = gr.Image(
                    value=initial[0], type="filepath", sources=["upload", "clipboard", "webcam"], image_mode=None,
                    label="Image", height=300, elem_id="input-image",
                )  # fmt: skip
                caption = gr.Textbox(
                    value=initial[1], label="Caption", lines=2, max_lines=6,
                    placeholder="e.g. a small red circle at the top left", elem_id="caption",
                )  # fmt: skip
                method = gr.Radio(METHOD_CHOICES, value=DEFAULT_METHOD, label="Pruning method", elem_id="method")
                method_note = gr.Markdown(method_note_text(DEFAULT_METHOD), elem_id="method-note")
                keep_ratio = gr.Slider(
                    0.05, 1.0, value=DEFAULT_KEEP_RATIO, step=0.05, label="Keep ratio",
                    info=f"Fraction of the {P} patches left after the last stage (earlier stages keep a share "
                    "in between).",
                    elem_id="keep-ratio",
                )  # fmt: skip
                with gr.Accordion("Advanced", open=False):
                    style = gr.Radio(STYLE_CHOICES, value=DEFAULT_STYLE, label="Overlay style")
                    repeats = gr.Slider(
                        1, 50, value=DEFAULT_REPEATS, step=1, label="Latency repeats",
                        info="Timed batch-1 passes per model, interleaved, after 2 warm-up passes.",
                    )  # fmt: skip
                    batch32 = gr.Checkbox(False, label="also time batch 32", info="About 30× the work: slower.")
                run_btn = gr.Button("Analyze", variant="primary")
                status = gr.Markdown(first.get("status", ""), elem_id="status")
                # The public /analyze endpoint: its own event with exactly the 4 contract inputs.
                api_btn = gr.Button("analyze (API)", visible=False)
                if examples:
                    gr.Examples(
                        examples, inputs=[image, caption],
                        label="Examples: synthetic test scenes and a public-domain photo",
                        cache_examples=False, examples_per_page=8,
                    )  # fmt: skip

            # ---------------------------------------------------------------- outputs
            with gr.Column(scale=6, min_width=420):
                with gr.Tabs():
                    with gr.Tab("Analysis"):
                        with gr.Row():
                            overlay = gr.Image(
                                value=first.get("overlay"), type="filepath", format="png", label="Kept patches",
                                interactive=False, height=300, buttons=["download", "fullscreen"],
                                elem_id="overlay", elem_classes="pixel-art",
                            )  # fmt: skip
                            detail = gr.Image(
                                value=first.get("detail"), type="filepath", format="png",
                                label=first.get("detail_label", "Importance heat map / ToMe merge groups"),
                                interactive=False, height=300, buttons=["download", "fullscreen"],
                                elem_id="detail", elem_classes="pixel-art",
                            )  # fmt: skip
                        strip = gr.Image(
                            value=first.get("strip"), type="filepath", format="png",
                            label="Tokens left after each stage", interactive=False, height=180,
                            buttons=["download", "fullscreen"], elem_id="strip", elem_classes="pixel-art",
                        )  # fmt: skip
                        with gr.Row():
                            score_base = gr.Number(first.get("score_base"), label="Alignment, baseline (cosine)",
                                                   interactive=False, precision=4)  # fmt: skip
                            score_pruned = gr.Number(first.get("score_pruned"), label="Alignment, pruned (cosine)",
                                                     interactive=False, precision=4)  # fmt: skip
                            score_delta = gr.Number(first.get("score_delta"), label="Difference (pruned − baseline)",
                                                    interactive=False, precision=4)  # fmt: skip
                        costs = gr.Dataframe(
                            value=first.get("costs"), headers=COST_HEADERS, datatype="str", interactive=False,
                            label="Cost: baseline against pruned", column_widths=["34%", "22%", "22%", "22%"],
                            wrap=True, elem_id="costs",
                        )  # fmt: skip
                        gr.Markdown(COST_NOTE, elem_id="cost-note")
                        captions = gr.Dataframe(
                            value=first.get("captions"), headers=CAPTION_HEADERS, datatype=["number", "str", "str"],
                            interactive=False, wrap=True, column_widths=["10%", "45%", "45%"],
                            label="Closest captions of the test-set caption bank (cosine)", elem_id="captions",
                        )  # fmt: skip
                    with gr.Tab("Compare all methods"):
                        gr.Markdown(
                            "Every pruning method on the current image, caption and keep ratio "
                            "(captions: method · alignment · GMACs; no timing, so it is quick)."
                        )
                        compare_btn = gr.Button("Compare all methods", variant="primary")
                        gallery = gr.Gallery(label="Kept patches per method", columns=3, height=520,
                                             object_fit="contain", format="png", elem_id="gallery")  # fmt: skip
                    with gr.Tab("JSON"):
                        readout = gr.JSON(
                            first.get("readout"), label="Analysis.to_dict()", open=True, elem_id="readout"
                        )

        plot = gr.Plot(first.get("plot"), label="Accuracy vs compute", show_label=False, format="png",
                       elem_id="tradeoff")  # fmt: skip

        # ------------------------------------------------------------------- events
        outputs = [
            overlay, strip, detail, score_base, score_pruned, score_delta, costs, captions, plot, readout, status,
        ]  # fmt: skip
        ui_inputs = [image, caption, method, keep_ratio, style, repeats, batch32]

        last_run = gr.State({})  # per browser session: the inputs and end time of the last live run

        def ui_analyze(img, cap, meth, ratio, sty, reps, b32, last: dict, *, live: bool):
            if live and (img is None or not isinstance(cap, str) or not cap.strip()):
                # Mid-edit states are not errors: say what is missing and keep the last result.
                what = "Upload an image" if img is None else "Type a caption"
                return [gr.skip()] * (len(outputs) - 1) + [f"{what} to run the analysis."]
            # One upload (or one example click) fires several change events at once; the queue runs
            # them one after another, so a repeat of the run that has just finished is skipped.
            key = repr(((img or {}).get("path") if isinstance(img, dict) else img, cap, meth, ratio, sty, reps, b32))
            if live and last.get("key") == key and time.monotonic() - last.get("done", 0.0) < DEDUPE_S:
                return [gr.skip()] * len(outputs)
            last["key"] = key  # the State is mutated in place, so this holds even when the run fails
            try:
                v = Explorer.guarded(lambda: app.views(app.analysis(img, cap, meth, ratio, sty, reps, b32)))
            finally:
                last["done"] = time.monotonic()
            return [
                v["overlay"], v["strip"], gr.update(value=v["detail"], label=v["detail_label"]),
                v["score_base"], v["score_pruned"], v["score_delta"], v["costs"], v["captions"], v["plot"],
                v["readout"], v["status"],
            ]  # fmt: skip

        def analyze(image, caption, method, keep_ratio):  # noqa: ANN001 - the names are the API's parameter names
            """Score an image and caption with the full and the pruned model.

            Args:
                image: the image file.
                caption: the text to align with the image.
                method: learned, cls_attention, text_guided, tome, random or none.
                keep_ratio: fraction of the patches left after the last stage, in (0, 1].

            Returns:
                The kept-patch overlay (PNG, the input's size) and the analysis as JSON.
            """

            def run() -> tuple[str, dict[str, Any]]:
                a = app.analysis(image, caption, method, keep_ratio)
                return app.files.save(a.overlays["kept"]), a.to_dict()

            return Explorer.guarded(run)

        model_events = {"concurrency_id": "model", "concurrency_limit": 1, "preprocess": False}
        api_btn.click(
            analyze, [image, caption, method, keep_ratio], [overlay, readout],
            api_name="analyze", api_visibility="public", **model_events,
        )  # fmt: skip
        run_btn.click(
            lambda *a: ui_analyze(*a, live=False), [*ui_inputs, last_run], outputs,
            api_name="analyze_ui", api_visibility="private", **model_events,
        )  # fmt: skip
        gr.on(
            [image.change, caption.change, method.change, keep_ratio.change, style.change, batch32.change,
             repeats.release],
            lambda *a: ui_analyze(*a, live=True), [*ui_inputs, last_run], outputs,
            api_name="analyze_live", api_visibility="private", trigger_mode="always_last", show_progress="minimal",
            **model_events,
        )  # fmt: skip
        method.change(  # unprocessed: Gradio's own check of a Radio echoes a bad value, unescaped, in its error
            method_note_text, method, method_note,
            api_name="method_note", api_visibility="private", show_progress="hidden", queue=False, preprocess=False,
        )  # fmt: skip
        compare_btn.click(
            app.compare, [image, caption, keep_ratio, style], gallery,
            api_name="compare", api_visibility="private", **model_events,
        )  # fmt: skip
    return demo


# ----------------------------------------------------------------------------- start-up


def warm_gmacs_in_background(
    app_lock: threading.Lock, session: api.Session, first: str = DEFAULT_METHOD
) -> threading.Thread:
    """Fill the fvcore GMACs cache for every slider stop, one (method, ratio) at a time.

    Each step holds the request lock, so a request waits for at most one trace
    and its timings never overlap the warm-up. The default method goes first.
    A lock is not fair: released and re-acquired at once, it starved the first
    request for the whole warm-up (10 s), so each step ends with a short pause
    in which a waiting request takes the lock.
    """
    order = [first, BASELINE] + [m for m in pruning.names(prunes_only=True) if m != first]

    def run() -> None:
        t0 = time.perf_counter()
        for m in order:
            for r in SLIDER_RATIOS if pruning.get(m).prunes else [1.0]:
                with app_lock:
                    session.warm_gmacs([r], (m,))
                time.sleep(WARMUP_PAUSE_S)
        log.info("GMACs cache warm: %d methods x %d keep ratios in %.0f s", len(order), len(SLIDER_RATIOS),
                 time.perf_counter() - t0)  # fmt: skip

    thread = threading.Thread(target=run, name="warm-gmacs", daemon=True)
    thread.start()
    return thread


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc malloc's arenas, as ``MALLOC_ARENA_MAX`` would; returns whether it did.

    Gradio runs handlers on a pool of up to 40 threads, and glibc gives threads
    their own arenas (up to 8 per core), which keep what they once held: under
    load the server's RSS crept up by about 50 MB a minute. With 2 arenas it
    stays flat, at the same throughput (tests/soak_app.py). A no-op off glibc,
    or when ``MALLOC_ARENA_MAX`` is already set.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-8, arenas) == 1  # -8: M_ARENA_MAX in <malloc.h>
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM (a stopped container, a test) closes the server like Ctrl-C, so the cleanup runs."""
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Visual token pruning explorer (Gradio).")
    p.add_argument("--checkpoints", default="checkpoints",
                   help="folder with baseline/ and pruned/, or a Hub repo id (default: checkpoints)")  # fmt: skip
    p.add_argument("--host", default=None, help="address to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device (default: cpu)")
    p.add_argument("--no-warmup", action="store_true", help="skip the background GMACs warm-up (for tests)")
    p.add_argument("--no-prefill", action="store_true", help="open the page empty instead of analysing an example")
    p.add_argument("--queue-size", type=int, default=QUEUE_SIZE,
                   help=f"requests that may wait; more are answered 'busy' (default: {QUEUE_SIZE})")  # fmt: skip
    args = p.parse_args(argv)
    if args.queue_size < 1:
        p.error("--queue-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_malloc_arenas()  # before the server's threads start
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        session = api.load(args.checkpoints, args.device)
    except (ValueError, ConnectionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    files, lock = OutputFiles(), threading.Lock()
    atexit.register(files.remove)
    signal.signal(signal.SIGTERM, _stop)
    demo = build_demo(session, files=files, lock=lock, prefill=not args.no_prefill)
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        theme=gr.themes.Soft(),
        css=CSS,
        max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=[str(files.folder)],
        prevent_thread_lock=True,
    )
    if not args.no_warmup:  # after the server is up, so the first request is not starved
        warm_gmacs_in_background(lock, session)
    demo.block_thread()


if __name__ == "__main__":
    main()
