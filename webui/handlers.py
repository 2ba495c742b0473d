"""The request handlers: one read-only `Session`, a lock, the output files, and errors mapped to ``gr.Error``."""

from __future__ import annotations

import functools
import html
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before Gradio imports pyplot to close the figures it sends: no GUI backend on a server

import gradio as gr  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, ImageChops  # noqa: E402

from vlm_demo import api, overlay, plots  # noqa: E402

from . import formatting as fmt  # noqa: E402
from .files import OutputFiles  # noqa: E402
from .inputs import image_source, parse_keep_ratio, uploaded_only  # noqa: E402

log = logging.getLogger("app")

DEFAULT_REPEATS = 10
DEFAULT_STYLE = overlay.STYLES[0]
DEDUPE_S = 1.0  # a live event identical to the run that ended less than this long ago is a duplicate
GENERIC_ERROR = "Something went wrong analysing this image; try another image."
# The outputs of the page's analysis events, in order (app.py lays out one component per name).
UI_OUTPUTS = ("overlay", "strip", "detail", "score_base", "score_pruned", "score_delta", "costs", "captions",
              "plot", "readout", "status")  # fmt: skip


def guarded(fn: Callable[[], Any]) -> Any:
    """Run `fn`; bad input -> its own message, anything else -> logged here and a short message there.

    Gradio renders an error's message as HTML, so any input it echoes is escaped.
    """
    try:
        return fn()
    except gr.Error:
        raise
    except ValueError as e:
        raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None
    except Exception:
        log.exception("analysis failed")
        raise gr.Error(GENERIC_ERROR, print_exception=False) from None


def tradeoff_plot(session: api.Session, a: api.Analysis) -> Figure:
    """The evaluation's trade-off figure (retrieval and pair panels) with this analysis marked."""
    marker = plots.Marker(a.method, a.keep_ratio, a.pruned.gmacs)
    return plots.tradeoff_figure(session.metrics, marker, panels=("r1", "pair"), width=5.0, height=3.4)


def trim_white(image: Image.Image) -> Image.Image:
    """Crop the white letterbox around the stage strip, so it fills its wide slot."""
    bg = Image.new("RGB", image.size, "white")
    box = ImageChops.difference(image.convert("RGB"), bg).getbbox()
    return image.crop(box) if box else image


class Explorer:
    """The request handlers.

    The lock keeps the background GMACs warm-up from running while a request is
    being timed; Gradio's queue already runs model events one at a time.

    Args:
        session: the loaded checkpoints (read-only).
        files: where output images go.
        lock: held around every model call (default: a new lock).
        upload_folder: where Gradio keeps uploads (default: Gradio's).
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

    def analysis(
        self, image: Any, caption: Any, method: Any, keep_ratio: Any,
        style: str = DEFAULT_STYLE, repeats: Any = DEFAULT_REPEATS, batch32: bool = False,
    ) -> api.Analysis:  # fmt: skip
        """`Session.analyze` on checked inputs, under the lock (raises ValueError for bad input)."""
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

    def views(self, a: api.Analysis, keep: bool = False) -> dict[str, Any]:
        """Everything the page shows for one analysis, by `UI_OUTPUTS` name (plain values; files written).

        `keep` marks the files as permanent (the page's initial values, which every visitor loads).
        """
        save = functools.partial(self.files.save, keep=keep)
        detail = "groups" if "groups" in a.overlays else "heatmap" if "heatmap" in a.overlays else None
        return {
            "overlay": save(a.overlays["kept"]),
            "strip": save(trim_white(a.overlays["stages"])),
            "detail": save(a.overlays[detail]) if detail else None,
            "detail_label": fmt.DETAIL_LABELS[detail],
            "score_base": round(a.baseline.score, 4),
            "score_pruned": round(a.pruned.score, 4),
            "score_delta": round(a.pruned.score - a.baseline.score, 4),
            "costs": fmt.cost_rows(a),
            "captions": fmt.caption_rows(a),
            "plot": tradeoff_plot(self.session, a),
            "readout": a.to_dict(),
            "status": fmt.status_line(a, self.context_length),
        }

    def analyze(self, image, caption, method, keep_ratio):  # noqa: ANN001 - the names are the API's parameter names
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
            a = self.analysis(image, caption, method, keep_ratio)
            return self.files.save(a.overlays["kept"]), a.to_dict()

        return guarded(run)

    def ui_analyze(
        self, image: Any, caption: Any, method: Any, keep_ratio: Any, style: Any, repeats: Any, batch32: Any,
        last: dict[str, Any], *, live: bool,
    ) -> list[Any]:  # fmt: skip
        """The page's analysis: values for `UI_OUTPUTS`, in order.

        Live events (an input changed) skip states that are mid-edit (no image or
        caption yet) and repeats of the run that has just ended: one upload or
        example click fires several change events at once, and the queue runs
        them one after another. `last` is the browser session's ``gr.State``,
        mutated in place so that it holds even when the run fails.
        """
        if live and (image is None or not isinstance(caption, str) or not caption.strip()):
            what = "Upload an image" if image is None else "Type a caption"
            return [gr.skip()] * (len(UI_OUTPUTS) - 1) + [f"{what} to run the analysis."]
        path = image.get("path") if isinstance(image, dict) else image
        key = repr((path, caption, method, keep_ratio, style, repeats, batch32))
        if live and last.get("key") == key and time.monotonic() - last.get("done", 0.0) < DEDUPE_S:
            return [gr.skip()] * len(UI_OUTPUTS)
        last["key"] = key
        try:
            v = guarded(lambda: self.views(self.analysis(image, caption, method, keep_ratio, style, repeats, batch32)))
        finally:
            last["done"] = time.monotonic()
        v["detail"] = gr.update(value=v["detail"], label=v["detail_label"])
        return [v[name] for name in UI_OUTPUTS]

    def compare(self, image: Any, caption: Any, keep_ratio: Any, style: str) -> list[tuple[str, str]]:
        """Every method's overlay at one keep ratio, captioned for the gallery."""

        def run() -> list[tuple[str, str]]:
            source = self.source(image)
            ratio = parse_keep_ratio(keep_ratio, self.num_patches)
            with self.lock:
                results = self.session.compare(source, caption, ratio, style=style)
            return [(self.files.save(s.overlay), fmt.compare_caption(s)) for s in results]

        return guarded(run)
