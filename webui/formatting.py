"""Everything the page writes: method choices and notes (from the registry), tables, readouts and texts.

Pure functions of `vlm_demo` objects; nothing here echoes user text unescaped.
"""

from __future__ import annotations

from typing import Any

from vlm_demo import api, pruning



def method_choices(methods: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """(label, value) of `methods` for the selector, labels from the registry."""
    return [(pruning.get(m).label, m) for m in methods]


# The selector's order; the baseline is accepted by the API but not offered here.
METHOD_CHOICES = method_choices(pruning.names(prunes_only=True))
STYLE_CHOICES = [
    ("Dim dropped patches", "dim"),
    ("Grey out dropped patches", "grey"),
    ("Outline kept patches", "outline"),
]
COST_HEADERS = ["", "Baseline", "Pruned", "Ratio"]
CAPTION_HEADERS = ["rank", "baseline", "pruned"]

TITLE = "# Visual token pruning explorer"
INTRO = (
    "A ViT image encoder cuts a picture into {patches} patches ({grid} × {grid}) and runs a transformer over "
    "them; its cost grows with the number of patch tokens. *Token pruning* drops (or merges) the least useful "
    "tokens as they pass through the blocks. Upload an image, write a caption, pick a method and drag the keep "
    "ratio: the overlay shows which patches survive, the figures how well image and caption still align (cosine "
    "similarity, full model against pruned), and the cost table the tokens, GMACs and measured latency saved."
)
KEEP_RATIO_INFO = (
    "Fraction of the {patches} patches left after the last stage (earlier stages keep a share in between)."
)
COMPARE_NOTE = (
    "Every pruning method on the current image and caption **at matched compute**: each runs at the keep ratio "
    "whose GMACs (its scoring and any fused token included) come closest to the chosen share of the full model's. "
    "The papers count keep rates differently (a final share of tokens, a per-stage rate, or r merges per block), "
    "so one nominal keep ratio would cost each method something else. Captions: method · keep ratio · cosine · "
    "GMACs (share of the full model's); no timing, so it is quick."
)
PLACEMENT_LABELS = {
    "paper": "Each paper's blocks",
    "shared": "Shared blocks",
}


def placement_choices() -> list[tuple[str, str]]:
    """(label, value) of the named placements for the Advanced panel."""
    return [(PLACEMENT_LABELS.get(p, p), p) for p in pruning.PLACEMENTS]


def placement_info(session: api.Session) -> str:
    """Where each method's stages sit under each placement, for this model (from the registry)."""
    v = session.cfg.vision

    def where(placement: str) -> str:
        parts = []
        for m in session.methods(prunes_only=True):
            info = pruning.get(m)
            blocks = pruning.blocks_for(session.cfg, m, placement)
            side = "in" if info.inside else "before"
            parts.append(f"{info.label} {side} {', '.join(str(b) for b in blocks)}")
        return "; ".join(parts)

    return (
        f"Where the stages sit (blocks 0–{v.depth - 1}). Each paper's: {where('paper')}. "
        f"Shared: every method at the blocks the keep predictors were trained for: {where('shared')}."
    )
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
#kept-overlay .frame { display: grid; grid-template-columns: 1fr 1fr; gap: 6px; }
#kept-overlay .frame img { width: 100%; image-rendering: pixelated; }
#kept-overlay .frame .stages, #kept-overlay .frame .legend, #kept-overlay .frame table { grid-column: 1 / 3; }
#kept-overlay .scrub-status { font-style: italic; opacity: 0.8; }
#costs.stale { opacity: 0.45; }
#costs.stale::before { content: "measuring…"; font-style: italic; }
"""
MODEL_NOTE = {  # under the model selector, by what kind of model is on
    "shipped": "The shipped model: trained here on synthetic shapes (offline). Its test-set caption bank and "
    "accuracy-vs-compute curves are shown.",
    "clip": "A pretrained CLIP in the HuggingFace format. The overlays show the centre-cropped square it sees; "
    "there is no caption bank or evaluation curve for it here.",
}


def intro(session: api.Session) -> str:
    """The page's heading and first paragraph, with the model's patch grid."""
    v = session.cfg.vision
    grid = v.image_size // v.patch_size
    return f"{TITLE}\n{INTRO.format(patches=v.num_patches, grid=grid)}"


def method_note_text(method: Any) -> str:
    """The registry's line for `method`, its paper, and which weights it runs; "" for an unknown value."""
    if not isinstance(method, str) or method not in pruning.REGISTRY:
        return ""
    info = pruning.get(method)
    paper = "" if info.paper == "-" else f" ({info.paper})"
    weights = ""
    if info.needs_predictor:  # the shipped pruned/ fine-tuned its image tower; a CLIP's add-on runs the CLIP's
        weights = f" Runs the *{info.checkpoint}* checkpoint: its trained predictors, on its own image tower."
    return f"{info.summary}{paper}.{weights}"


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
        [f"Latency, batch 1 (ms, median ± IQR of {p.latency_repeats} interleaved pairs)",
         fmt_ms(b.latency_ms, b.latency_iqr_ms), fmt_ms(p.latency_ms, p.latency_iqr_ms),
         fmt_ratio(p.latency_ms, b.latency_ms)],
    ]  # fmt: skip
    if a.latency_bs32:
        tb, tp = a.latency_bs32["baseline"], a.latency_bs32["pruned"]
        rows.append(["Latency, batch 32 (ms, median ± IQR)", fmt_ms(tb.median_ms, tb.iqr_ms),
                     fmt_ms(tp.median_ms, tp.iqr_ms), fmt_ratio(tp.median_ms, tb.median_ms)])  # fmt: skip
    else:
        rows.append(["Latency, batch 32 (ms)", "—", "—", "—"])
    rows.append(["Caption's rank among the bank's captions (probability)", _standing(b), _standing(p), "—"])
    return rows


