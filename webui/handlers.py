"""The request handlers: one read-only `Session`, a lock, the output files, and errors mapped to ``gr.Error``."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before Gradio imports pyplot to close the figures it sends: no GUI backend on a server

import gradio as gr  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vlm_demo import api, overlay, plots  # noqa: E402

from . import formatting as fmt  # noqa: E402
from . import scrub  # noqa: E402
from .files import OutputFiles  # noqa: E402
from .inputs import image_source, parse_gmacs_ratio, parse_keep_ratio, parse_placement, uploaded_only  # noqa: E402
from .models import Models  # noqa: E402

log = logging.getLogger("app")

DEFAULT_REPEATS = 10
DEFAULT_STYLE = overlay.STYLES[0]
DEDUPE_S = 1.0  # a live event identical to the run that ended less than this long ago is a duplicate
GENERIC_ERROR = "Something went wrong analysing this image; try another image."
# The outputs of the page's analysis events, in order (app.py lays out one component per name).
# The overlays themselves come from the sweep (every slider stop, swapped in the browser); these follow the
# settled slider: costs with measured latency, the closest captions, the plot's marker, the JSON, the status.
UI_OUTPUTS = ("costs", "captions", "plot", "readout", "status")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input -> its own message, anything else -> logged here and a short message there.

    Gradio renders an error's message as HTML, so any input it echoes is escaped.
    """
    try:
        yield
    except gr.Error:
        raise
    except ValueError as e:
        raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None
    except Exception:
        log.exception("request failed")
        raise gr.Error(GENERIC_ERROR, print_exception=False) from None


def guarded(fn: Callable[[], Any]) -> Any:
    """Run `fn` under `user_errors`."""
    with user_errors():
        return fn()


def tradeoff_plot(session: api.Session, a: api.Analysis) -> Figure:
    """The evaluation's trade-off figure (retrieval and pair panels) with this analysis marked."""
    marker = plots.Marker(a.method, a.keep_ratio, a.pruned.gmacs)
    return plots.tradeoff_figure(session.metrics, marker, panels=("r1", "pair"), width=5.0, height=3.4)


