"""Visual token pruning explorer: a thin Gradio page over `vlm_demo.api`.

    python app.py [--checkpoints DIR_OR_HUB_REPO] [--host 127.0.0.1] [--port 7860] [--device cpu] [--queue-size 64]

Everything that computes lives in `vlm_demo.api`, and the plumbing (files,
uploads, formatting, warm-up, errors, signals) in `webui`; this file parses the
arguments, loads the checkpoints once, lays out the page and wires its events.

Public API (stable): one endpoint, ``/analyze``, with inputs ``image``
(filepath), ``caption`` (str), ``method`` (learned, cls_attention, text_guided,
tome, random or none) and ``keep_ratio`` (float in (0, 1]); it returns the
kept-patch overlay (a PNG) and ``Analysis.to_dict()``. Every other event is
private.
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
                   help="folder with baseline/ and pruned/, or a Hub repo id (default: checkpoints)")  # fmt: skip
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
from webui import warmup  # noqa: E402
from webui.files import OutputFiles  # noqa: E402
from webui.handlers import DEFAULT_REPEATS, DEFAULT_STYLE, UI_OUTPUTS, Explorer  # noqa: E402
from webui.inputs import MAX_UPLOAD_BYTES, load_examples  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent / "docs" / "examples"
DEFAULT_METHOD = "learned"
DEFAULT_KEEP_RATIO = 0.5
IMAGE = {"type": "filepath", "format": "png", "interactive": False, "buttons": ["download", "fullscreen"],
         "elem_classes": "pixel-art"}  # fmt: skip  (the output images)
MODEL_EVENT = {"concurrency_id": "model", "concurrency_limit": 1, "preprocess": False}


# ----------------------------------------------------------------------------- the page


def input_column(app: Explorer, examples: list[list[str]], first: dict[str, Any]) -> dict[str, Any]:
    """Image, caption, method, keep ratio and the advanced options; returns the components by name."""
    initial = examples[0] if first else [None, ""]
    c: dict[str, Any] = {}
    c["image"] = gr.Image(value=initial[0], type="filepath", sources=["upload", "clipboard", "webcam"],
                          image_mode=None, label="Image", height=300, elem_id="input-image")  # fmt: skip
    c["caption"] = gr.Textbox(value=initial[1], label="Caption", lines=2, max_lines=6,
                              placeholder="e.g. a small red circle at the top left", elem_id="caption")  # fmt: skip
    c["method"] = gr.Radio(fmt.METHOD_CHOICES, value=DEFAULT_METHOD, label="Pruning method", elem_id="method")
    c["method_note"] = gr.Markdown(fmt.method_note_text(DEFAULT_METHOD), elem_id="method-note")
    c["keep_ratio"] = gr.Slider(0.05, 1.0, value=DEFAULT_KEEP_RATIO, step=0.05, label="Keep ratio",
                                info=fmt.KEEP_RATIO_INFO.format(patches=app.num_patches),
                                elem_id="keep-ratio")  # fmt: skip
    with gr.Accordion("Advanced", open=False):
        c["style"] = gr.Radio(fmt.STYLE_CHOICES, value=DEFAULT_STYLE, label="Overlay style")
        c["repeats"] = gr.Slider(1, 50, value=DEFAULT_REPEATS, step=1, label="Latency repeats",
                                 info="Timed batch-1 passes per model, interleaved, after 2 warm-up passes.")
        c["batch32"] = gr.Checkbox(False, label="also time batch 32", info="About 30× the work: slower.")
    c["run"] = gr.Button("Analyze", variant="primary")
    c["status"] = gr.Markdown(first.get("status", ""), elem_id="status")
    c["api"] = gr.Button("analyze (API)", visible=False)  # the public /analyze: exactly the 4 contract inputs
    if examples:
        gr.Examples(examples, inputs=[c["image"], c["caption"]], cache_examples=False, examples_per_page=8,
                    label="Examples: synthetic test scenes and a public-domain photo")  # fmt: skip
    return c


def analysis_tab(first: dict[str, Any]) -> dict[str, Any]:
    """Overlays, scores, the cost table and the closest captions; returns the components by name."""
    c: dict[str, Any] = {}
    with gr.Row():
        c["overlay"] = gr.Image(first.get("overlay"), label="Kept patches", height=300, elem_id="overlay", **IMAGE)
        c["detail"] = gr.Image(first.get("detail"), label=first.get("detail_label", fmt.DETAIL_LABELS["heatmap"]),
                               height=300, elem_id="detail", **IMAGE)  # fmt: skip
    c["strip"] = gr.Image(first.get("strip"), label="Tokens left after each stage", height=180, elem_id="strip",
                          **IMAGE)  # fmt: skip
    with gr.Row():
        for name, label in fmt.SCORE_LABELS.items():
            c[name] = gr.Number(first.get(name), label=label, interactive=False, precision=4)
    c["costs"] = gr.Dataframe(first.get("costs"), headers=fmt.COST_HEADERS, datatype="str", interactive=False,
                              label="Cost: baseline against pruned", column_widths=["34%", "22%", "22%", "22%"],
                              wrap=True, elem_id="costs")  # fmt: skip
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
            c["compare"] = gr.Button("Compare all methods", variant="primary")
            c["gallery"] = gr.Gallery(label="Kept patches per method", columns=3, height=520, object_fit="contain",
                                      format="png", elem_id="gallery")  # fmt: skip
        with gr.Tab("JSON"):
            c["readout"] = gr.JSON(first.get("readout"), label="Analysis.to_dict()", open=True, elem_id="readout")
    return c


def wire(app: Explorer, c: dict[str, Any]) -> None:
    """The events: the public /analyze, the page's own (private) analysis, method note and comparison."""
    outputs = [c[name] for name in UI_OUTPUTS]
    ui_inputs = [c[name] for name in ("image", "caption", "method", "keep_ratio", "style", "repeats", "batch32")]
    last_run = gr.State({})  # per browser session: the inputs and end time of the last live run
    c["api"].click(app.analyze, [c["image"], c["caption"], c["method"], c["keep_ratio"]], [c["overlay"], c["readout"]],
                   api_name="analyze", api_visibility="public", **MODEL_EVENT)  # fmt: skip
    c["run"].click(lambda *a: app.ui_analyze(*a, live=False), [*ui_inputs, last_run], outputs,
                   api_name="analyze_ui", api_visibility="private", **MODEL_EVENT)  # fmt: skip
    changes = [c[n].change for n in ("image", "caption", "method", "keep_ratio", "style", "batch32")]
    gr.on([*changes, c["repeats"].release], lambda *a: app.ui_analyze(*a, live=True), [*ui_inputs, last_run], outputs,
          api_name="analyze_live", api_visibility="private", trigger_mode="always_last", show_progress="minimal",
          **MODEL_EVENT)  # fmt: skip
    # Unprocessed: Gradio's own check of a Radio echoes a bad value, unescaped, in its error.
    c["method"].change(fmt.method_note_text, c["method"], c["method_note"], api_name="method_note",
                       api_visibility="private", show_progress="hidden", queue=False, preprocess=False)  # fmt: skip
    c["compare"].click(app.compare, [c["image"], c["caption"], c["keep_ratio"], c["style"]], c["gallery"],
                       api_name="compare", api_visibility="private", **MODEL_EVENT)  # fmt: skip


