"""Visual token pruning explorer: a thin Gradio page over `vlm_demo.api`.

    python app.py [--checkpoints DIR_OR_HUB_REPO] [--host 127.0.0.1] [--port 7860] [--device cpu] [--queue-size 64]

Everything that computes lives in `vlm_demo.api`, and the plumbing (files,
uploads, formatting, warm-up, errors, signals) in `webui`; this file parses the
arguments, loads the checkpoints once, lays out the page and wires its events.

Public API (stable): ``/analyze``, with inputs ``image`` (filepath), ``caption``
(str), ``method`` (learned, cls_attention, text_guided, tome, random or none) and
``keep_ratio`` (float in (0, 1]), returns the kept-patch overlay (a PNG) and
``Analysis.to_dict()``; ``/sweep`` (image, caption, method) returns every slider
stop's figures as JSON. Every other event is private.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from webui import lifecycle  # standard library only

QUEUE_SIZE = 64  # requests that may wait for the model; more are answered "busy" (HTTP 503)


# ----------------------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A user mistake: one line, exit status 2 (argparse's own prints the usage first)."""
        fail(f"{message} (see --help)")


def fail(message: str) -> NoReturn:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def port(value: str) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: give a number from 1 to 65535")
    return int(value)


def positive(value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: give a whole number of at least 1")
    return int(value)


def build_parser() -> Parser:
    p = Parser(description="Visual token pruning explorer (Gradio).")
    p.add_argument("--checkpoints", default="checkpoints",
                   help="folder with baseline/ and pruned/, a HuggingFace CLIP folder or Hub id, or a keep-predictor "
                        "add-on (default: checkpoints)")  # fmt: skip
    p.add_argument("--models", action="append", default=[], metavar="SOURCE",
                   help="another model the page offers (repeatable): a CLIP folder, a Hub id owner/name[@revision] "
                        "or an add-on; also $VLM_DEMO_MODELS, comma-separated; each loads on first use "
                        "(default: none)")  # fmt: skip
    p.add_argument("--host", default=None, help="address to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=port, default=None,
                   help="port (default: the first free one from $GRADIO_SERVER_PORT or 7860)")  # fmt: skip
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (default: off)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device (default: cpu)")
    p.add_argument("--no-warmup", action="store_true", help="skip the background GMACs warm-up (default: warm up)")
    p.add_argument("--no-prefill", action="store_true",
                   help="open the page empty instead of analysing an example (default: analyse one)")  # fmt: skip
    p.add_argument("--queue-size", type=positive, default=QUEUE_SIZE,
                   help=f"requests that may wait; more are answered 'busy' (default: {QUEUE_SIZE})")  # fmt: skip
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; a mistake prints one ``error:`` line and exits 2."""
    p = build_parser()
    args = p.parse_args(argv)
    if os.environ.get("GRADIO_SERVER_PORT"):  # Gradio reads it as it is imported, and fails with a traceback
        try:
            port(os.environ["GRADIO_SERVER_PORT"])
        except argparse.ArgumentTypeError as e:
            p.error(f"$GRADIO_SERVER_PORT: {e}")
    return args


if __name__ == "__main__":  # before the slow imports: a signal at any moment exits 0, a mistake at once
    lifecycle.Shutdown.install()
    ARGS = parse_args()

import gradio as gr  # noqa: E402

from vlm_demo import api  # noqa: E402
from webui import formatting as fmt  # noqa: E402
from webui import models, scrub, warmup  # noqa: E402
from webui.files import OutputFiles  # noqa: E402
from webui.handlers import DEFAULT_REPEATS, DEFAULT_STYLE, UI_OUTPUTS, Explorer  # noqa: E402
from webui.inputs import MAX_UPLOAD_BYTES, load_examples  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent / "docs" / "examples"
DEFAULT_METHOD = "learned"
DEFAULT_KEEP_RATIO = 0.52  # a stop of the slider (api.SWEEP_STOPS)
DEFAULT_GMACS_RATIO = 0.5  # the comparison tab's matched compute: half the full model's GMACs
MODEL_EVENT = {"concurrency_id": "model", "concurrency_limit": 1, "preprocess": False}


# ----------------------------------------------------------------------------- the page


def input_column(app: Explorer, examples: list[list[str]], first: dict[str, Any]) -> dict[str, Any]:
    """Image, caption, method, keep ratio and the advanced options; returns the components by name."""
    initial = examples[0] if first else [None, ""]
    c: dict[str, Any] = {}
    c["model"] = gr.Dropdown(app.models.choices(), value=app.models.default, label="Model", elem_id="model")
    c["model_note"] = gr.Markdown(first.get("model_note", ""), elem_id="model-note")
    c["image"] = gr.Image(value=initial[0], type="filepath", sources=["upload", "clipboard", "webcam"],
                          image_mode=None, label="Image", height=300, elem_id="input-image")  # fmt: skip
    c["caption"] = gr.Textbox(value=initial[1], label="Caption", lines=2, max_lines=6,
                              placeholder="e.g. a small red circle at the top left", elem_id="caption")  # fmt: skip
    methods = app.session.methods(prunes_only=True)
    method = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
    c["method"] = gr.Radio(fmt.method_choices(methods), value=method, label="Pruning method", elem_id="method")
    c["method_note"] = gr.Markdown(fmt.method_note_text(method), elem_id="method-note")
    stops = api.SWEEP_STOPS
    c["keep_ratio"] = gr.Slider(stops[0], stops[-1], value=DEFAULT_KEEP_RATIO, step=stops[1] - stops[0],
                                label="Keep ratio",
                                info=fmt.KEEP_RATIO_INFO.format(patches=app.num_patches),
                                elem_id="keep-ratio")  # fmt: skip
    with gr.Accordion("Advanced", open=False):
        c["style"] = gr.Radio(fmt.STYLE_CHOICES, value=DEFAULT_STYLE, label="Overlay style")
        c["repeats"] = gr.Slider(1, 50, value=DEFAULT_REPEATS, step=1, label="Latency repeats",
                                 info="Timed batch-1 passes per model, interleaved, after 2 warm-up passes.")
        c["batch32"] = gr.Checkbox(False, label="also time batch 32", info="About 30× the work: slower.")
        c["placement"] = gr.Radio(fmt.placement_choices(), value=fmt.placement_choices()[0][1], label="Stage placement",
                                  info=fmt.placement_info(app.session), elem_id="placement")  # fmt: skip
    c["run"] = gr.Button("Analyze", variant="primary")
    c["status"] = gr.Markdown(first.get("status", ""), elem_id="status")
    c["api"] = gr.Button("analyze (API)", visible=False)  # the public /analyze: exactly the 4 contract inputs
    c["api_sweep"] = gr.Button("sweep (API)", visible=False)  # the public /sweep: image, caption, method
    c["overlay"] = gr.Image(type="filepath", format="png", visible=False)  # /analyze's overlay file
    c["sweep_json"] = gr.JSON(visible=False)  # /sweep's figures
    if examples:
        gr.Examples(examples, inputs=[c["image"], c["caption"]], cache_examples=False, examples_per_page=8,
                    label="Examples: synthetic test scenes, and public-domain and CC0 photos")  # fmt: skip
    return c


def analysis_tab(first: dict[str, Any]) -> dict[str, Any]:
    """Every slider stop's overlays and figures (swapped in the browser), the settled costs and captions."""
    c: dict[str, Any] = {}
    c["frames"] = gr.HTML(first.get("frames", ""), elem_id="kept-overlay", label="Kept patches")
    c["costs"] = gr.Dataframe(first.get("costs"), headers=fmt.COST_HEADERS, datatype="str", interactive=False,
                              label="Cost at the settled keep ratio: baseline against pruned",
                              column_widths=["34%", "22%", "22%", "22%"], wrap=True, elem_id="costs")  # fmt: skip
    gr.Markdown(fmt.COST_NOTE, elem_id="cost-note")
    c["captions"] = gr.Dataframe(first.get("captions"), headers=fmt.CAPTION_HEADERS, datatype=["number", "str", "str"],
                                 interactive=False, wrap=True, column_widths=["10%", "45%", "45%"],
                                 label="Closest captions of the test-set caption bank (cosine)",
                                 elem_id="captions")  # fmt: skip
    return c


def output_column(first: dict[str, Any]) -> dict[str, Any]:
    """The tabs: analysis, compare all methods, JSON; returns the components by name."""
    with gr.Tabs():
        with gr.Tab("Analysis"):
            c = analysis_tab(first)
        with gr.Tab("Compare all methods"):
            gr.Markdown(fmt.COMPARE_NOTE)
            c["gmacs_ratio"] = gr.Slider(0.2, 1.0, value=DEFAULT_GMACS_RATIO, step=0.05, label="GMACs ratio",
                                         info="Share of the full model's GMACs every method is matched to.",
                                         elem_id="gmacs-ratio")  # fmt: skip
            c["compare"] = gr.Button("Compare all methods", variant="primary")
            c["gallery"] = gr.Gallery(label="Kept patches per method", columns=3, height=520, object_fit="contain",
                                      format="png", elem_id="gallery")  # fmt: skip
        with gr.Tab("JSON"):
            c["readout"] = gr.JSON(first.get("readout"), label="Analysis.to_dict()", open=True, elem_id="readout")
    return c


def wire(app: Explorer, c: dict[str, Any]) -> None:
    """The events: the public /analyze and /sweep; the page's sweep, slider scrubbing and settled analysis."""
    outputs = [c[name] for name in UI_OUTPUTS]
    ui_inputs = [c[name] for name in ("image", "caption", "method", "keep_ratio", "style", "repeats", "batch32",
                                      "model", "placement")]  # fmt: skip
    last_run = gr.State({})  # per browser session: the inputs and end time of the last settled run
    c["api"].click(app.analyze, [c["image"], c["caption"], c["method"], c["keep_ratio"]], [c["overlay"], c["readout"]],
                   api_name="analyze", api_visibility="public", **MODEL_EVENT)  # fmt: skip
    c["api_sweep"].click(app.sweep, [c["image"], c["caption"], c["method"]], c["sweep_json"], api_name="sweep",
                         api_visibility="public", **MODEL_EVENT)  # fmt: skip
    c["model"].change(app.select_model, [c["model"], c["method"]],
                      [c["model"], c["method"], c["captions"], c["plot"], c["model_note"], c["placement"]],
                      api_name="select_model",
                      api_visibility="private", **MODEL_EVENT)  # fmt: skip
    # A new input: every stop at once (the slider's own first), then the analysis at the slider's stop.
    sweep_inputs = [c[name] for name in ("image", "caption", "method", "keep_ratio", "style", "model", "placement")]
    changes = ("image", "caption", "method", "style", "model", "placement")
    new_input = [c[n].change for n in changes] + [c["run"].click]
    gr.on(new_input, app.ui_sweep, [*sweep_inputs, last_run], c["frames"], api_name="sweep_ui",
          api_visibility="private", trigger_mode="always_last", show_progress="minimal", **MODEL_EVENT,  # fmt: skip
          ).then(None, c["keep_ratio"], None, js=scrub.SWAP_JS, queue=False,
          ).then(lambda *a: app.ui_analyze(*a, live=False), [*ui_inputs, last_run], outputs, api_name="analyze_ui",
                 api_visibility="private", **MODEL_EVENT,
          ).then(None, c["keep_ratio"], None, js=scrub.SETTLED_JS, queue=False)  # fmt: skip
    # The slider: frames swap in the browser at once; the server measures where it rests (300 ms).
    c["keep_ratio"].input(None, c["keep_ratio"], None, js=scrub.SWAP_JS, queue=False)
    c["keep_ratio"].change(None, c["keep_ratio"], None, js=scrub.SWAP_JS, queue=False)
    gr.on([c["keep_ratio"].change, c["repeats"].release, c["batch32"].change],
          lambda *a: app.ui_analyze(*a, {}, live=True), ui_inputs, outputs, js=scrub.DEBOUNCE_JS,
          api_name="analyze_live", api_visibility="private", trigger_mode="always_last", show_progress="hidden",
          **MODEL_EVENT).then(None, c["keep_ratio"], None, js=scrub.SETTLED_JS, queue=False)  # fmt: skip
    # Unprocessed: Gradio's own check of a Radio echoes a bad value, unescaped, in its error.
    c["method"].change(fmt.method_note_text, c["method"], c["method_note"], api_name="method_note",
                       api_visibility="private", show_progress="hidden", queue=False, preprocess=False)  # fmt: skip
    compare_inputs = [c[name] for name in ("image", "caption", "gmacs_ratio", "style", "model", "placement")]
    c["compare"].click(app.compare, compare_inputs, c["gallery"], api_name="compare", api_visibility="private",
                       **MODEL_EVENT)  # fmt: skip


def build_demo(
    app: Explorer, examples_dir: Path = EXAMPLES_DIR, prefill: bool = True, photos_first: bool = False
) -> gr.Blocks:
    """The page; with `prefill`, it opens with the first example analysed (a photo first with `photos_first`)."""
    gr.set_static_paths([str(app.files.folder)])  # served in place: no copy into Gradio's hash-named cache
    examples = load_examples(examples_dir, photos_first)
    method = DEFAULT_METHOD if DEFAULT_METHOD in app.session.methods() else app.session.methods(prunes_only=True)[0]
    first = warmup.prefill(app, examples[0], method, DEFAULT_KEEP_RATIO) if prefill and examples else {}
    first["model_note"] = fmt.MODEL_NOTE["shipped" if app.session.caption_bank or app.session.metrics else "clip"]
    with gr.Blocks(title="Visual token pruning explorer", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(fmt.intro(app.session), elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                c = input_column(app, examples, first)
            with gr.Column(scale=6, min_width=420):
                c |= output_column(first)
        c["plot"] = gr.Plot(first.get("plot"), label="Accuracy vs compute", show_label=False, format="png",
                            elem_id="tradeoff", visible=bool(app.session.metrics))  # fmt: skip
        wire(app, c)
    return demo


# ----------------------------------------------------------------------------- start-up


def main(args: argparse.Namespace) -> None:
    """Load the models once, serve the page until SIGINT or SIGTERM, then exit 0 (see `webui.lifecycle`)."""
    shutdown = lifecycle.Shutdown.install()
    if problem := lifecycle.bind_error(args.host, args.port):  # before the slow load, and clearer than Gradio's
        fail(problem)
    lifecycle.limit_malloc_arenas()  # before the server's threads start
    lifecycle.configure_logging()
    try:
        with lifecycle.without_prints():
            session = api.load(args.checkpoints, args.device)
    except (ValueError, ConnectionError, OSError) as e:
        fail(e)
    for line in fmt.session_lines(session):
        lifecycle.log.info(line)
    extra = models.sources(args.models)
    on_space = bool(os.environ.get("SPACE_ID")) and models.preloaded()
    if on_space:  # the Space opens on the preloaded real CLIP, with a real photo
        extra = list(dict.fromkeys([models.SPACE_MODEL, *extra]))
    hub = models.Models(session, args.checkpoints, extra, args.device)
    if on_space:
        try:
            hub.get(models.SPACE_MODEL)
            hub.default = models.SPACE_MODEL
        except ValueError as e:
            lifecycle.log.warning("The Space's model did not load, opening on the shipped one: %s", e)

    files = OutputFiles()
    shutdown.on_exit(files.remove)
    app = Explorer(hub, files)
    demo = build_demo(app, prefill=not args.no_prefill, photos_first=hub.default != hub.shipped)
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=gr.themes.Soft(),
                    css=fmt.CSS, max_file_size=MAX_UPLOAD_BYTES, allowed_paths=[str(files.folder)],
                    prevent_thread_lock=True, quiet=True)  # fmt: skip
    except OSError as e:  # the port is taken, or the host is not this machine's
        files.remove()
        fail(f"cannot serve on {args.host or '127.0.0.1'}:{args.port or 7860}: {e}")
    shutdown.on_exit(lambda: lifecycle.close_server(demo))
    share = f" and {demo.share_url}" if args.share else ""
    lifecycle.log.info("Serving on %s%s (Ctrl-C to stop)", demo.local_url, share)
    if not args.no_warmup:  # after the server is up, so the first request is not starved
        shutdown.on_exit(warmup.GmacsWarmup(app.session, app.lock, DEFAULT_METHOD).start().stop)
    shutdown.serve()
    shutdown.exit(0)


if __name__ == "__main__":
    main(ARGS)
