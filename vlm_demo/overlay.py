"""Overlays that draw a pruning `Trace` over the input image.

Every function here is pure: it takes a PIL image and a `Trace` (plus which
sample of the batch and which stage to draw) and returns a *new* RGB PIL image
of exactly the input's size. The input image and the trace are never modified,
and nothing touches global state (no ``matplotlib.pyplot``); the drawing is
plain numpy on a per-pixel patch-index map, so one call takes a few
milliseconds even for a 512 x 512 image.

The model resizes images to a square *without cropping*, so the patch grid is
stretched over the whole image, whatever its aspect ratio (`patch_boxes`).

Stages are indexed like a Python list into ``trace.stages`` (``-1`` is the
last). A trace with no stages (keep ratio 1, or method ``none``) means that
every patch was kept.

Shape legend: P patches of the grid (``grid * grid``, row-major), H x W the
image in pixels.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .pruning import Stage, Trace

STYLES: tuple[str, ...] = ("dim", "grey", "outline")

_DIM = 0.3  # "dim": dropped patches keep 30% of their brightness
_OUTLINE_RGB = np.array([255, 196, 0], dtype=np.float32)  # amber border around kept patches
_GRID_ALPHA = 0.25  # grid lines: a light or dark hint, whichever contrasts with the pixel
_MIN_CELL_PX = 4  # below this patch size, lines would cover the patches, so none are drawn
_HEAT_ALPHA = 0.6  # weight of the colour map over the image in `heatmap_overlay`
_GROUP_ALPHA = 0.55  # tint of merge groups of two or more patches
_SINGLE_ALPHA = 0.15  # tint of groups of one patch ("shown lightly")

# matplotlib's "inferno" sampled at 17 evenly spaced points; interpolated linearly
# in between, so the library does not need matplotlib at all.
_INFERNO = np.array(
    [
        [0, 0, 4], [11, 7, 36], [33, 12, 74], [61, 9, 101], [87, 16, 110], [113, 25, 110],
        [138, 34, 106], [163, 44, 97], [188, 55, 84], [210, 70, 68], [228, 90, 49],
        [241, 115, 29], [249, 142, 9], [252, 172, 17], [249, 203, 53], [242, 234, 105],
        [252, 255, 164],
    ],
    dtype=np.float32,
)  # fmt: skip


# ----------------------------------------------------------------------------- geometry


def _edges(length: int, grid: int) -> np.ndarray:
    """Pixel edges of ``grid`` cells over ``length`` pixels: (grid + 1,) ints, 0 .. length."""
    return np.array([round(i * length / grid) for i in range(grid + 1)], dtype=np.int64)


def patch_boxes(size: tuple[int, int], grid: int) -> list[tuple[int, int, int, int]]:
    """Pixel rectangles of the patches, in patch order (row-major).

    Edges are rounded from ``i * side / grid``, so the rectangles tile the image
    exactly even when the side does not divide by the grid (some patches are
    then one pixel wider than others; on an image smaller than the grid some
    are empty).

    Args:
        size: (width, height) of the image, as PIL reports it.
        grid: patches per side.

    Returns:
        P boxes ``(x0, y0, x1, y1)`` with exclusive ``x1, y1`` (PIL's crop convention).
    """
    if grid < 1:
        raise ValueError(f"grid must be a positive number of patches per side, got {grid!r}.")
    w, h = size
    xs, ys = _edges(w, grid).tolist(), _edges(h, grid).tolist()
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(grid) for c in range(grid)]


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class _Canvas:
    """An RGB image as a float32 array, drawn on with whole-frame numpy operations.

    Boolean-mask indexing of a full frame is slow in numpy, so per-patch values
    are expanded to pixels with `np.repeat` and blended with alpha maps; only
    thin lines are drawn by index.
    """

    def __init__(self, image: Image.Image, grid: int):
        if not isinstance(image, Image.Image):
            raise ValueError(f"Expected a PIL image, got {type(image).__name__}.")
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        w, h = rgb.size
        self.grid = grid
        self.rgb = np.array(rgb, dtype=np.float32)  # (H, W, 3); a copy, never the input's buffer
        self.xs, self.ys = _edges(w, grid), _edges(h, grid)
        self.cell = min(w, h) / grid  # patch side in pixels (the shorter one)

    def per_pixel(self, values: np.ndarray) -> np.ndarray:
        """(P, ...) per-patch values -> (H, W, ...) per-pixel values."""
        v = values.reshape(self.grid, self.grid, *values.shape[1:])
        return v.repeat(np.diff(self.ys), axis=0).repeat(np.diff(self.xs), axis=1)

    def image(self) -> Image.Image:
        # Every drawing step blends values in [0, 255], so no clipping is needed;
        # +0.5 rounds, and leaves untouched (integer) pixels exactly as they were.
        return Image.fromarray((self.rgb + 0.5).astype(np.uint8), "RGB")

    def scale(self, factor: np.ndarray) -> None:
        """Multiply each patch's pixels by its (P,) factor."""
        if np.any(factor != 1.0):
            self.rgb *= self.per_pixel(factor.astype(np.float32))[..., None]

    def mix(self, alpha: np.ndarray, color: np.ndarray) -> None:
        """Blend ``color`` ((P, 3) per patch) over the image with (P,) per-patch weights."""
        if np.any(alpha > 0):
            a = self.per_pixel(alpha.astype(np.float32))[..., None]
            self.rgb += (self.per_pixel(color.astype(np.float32)) - self.rgb) * a

    def grey_out(self, patches: np.ndarray) -> None:
        """Desaturate the (P,) bool ``patches`` and lift them towards white."""
        if np.any(patches):
            grey = (110.0 + 0.5 * (self.rgb @ _LUMA))[..., None]  # (H, W, 1)
            self.rgb += (grey - self.rgb) * self.per_pixel(patches.astype(np.float32))[..., None]

    def paint(self, mask: np.ndarray, color: np.ndarray, alpha: float) -> None:
        """Blend one (3,) colour into the (H, W) bool ``mask`` pixels (a thin line or border)."""
        idx = np.nonzero(mask)
        self.rgb[idx] = self.rgb[idx] * (1.0 - alpha) + color * alpha

    def grid_lines(self) -> None:
        """Thin, semi-transparent patch grid lines: light on dark pixels, dark on light ones."""
        if self.cell < _MIN_CELL_PX:
            return
        for axis, edges in ((0, self.ys), (1, self.xs)):
            lines = edges[1:-1]
            px = np.take(self.rgb, lines, axis=axis)
            target = np.where((px @ _LUMA)[..., None] < 128.0, np.float32(255.0), np.float32(0.0))
            px += (target - px) * _GRID_ALPHA
            if axis == 0:
                self.rgb[lines] = px
            else:
                self.rgb[:, lines] = px

    def region_border(self, inside: np.ndarray, thickness: int, image_edge: bool = True) -> np.ndarray:
        """(H, W) pixels of ``inside`` within ``thickness`` px of its edge (and of the image's, if ``image_edge``)."""
        t = thickness
        h, w = inside.shape
        core = np.pad(inside, t, constant_values=not image_edge)
        # A square erosion, done separably: first along x, then along y.
        row = core[:, t : t + w].copy()
        for d in range(1, t + 1):
            row &= core[:, t - d : t - d + w] & core[:, t + d : t + d + w]
        eroded = row[t : t + h].copy()
        for d in range(1, t + 1):
            eroded &= row[t - d : t - d + h] & row[t + d : t + d + h]
        return inside & ~eroded


# ----------------------------------------------------------------------------- reading the trace


def _check_sample(trace: Trace, sample: int) -> None:
    if not isinstance(sample, (int, np.integer)) or sample < 0:
        raise ValueError(f"sample must be a non-negative batch index, got {sample!r}.")
    if trace.stages and sample >= trace.stages[0].kept.shape[0]:
        raise ValueError(f"sample {sample} is out of range: the trace holds {trace.stages[0].kept.shape[0]} samples.")


def _get_stage(trace: Trace, stage: int) -> Stage:
    n = len(trace.stages)
    if not -n <= stage < n:
        raise ValueError(f"stage {stage} is out of range: the trace has {n} pruning stages (use 0..{n - 1} or -1).")
    return trace.stages[stage]


def _kept_mask(trace: Trace, sample: int, stage: int | None) -> np.ndarray:
    """(P,) bool: patches that are (or represent) tokens after ``stage``; all when None or unpruned."""
    P = trace.num_patches
    if stage is None or not trace.stages:
        return np.ones(P, dtype=bool)
    kept = _get_stage(trace, stage).kept[sample].detach().cpu().numpy()
    mask = np.zeros(P, dtype=bool)
    mask[kept[kept >= 0]] = True  # -1 is a fused token: it has no position to draw
    return mask


def _token_label(trace: Trace, sample: int, stage: int | None) -> str:
    if stage is None or not trace.stages:
        return f"all {trace.num_patches}"
    st = _get_stage(trace, stage)
    kept = st.kept[sample]
    fused = int((kept < 0).sum())
    return f"block {st.block}: {int((kept >= 0).sum())}" + (f"+{fused} fused" if fused else "")


# ----------------------------------------------------------------------------- overlays


def _draw_kept(canvas: _Canvas, keep: np.ndarray, style: str) -> None:
    """Draw a (P,) keep mask in ``style`` onto ``canvas`` (in place)."""
    if style not in STYLES:
        raise ValueError(f"Unknown overlay style {style!r}; choose one of {', '.join(STYLES)}.")
    if style == "dim":
        canvas.scale(np.where(keep, 1.0, _DIM))
    elif style == "grey":
        canvas.grey_out(~keep)
    if style != "outline":
        canvas.grid_lines()
    if canvas.cell < _MIN_CELL_PX or keep.all():
        return
    inside = canvas.per_pixel(keep)  # (H, W)
    if style == "outline":
        # A dark hairline just outside the border keeps it visible on yellow and bright areas too.
        canvas.paint(canvas.region_border(~inside, 1, image_edge=False), np.zeros(3, np.float32), 0.6)
        canvas.paint(canvas.region_border(inside, max(1, round(canvas.cell / 12))), _OUTLINE_RGB, 1.0)
    else:  # subtle: just enough for the kept region to pop
        canvas.paint(canvas.region_border(inside, max(1, round(canvas.cell / 24))), _OUTLINE_RGB, 0.6)


def kept_overlay(
    image: Image.Image, trace: Trace, sample: int = 0, stage: int = -1, style: str = "dim"
) -> Image.Image:
    """Show which patches are still tokens after a stage.

    Kept patches keep their exact colours (away from the thin grid lines and
    the border drawn around the kept region). For ToMe, where every patch
    belongs to some token, the token's representative patch (``Stage.kept``)
    counts as kept.

    Args:
        image: any PIL image; any size and aspect ratio.
        trace: the trace of the forward pass that saw ``image``.
        sample: which sample of the batch.
        stage: index into ``trace.stages`` (-1: the last); ignored when nothing was pruned.
        style: one of `STYLES`: ``"dim"`` darkens dropped patches by ~70%,
            ``"grey"`` desaturates and lightens them, ``"outline"`` leaves the
            image as it is and only draws a coloured border around kept patches.

    Returns:
        A new RGB image of the input's size.
    """
    _check_sample(trace, sample)
    keep = _kept_mask(trace, sample, stage)
    canvas = _Canvas(image, trace.grid)
    _draw_kept(canvas, keep, style)
    return canvas.image()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def stage_strip(image: Image.Image, trace: Trace, sample: int = 0, style: str = "dim") -> Image.Image:
    """Panels side by side: the input (all patches), then the tokens left after each stage.

    Each panel is `kept_overlay` of a thumbnail, labelled with its token count
    ("all 196", "block 1: 139", ...). The strip is letterboxed onto a white
    canvas of the input's size, keeping its aspect ratio.

    Args:
        image: any PIL image.
        trace: the trace of the forward pass that saw ``image``.
        sample: which sample of the batch.
        style: one of `STYLES`, as in `kept_overlay`.

    Returns:
        A new RGB image of the input's size.
    """
    if style not in STYLES:
        raise ValueError(f"Unknown overlay style {style!r}; choose one of {', '.join(STYLES)}.")
    if not isinstance(image, Image.Image):
        raise ValueError(f"Expected a PIL image, got {type(image).__name__}.")
    _check_sample(trace, sample)
    W, H = image.size
    panels: list[int | None] = [None, *range(len(trace.stages))]
    n = len(panels)
    gap = max(2, W // 80)
    # Sized to fit the image as it is, so the letterbox pastes it without resampling (crisp labels).
    pw = max(1, (W - (n + 1) * gap) // n)
    ph = max(1, round(pw * H / W))
    font_px = max(8, min(24, pw // 9))
    font = _font(font_px)
    label_h = font_px + 2 * gap
    strip = Image.new("RGB", (n * pw + (n + 1) * gap, ph + label_h + gap), "white")
    draw = ImageDraw.Draw(strip)
    thumb = image.convert("RGB").resize((pw, ph), Image.Resampling.BILINEAR, reducing_gap=2.0)
    for i, st in enumerate(panels):
        canvas = _Canvas(thumb, trace.grid)
        _draw_kept(canvas, _kept_mask(trace, sample, st), style)
        x0 = gap + i * (pw + gap)
        strip.paste(canvas.image(), (x0, gap))
        label = _token_label(trace, sample, st)
        tw = draw.textlength(label, font=font)
        draw.text((x0 + max(0.0, (pw - tw) / 2), gap + ph + gap), label, fill=(30, 30, 30), font=font)
    scale = min(W / strip.width, H / strip.height)
    if scale < 1.0:  # the strip is only larger than the image for tiny or very wide images
        sw, sh = max(1, round(strip.width * scale)), max(1, round(strip.height * scale))
        strip = strip.resize((sw, sh), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (W, H), "white")
    out.paste(strip, ((W - strip.width) // 2, (H - strip.height) // 2))
    return out


def _colormap(t: np.ndarray) -> np.ndarray:
    """(N,) values in [0, 1] -> (N, 3) inferno colours."""
    x = np.clip(t, 0.0, 1.0) * (len(_INFERNO) - 1)
    i = np.minimum(np.floor(x).astype(np.int64), len(_INFERNO) - 2)
    f = (x - i)[:, None].astype(np.float32)
    return _INFERNO[i] * (1.0 - f) + _INFERNO[i + 1] * f


def heatmap_overlay(image: Image.Image, trace: Trace, sample: int = 0, stage: int = 0) -> Image.Image | None:
    """The per-patch importance that a stage ranked by, as a heat map over the image.

    Scores (predictor logits, CLS attention, caption cosines or random draws,
    by method) are min-max normalised over the patches the stage scored and
    drawn with the inferno colour map (dark: low, yellow: high). Patches gone
    before the stage (NaN scores) are greyed.

    Args:
        image: any PIL image.
        trace: the trace of the forward pass that saw ``image``.
        sample: which sample of the batch.
        stage: index into ``trace.stages``; 0, the default, scores every patch.

    Returns:
        A new RGB image of the input's size, or None when the trace has no
        scores (ToMe, or nothing was pruned).
    """
    _check_sample(trace, sample)
    if not trace.stages:
        return None
    st = _get_stage(trace, stage)
    if st.scores is None:
        return None
    s = st.scores[sample].detach().float().cpu().numpy()  # (P,)
    valid = np.isfinite(s)
    t = np.full_like(s, 0.5)
    if valid.any():
        lo, hi = float(s[valid].min()), float(s[valid].max())
        if hi > lo:
            t = (s - lo) / (hi - lo)
    colours = _colormap(np.where(valid, t, 0.0))  # (P, 3)
    canvas = _Canvas(image, trace.grid)
    # The heat colours go over a grey copy, so the image's own colours do not read as heat.
    canvas.rgb[:] = (canvas.rgb @ _LUMA)[..., None]
    canvas.grey_out(~valid)
    canvas.mix(np.where(valid, _HEAT_ALPHA, 0.0), colours)
    canvas.grid_lines()
    return canvas.image()


def _palette(n: int) -> np.ndarray:
    """(n, 3) distinct, deterministic colours: hues stepped by the golden ratio."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    sat = np.where(np.arange(n) % 2 == 0, 0.85, 0.6)
    val = np.where(np.arange(n) % 3 == 1, 0.8, 1.0)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sat, val)], dtype=np.float32) * 255.0


def groups_overlay(image: Image.Image, trace: Trace, sample: int = 0, stage: int = -1) -> Image.Image | None:
    """Which token each patch belongs to after a stage (ToMe's merge groups).

    Every group gets its own colour from a fixed palette, blended over the
    image, with borders between patches of different groups. Groups of one
    patch are tinted only lightly. Dropped patches (drop methods) are dimmed;
    with EViT fusion the dropped patches form the fused token's group.

    Args:
        image: any PIL image.
        trace: the trace of the forward pass that saw ``image``.
        sample: which sample of the batch.
        stage: index into ``trace.stages`` (-1: the last).

    Returns:
        A new RGB image of the input's size, or None when nothing was pruned.
    """
    _check_sample(trace, sample)
    if not trace.stages:
        return None
    groups = _get_stage(trace, stage).groups[sample].detach().cpu().numpy()  # (P,)
    alive = groups >= 0
    n_groups = int(groups.max()) + 1 if alive.any() else 0
    counts = np.bincount(groups[alive], minlength=n_groups)
    colours = np.zeros((trace.num_patches, 3), dtype=np.float32)
    alpha = np.zeros(trace.num_patches, dtype=np.float32)
    colours[alive] = _palette(n_groups)[groups[alive]]
    alpha[alive] = np.where(counts[groups[alive]] > 1, _GROUP_ALPHA, _SINGLE_ALPHA)

    canvas = _Canvas(image, trace.grid)
    canvas.scale(np.where(alive, 1.0, _DIM))
    canvas.mix(alpha, colours)
    if canvas.cell >= _MIN_CELL_PX:
        g = canvas.per_pixel(groups)  # (H, W)
        edge = np.zeros(g.shape, dtype=bool)
        edge[:, 1:] |= g[:, 1:] != g[:, :-1]
        edge[1:, :] |= g[1:, :] != g[:-1, :]
        canvas.paint(edge, np.array([20.0, 20.0, 20.0], dtype=np.float32), 0.75)
    return canvas.image()


def legend_text(trace: Trace) -> str:
    """One line describing the trace, e.g. ``"tome: 196 -> 139 -> 59 patch tokens"``.

    Token counts are per token sequence (a fused EViT token counts as one).

    Args:
        trace: any trace.

    Returns:
        Plain text, no trailing newline.
    """
    if not trace.stages:
        return f"{trace.method}: {trace.num_patches} patch tokens (no pruning)"
    counts = [trace.num_patches] + [int(s.kept.shape[1]) for s in trace.stages]
    return f"{trace.method}: {' -> '.join(map(str, counts))} patch tokens"


__all__ = [
    "STYLES",
    "patch_boxes",
    "kept_overlay",
    "stage_strip",
    "heatmap_overlay",
    "groups_overlay",
    "legend_text",
]