class Explorer:
    """The request handlers.

    The lock keeps the background GMACs warm-up from running while a request is
    being timed; Gradio's queue already runs model events one at a time.

    Args:
        models: the models the page offers (a single `Session` serves as the only one).
        files: where output images go.
        lock: held around every model call (default: a new lock).
        upload_folder: where Gradio keeps uploads (default: Gradio's).
    """

    def __init__(
        self, models: Models | api.Session, files: OutputFiles, lock: threading.Lock | None = None,
        upload_folder: str | None = None,
    ):  # fmt: skip
        self.models = models if isinstance(models, Models) else Models(models, models.source or "checkpoints")
        self.files = files
        self.lock = lock or threading.Lock()
        self.upload_folder = upload_folder or get_upload_folder()

    @property
    def session(self) -> api.Session:
        """The default model's session (the public /analyze and /sweep run on it)."""
        return self.models.get(None)

    @property
    def num_patches(self) -> int:
        return self.session.cfg.vision.num_patches

    def source(self, image: Any) -> str | bytes:
        """What to decode. A `Path` is the app's own file (the prefilled example; no request can send one);
        anything else came in a request, so it may only be image bytes or an upload."""
        if isinstance(image, Path):
            return str(image)
        return uploaded_only(image_source(image), self.upload_folder)

    def analysis(
        self, image: Any, caption: Any, method: Any, keep_ratio: Any,
        style: str = DEFAULT_STYLE, repeats: Any = DEFAULT_REPEATS, batch32: bool = False, model: Any = None,
        placement: Any = None,
    ) -> api.Analysis:  # fmt: skip
        """`Session.analyze` on checked inputs, under the lock (raises ValueError for bad input)."""
        source = self.source(image)
        session = self.models.get(model)
        ratio = parse_keep_ratio(keep_ratio, session.cfg.vision.num_patches)
        where = parse_placement(placement)
        repeats = int(max(1, min(50, round(float(repeats or DEFAULT_REPEATS)))))
        t0 = time.perf_counter()
        with self.lock:
            a = session.analyze(source, caption, str(method), ratio, latency_repeats=repeats, style=style,
                                batch32=bool(batch32), placement=where)  # fmt: skip
        log.info("analyze %s @ %g: %.2f s", a.method, a.keep_ratio, time.perf_counter() - t0)
        return a

    def views(self, a: api.Analysis, session: api.Session | None = None) -> dict[str, Any]:
        """What the page shows for one settled analysis, by `UI_OUTPUTS` name (plain values)."""
        session = session or self.session
        return {
            "costs": fmt.cost_rows(a),
            "captions": fmt.caption_rows(a),
            "plot": tradeoff_plot(session, a) if session.metrics else None,
            "readout": a.to_dict(),
            "status": fmt.status_line(a, session.tokenizer.context_length),
        }

    def frames(
        self, image: Any, caption: Any, method: Any, keep_ratio: Any, style: Any = DEFAULT_STYLE, model: Any = None,
        placement: Any = None,
    ) -> Iterator[str]:  # fmt: skip
        """The sweep's frames as HTML: first the slider's own stop (at once), then every stop."""
        source = self.source(image)
        session = self.models.get(model)
        current = parse_keep_ratio(keep_ratio, session.cfg.vision.num_patches)
        where = parse_placement(placement)
        stops = api.SWEEP_STOPS
        first = min(stops, key=lambda r: abs(r - current))
        style = style if style in overlay.STYLES else DEFAULT_STYLE
        t0 = time.perf_counter()
        with self.lock:
            one = session.sweep(source, caption, str(method), stops=(first,), placement=where)
        yield scrub.frames_html(one, first, style, total=len(stops))
        with self.lock:  # the other stops; the first one is not computed twice
            others = tuple(r for r in stops if r != first)
            rest = session.sweep(source, caption, str(method), stops=others, placement=where)
        full = dataclasses.replace(rest, stops=sorted(one.stops + rest.stops, key=lambda st: st.keep_ratio))
        log.info("sweep %s, %d stops: %.2f s", full.method, len(stops), time.perf_counter() - t0)
        yield scrub.frames_html(full, first, style)

    def ui_sweep(
        self, image: Any, caption: Any, method: Any, keep_ratio: Any, style: Any, model: Any, placement: Any,
        last: dict[str, Any],
    ) -> Iterator[Any]:  # fmt: skip
        """The page's sweep event: frames as they come.

        An input that is mid-edit (no image or caption yet) keeps the page as it is, and
        so does a repeat of the sweep on screen: one upload fires several change events.
        `last` is the browser session's ``gr.State``, mutated in place.
        """
        if image is None or not isinstance(caption, str) or not caption.strip():
            yield gr.skip()
            return
        path = image.get("path") if isinstance(image, dict) else image
        key = repr((path, caption, method, style, model, placement))
        if last.get("sweep") == key:
            yield gr.skip()
            return
        with user_errors():
            yield from self.frames(image, caption, method, keep_ratio, style, model, placement)
            last["sweep"] = key

    def sweep(self, image, caption, method):  # noqa: ANN001 - the names are the API's parameter names
        """Every slider stop at once: tokens, GMACs, score and kept patches per keep ratio (no images, no latency).

        Args:
            image: the image file.
            caption: the text to align with the image.
            method: learned, cls_attention, text_guided, tome, random or none.

        Returns:
            ``Sweep.to_dict()``: the baseline's score and GMACs, and one entry per stop.
        """

        def run() -> dict[str, Any]:
            source = self.source(image)
            with self.lock:
                return self.session.sweep(source, caption, str(method)).to_dict()

        return guarded(run)

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
        model: Any, placement: Any, last: dict[str, Any], *, live: bool,
    ) -> list[Any]:  # fmt: skip
        """The page's analysis: values for `UI_OUTPUTS`, in order.

        Live events (an input changed) skip states that are mid-edit (no image or
        caption yet) and repeats of the run that has just ended: one upload or
        example click fires several change events at once, and the queue runs
        them one after another. `last` is the browser session's ``gr.State``,
        mutated in place so that it holds even when the run fails.
        """
        if live and isinstance(keep_ratio, (int, float)) and keep_ratio < 0:  # the slider moved on (scrub.DEBOUNCE_JS)
            return [gr.skip()] * len(UI_OUTPUTS)
        if live and (image is None or not isinstance(caption, str) or not caption.strip()):
            what = "Upload an image" if image is None else "Type a caption"
            return [gr.skip()] * (len(UI_OUTPUTS) - 1) + [f"{what} to run the analysis."]
        path = image.get("path") if isinstance(image, dict) else image
        key = repr((path, caption, method, keep_ratio, style, repeats, batch32, model, placement))
        if live and last.get("key") == key and time.monotonic() - last.get("done", 0.0) < DEDUPE_S:
            return [gr.skip()] * len(UI_OUTPUTS)
        last["key"] = key
        try:
            session = guarded(lambda: self.models.get(model))
            a = guarded(
                lambda: self.analysis(image, caption, method, keep_ratio, style, repeats, batch32, model, placement)
            )
            v = self.views(a, session)
        finally:
            last["done"] = time.monotonic()
        v["plot"] = gr.update(value=v["plot"], visible=v["plot"] is not None)
        return [v[name] for name in UI_OUTPUTS]

    def select_model(self, model: Any, method: Any, progress: gr.Progress = gr.Progress()) -> list[Any]:
        """Switch models: load it (progress shown), offer its methods, show or hide what applies to it.

        Returns updates for: the selector itself, the method radio, the caption table, the plot, the
        model note and the placement's description (the blocks depend on the model's depth). A model
        that cannot load leaves a warning and the page on the default model.
        """
        progress(0, desc=f"Loading {model} (first use only)…")
        try:
            session = self.models.get(model)
        except (ValueError, OSError) as e:
            gr.Warning(html.escape(str(e), quote=False))
            model, session = self.models.default, self.session
        methods = session.methods(prunes_only=True)
        value = method if method in methods else methods[0]
        shipped = session.caption_bank or session.metrics
        return [
            gr.update(value=model),
            gr.update(choices=fmt.method_choices(methods), value=value),
            gr.update(visible=bool(session.caption_bank)),
            gr.update(visible=bool(session.metrics)),
            fmt.MODEL_NOTE["shipped" if shipped else "clip"],
            gr.update(info=fmt.placement_info(session)),
        ]

    def compare(
        self, image: Any, caption: Any, gmacs_ratio: Any, style: str, model: Any = None, placement: Any = None
    ) -> list[tuple[str, str]]:
        """Every method's overlay at matched GMACs (`Session.compare`), captioned for the gallery."""

        def run() -> list[tuple[str, str]]:
            source = self.source(image)
            session = self.models.get(model)
            ratio, where = parse_gmacs_ratio(gmacs_ratio), parse_placement(placement)
            with self.lock:
                results = session.compare(source, caption, style=style, gmacs_ratio=ratio, placement=where)
            return [(self.files.save(s.overlay), fmt.compare_caption(s)) for s in results]

        return guarded(run)