def _standing(side: api.Side) -> str:
    if side.bank_rank is None or side.bank_probability is None:
        return "—"
    return f"#{side.bank_rank} ({side.bank_probability:.2f})"


def caption_rows(a: api.Analysis) -> list[list[Any]]:
    """Top captions of the test-set bank, baseline against pruned."""
    b, p = a.baseline.top_captions, a.pruned.top_captions
    if not b and not p:
        return [[1, "No caption bank (caption_bank.json) in the checkpoints folder.", "—"]]

    def cell(pairs: list[tuple[str, float]], i: int) -> str:
        return f"{pairs[i][0]}  ({pairs[i][1]:.3f})" if i < len(pairs) else "—"

    return [[i + 1, cell(b, i), cell(p, i)] for i in range(max(len(b), len(p)))]


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


def compare_caption(s: api.MethodSummary) -> str:
    """A gallery caption of the side-by-side comparison: method, keep ratio, alignment and GMACs."""
    return (
        f"{pruning.get(s.method).label} · keep {s.keep_ratio:.2f} · {s.score:.3f} · {s.gmacs:.3g} GMACs "
        f"({s.gmacs_ratio:.2f}×)"
    )


def session_lines(session: api.Session) -> list[str]:
    """Start-up log lines: one per checkpoint loaded, then what else the folder held."""
    v = session.cfg.vision
    models = [("baseline", session.baseline)]
    if session.pruned is not session.baseline:  # else api.load has warned that pruned/ is missing
        models.append(("pruned", session.pruned))
    models += list(session.others.items())
    lines = [
        f"Loaded {name}/ from {session.source}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters, "
        f"{v.image_size} px images, {v.num_patches} patches"
        for name, m in models
    ]
    rows = len((session.metrics or {}).get("rows") or [])
    lines.append(f"Caption bank: {len(session.caption_bank)} captions; metrics.json: {rows} rows")
    return lines