def build_demo(app: Explorer, examples_dir: Path = EXAMPLES_DIR, prefill: bool = True) -> gr.Blocks:
    """The page; with `prefill`, it opens with the first example analysed."""
    gr.set_static_paths([str(app.files.folder)])  # served in place: no copy into Gradio's hash-named cache
    examples = load_examples(examples_dir)
    first = warmup.prefill(app, examples[0], DEFAULT_METHOD, DEFAULT_KEEP_RATIO) if prefill and examples else {}
    with gr.Blocks(title="Visual token pruning explorer", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(fmt.intro(app.session), elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                c = input_column(app, examples, first)
            with gr.Column(scale=6, min_width=420):
                c |= output_column(first)
        c["plot"] = gr.Plot(first.get("plot"), label="Accuracy vs compute", show_label=False, format="png",
                            elem_id="tradeoff")  # fmt: skip
        wire(app, c)
    return demo


# ----------------------------------------------------------------------------- start-up


def main(args: argparse.Namespace) -> None:
    """Load the checkpoints once, serve the page until SIGINT or SIGTERM, then exit 0 (see `webui.lifecycle`)."""
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

    files = OutputFiles()
    shutdown.on_exit(files.remove)
    app = Explorer(session, files)
    demo = build_demo(app, prefill=not args.no_prefill)
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
        shutdown.on_exit(warmup.GmacsWarmup(session, app.lock, DEFAULT_METHOD).start().stop)
    shutdown.serve()
    shutdown.exit(0)


if __name__ == "__main__":
    main(ARGS)
