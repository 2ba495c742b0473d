"""A deterministic synthetic captioning dataset in the exact Flickr8k layout.

Each scene is 1-3 coloured shapes on a cluttered background (gradient, noise
texture and small muted distractors, so background patches are not empty).
Five captions per image name every object by size, colour, shape and position,
so retrieval is possible; one hard-negative caption per image changes exactly
one attribute (or swaps one between two objects).

Layout written under ``out_dir`` (the same files the real Flickr8k ships, so one
loader reads both)::

    Flicker8k_Dataset/synth_000000.png ...   (sic: the original misspelling)
    Flickr_8k.trainImages.txt / devImages.txt / testImages.txt   (75 / 12.5 / 12.5 %)
    Flickr8k.token.txt                       lines ``name.png#i<TAB>caption``, i = 0..4
    objects.json                             ground truth, written last of all

``objects.json`` is ``{"image_size": S, "seed": seed, "images": {name: {"objects":
[{"shape", "color", "size", "position", "box": [x0, y0, x1, y1]}], "hard_negative":
caption, "hard_negative_kind": kind}}}``; boxes are pixel coordinates with
``0 <= x0 < x1 <= S`` (x1, y1 exclusive).

Determinism: image ``i`` draws all its randomness from
``SeedSequence(seed, spawn_key=(i,))``, so the output does not depend on the
number of worker processes, and PNGs are written with fixed settings and no
metadata. The same seed gives byte-identical files.

Every caption has at most ``MAX_CAPTION_WORDS`` words, so it fits the default
text context (32 tokens including ``<cls>``) without truncation.

Usage::

    python -m training.synthetic --out data/synthetic [--seed 0] [--num-images 8000] [--size 112] [--quiet]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlm_demo import cli
from vlm_demo.atomic import write_text_atomic

IMAGE_DIR = "Flicker8k_Dataset"  # the original Flickr8k folder name, misspelling included
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
OBJECTS_FILE = "objects.json"
CAPTIONS_PER_IMAGE = 5
MAX_CAPTION_WORDS = 31  # the default TextConfig.context_length (32) minus <cls>
SPLIT_FRACTIONS = (0.75, 0.125)  # train, dev; test gets the rest

# Saturated, well separated colours: a caption names them, so none may be confusable.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "purple": (140, 45, 195),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
# Side of an object's bounding square as a fraction of the image side (centre, +/- jitter).
SIZES: dict[str, tuple[float, float]] = {"small": (0.20, 0.02), "large": (0.35, 0.025)}
# Row-major 3x3 cells; the word names the cell that holds the object's centre.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

# Synonyms are kept unambiguous: no synonym of one attribute value names another.
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box")}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {
    "top left": ("at the top left", "in the top left", "in the top left corner"),
    "top right": ("at the top right", "in the top right", "in the top right corner"),
    "bottom left": ("at the bottom left", "in the bottom left", "in the bottom left corner"),
    "bottom right": ("at the bottom right", "in the bottom right", "in the bottom right corner"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "center": ("in the center", "in the middle"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap antialiasing
_MAX_OVERLAP = 0.1  # largest intersection of two object boxes, as a fraction of the smaller box


# ----------------------------------------------------------------------------- scene sampling


def sample_objects(rng: np.random.Generator, size: int) -> list[dict[str, Any]]:
    """1-3 objects in distinct cells whose boxes overlap at most `_MAX_OVERLAP`."""
    n = int(rng.integers(1, 4))
    cell = size / 3
    margin = 0.1 * cell  # keeps centres off cell borders, where the position word would be ambiguous
    for _ in range(100):
        cells = rng.choice(9, size=n, replace=False)
        objects: list[dict[str, Any]] = []
        for c in cells:
            size_word = ("small", "large")[int(rng.integers(2))]
            frac, jitter = SIZES[size_word]
            r = size * (frac + rng.uniform(-jitter, jitter)) / 2  # half-side in output pixels
            row, col = divmod(int(c), 3)
            lo_x, hi_x = max(col * cell + margin, r), min((col + 1) * cell - margin, size - r)
            lo_y, hi_y = max(row * cell + margin, r), min((row + 1) * cell - margin, size - r)
            objects.append(
                {
                    "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                    "color": list(COLORS)[int(rng.integers(len(COLORS)))],
                    "size": size_word,
                    "position": POSITIONS[int(c)],
                    "_center": (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))),
                    "_r": float(r),
                }
            )
        if all(_overlap(a, b) <= _MAX_OVERLAP for i, a in enumerate(objects) for b in objects[:i]):
            return objects
    # Practically unreachable (three large objects keep failing): one object always fits.
    return objects[:1]


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Intersection of the two bounding squares over the smaller square's area."""
    (ax, ay), ar = a["_center"], a["_r"]
    (bx, by), br = b["_center"], b["_r"]
    w = min(ax + ar, bx + br) - max(ax - ar, bx - br)
    h = min(ay + ar, by + br) - max(ay - ar, by - br)
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / (4 * min(ar, br) ** 2)


# ----------------------------------------------------------------------------- rendering


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) inside a square of half-side r (not for circles)."""
    if shape == "square":
        s = 0.9 * r  # a full square looks bigger than the other shapes of the same extent
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.05 * r + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.33 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if shape == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15.0))
        return pts
    raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")


def _muted(rng: np.random.Generator, value_range: tuple[float, float], max_sat: float) -> tuple[int, int, int]:
    """A desaturated RGB colour: random hue, saturation <= max_sat, value in value_range."""
    h = rng.uniform(0, 1)
    s = rng.uniform(0, max_sat)
    v = rng.uniform(*value_range)
    rgb = np.clip(np.abs(((h * 6 + np.array([0.0, 4.0, 2.0])) % 6) - 3) - 1, 0, 1)  # hue -> pure RGB
    rgb = v * (1 - s + s * rgb)
    return tuple(int(round(255 * c)) for c in rgb)  # type: ignore[return-value]


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """Gradient between two muted colours, low-frequency blotches and fine grain."""
    c0 = np.asarray(_muted(rng, (0.3, 0.65), 0.25), dtype=np.float32)
    c1 = np.asarray(_muted(rng, (0.3, 0.65), 0.25), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side - 0.5
    t = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]  # (H, W)
    t = (t - t.min()) / (t.max() - t.min())
    img = c0 + (c1 - c0) * t[..., None]  # (H, W, 3)
    grid = rng.normal(0, 14, size=(6, 6, 3)).astype(np.float32)
    blotches = Image.fromarray(np.clip(grid + 128, 0, 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    img += np.asarray(blotches, dtype=np.float32) - 128
    img += rng.normal(0, 6, size=(side, side, 1)).astype(np.float32)  # grey grain: adds texture, not hue
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw_distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, side: int) -> None:
    """Thin lines and specks, far smaller than any object and too grey to be named as one."""
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(0, side, size=2)
        length = rng.uniform(0.03, 0.09) * side
        a = rng.uniform(0, math.pi)
        draw.line(
            [(x, y), (x + length * math.cos(a), y + length * math.sin(a))],
            fill=_muted(rng, (0.2, 0.8), 0.12),
            width=int(rng.integers(1, 3)),
        )
    for _ in range(int(rng.integers(4, 12))):
        x, y = rng.uniform(0, side, size=2)
        rad = rng.uniform(0.005, 0.02) * side
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=_muted(rng, (0.2, 0.8), 0.12))


def _render(rng: np.random.Generator, objects: list[dict[str, Any]], size: int) -> Image.Image:
    """Draw the scene at `_SUPERSAMPLE` x and downsample; fills in each object's "box"."""
    side = size * _SUPERSAMPLE
    image = _background(rng, side)
    draw = ImageDraw.Draw(image)
    _draw_distractors(rng, draw, side)
    for obj in objects:
        jitter = rng.integers(-10, 11, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj["color"]], jitter))
        cx, cy = (c * _SUPERSAMPLE for c in obj["_center"])
        r = obj["_r"] * _SUPERSAMPLE
        if obj["shape"] == "circle":
            bounds = (cx - r, cy - r, cx + r, cy + r)
            draw.ellipse(bounds, fill=fill)
        else:
            pts = _shape_points(obj["shape"], cx, cy, r)
            draw.polygon(pts, fill=fill)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            bounds = (min(xs), min(ys), max(xs), max(ys))
        x0, y0, x1, y1 = (b / _SUPERSAMPLE for b in bounds)
        obj["box"] = [
            max(0, math.floor(x0)),
            max(0, math.floor(y0)),
            min(size, math.ceil(x1)),
            min(size, math.ceil(y1)),
        ]
    return image.reduce(_SUPERSAMPLE)


# ----------------------------------------------------------------------------- captions


def _words(text: str) -> int:
    return len(re.findall(r"[a-z0-9]+", text.lower()))


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator, obj: dict[str, Any]) -> str:
    size = _pick(rng, SIZE_WORDS[obj["size"]])
    shape = _pick(rng, SHAPE_WORDS.get(obj["shape"], (obj["shape"],)))
    return f"a {size} {obj['color']} {shape}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(rng: np.random.Generator, objects: list[dict[str, Any]], template: int) -> str:
    """One caption naming every object's size, colour, shape and position."""
    order = [objects[int(i)] for i in rng.permutation(len(objects))]
    nps = [_noun_phrase(rng, o) for o in order]
    pos = [_pick(rng, POSITION_PHRASES[o["position"]]) for o in order]
    located = [f"{n} {p}" for n, p in zip(nps, pos)]
    n = len(objects)
    if template == 0:
        text = _join(located)
    elif template == 1:
        text = "there is " + _join(located)
    elif template == 2:
        text = "an image of " + _join(located)
    elif template == 3:
        text = "a picture showing " + _join(located)
    elif template == 4:
        text = located[0] + (" with " + _join(located[1:]) if n > 1 else " on a cluttered background")
    elif template == 5:
        clauses = [f"{p} is {np_}" for np_, p in zip(nps, pos)]
        text = "; ".join(clauses) if n > 1 else clauses[0]
    elif template == 6:
        noun = "shape" if n == 1 else "shapes"
        text = f"{NUMBER_WORDS[n]} {noun}: " + _join(located)
    else:
        raise ValueError(f"Unknown caption template {template}.")
    return text[0].upper() + text[1:] + "."


_NUM_TEMPLATES = 7


def describe(rng: np.random.Generator, objects: list[dict[str, Any]]) -> str:
    """One caption, in a random template, naming exactly `objects` (e.g. a subset of a scene's objects)."""
    return _caption(rng, objects, int(rng.integers(_NUM_TEMPLATES)))


def _captions(rng: np.random.Generator, objects: list[dict[str, Any]]) -> list[str]:
    """`CAPTIONS_PER_IMAGE` distinct captions, each within `MAX_CAPTION_WORDS` words."""
    templates = [int(t) for t in rng.permutation(_NUM_TEMPLATES)]
    captions: list[str] = []
    for attempt in range(200):
        if len(captions) == CAPTIONS_PER_IMAGE:
            break
        # Distinct templates first; later attempts (a too long caption) draw any template.
        template = templates[len(captions)] if attempt < 50 else int(rng.integers(_NUM_TEMPLATES))
        text = _caption(rng, objects, template)
        if _words(text) <= MAX_CAPTION_WORDS and text not in captions:
            captions.append(text)
    if len(captions) < CAPTIONS_PER_IMAGE:  # never seen; guards against an endless loop
        raise RuntimeError(f"could not write {CAPTIONS_PER_IMAGE} distinct captions for {objects}")
    return captions


def scene_key(objects: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """What a caption can say of a scene: each object's (size, colour, shape, position), sorted."""
    return sorted((o["size"], o["color"], o["shape"], o["position"]) for o in objects)


HARD_NEGATIVE_ATTRS = ("color", "shape", "size", "position")  # what a hard negative changes or swaps


def hard_negative_odds(mix: Sequence[float] | None) -> np.ndarray | None:
    """The probabilities a mix of relative odds (one per `HARD_NEGATIVE_ATTRS`) draws each attribute with;
    None for None or all-equal odds, which `hard_negative` draws as the generated test negatives were.

    Raises:
        ValueError: for a mix that is not one finite odds >= 0 per attribute, not all 0.
    """
    if mix is None:
        return None
    p = np.asarray(mix, dtype=float)
    with np.errstate(over="ignore"):  # a sum past the largest float is inf, and refused below
        total = p.sum()
    if p.shape != (len(HARD_NEGATIVE_ATTRS),) or not (np.isfinite(p).all() and (p >= 0).all() and 0 < total < np.inf):
        raise ValueError(f"a hard-negative mix is one finite odds >= 0 per attribute of {HARD_NEGATIVE_ATTRS}, "
                         f"not all 0; got {' '.join(map(str, mix))}")  # fmt: skip
    return None if (p == p[0]).all() else p / total


def hard_negative(
    rng: np.random.Generator, objects: list[dict[str, Any]], mix: Sequence[float] | None = None
) -> tuple[str, str]:
    """A caption of the same scene with one attribute changed or swapped between two objects.

    Args:
        rng: the draw's generator.
        objects: the scene's objects.
        mix: relative odds of each of `HARD_NEGATIVE_ATTRS` (`hard_negative_odds`); None or all equal, equal
            odds, drawn as the generated test negatives were (which must not change).

    Returns:
        (caption, kind) where kind is e.g. "swap_color" or "change_position".

    Raises:
        ValueError: for a mix `hard_negative_odds` refuses.
    """
    attrs = HARD_NEGATIVE_ATTRS
    p = hard_negative_odds(mix)
    values = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
    truth = scene_key(objects)
    for _ in range(100):
        attr = attrs[int(rng.integers(len(attrs)))] if p is None else attrs[int(rng.choice(len(attrs), p=p))]
        fake = [dict(o) for o in objects]
        if len(objects) > 1 and rng.uniform() < 0.6:
            i, j = (int(k) for k in rng.choice(len(objects), size=2, replace=False))
            fake[i][attr], fake[j][attr] = fake[j][attr], fake[i][attr]
            kind = f"swap_{attr}"
        else:
            i = int(rng.integers(len(objects)))
            taken = {o["position"] for o in objects} if attr == "position" else {objects[i][attr]}
            choices = [v for v in values[attr] if v not in taken]  # a new position stays in a free cell
            fake[i][attr] = _pick(rng, choices)
            kind = f"change_{attr}"
        if scene_key(fake) == truth:
            continue  # e.g. swapped two equal colours
        text = _caption(rng, fake, int(rng.integers(_NUM_TEMPLATES)))
        if _words(text) <= MAX_CAPTION_WORDS:
            return text, kind
    raise RuntimeError(f"could not write a hard negative for {objects}")


def fresh_hard_negatives(
    scenes: Sequence[Sequence[dict[str, Any]] | None],
    index: Sequence[int],
    seed: int,
    epoch: int,
    k: int,
    mix: Sequence[float] | None = None,
) -> list[str] | None:
    """`k` hard negatives per row of a batch, drawn afresh each epoch from each image's objects.

    Args:
        scenes: per dataset index, its objects as objects.json lists them.
        index: the dataset index of each row.
        seed: the run's seed; with `epoch` and the index it fixes every draw, whatever the batch.
        epoch: the epoch.
        k: negatives per row.
        mix: relative odds of the attribute each negative changes or swaps (`hard_negative`).

    Returns:
        ``k * len(index)`` captions, negative ``j`` of row ``r`` at ``j * len(index) + r``; None when a row's
        objects are unknown (then the batch trains without hard negatives).
    """
    rows: list[list[str]] = []
    for i in index:
        objects = scenes[i]
        if not objects:
            return None
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, int(i), 2]))  # apart from other draws
        rows.append([hard_negative(rng, [dict(o) for o in objects], mix)[0] for _ in range(k)])
    return [row[j] for j in range(k) for row in rows]


# ----------------------------------------------------------------------------- generation


def image_name(index: int) -> str:
    """File name of synthetic image `index`."""
    return f"synth_{index:06d}.png"


def make_scene(seed: int, index: int, size: int = 112) -> tuple[Image.Image, dict[str, Any], list[str]]:
    """Build one scene from (seed, index) alone.

    Args:
        seed: dataset seed.
        index: image index.
        size: image side in pixels.

    Returns:
        (image, record, captions): the RGB image, its ``objects.json`` record and its captions.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    objects = sample_objects(rng, size)
    image = _render(rng, objects, size)
    captions = _captions(rng, objects)
    negative, kind = hard_negative(rng, objects)
    public = [{k: o[k] for k in ("shape", "color", "size", "position", "box")} for o in objects]
    return image, {"objects": public, "hard_negative": negative, "hard_negative_kind": kind}, captions


def _write_one(job: tuple[int, int, int, str]) -> tuple[str, dict[str, Any], list[str]]:
    seed, index, size, image_dir = job
    image, record, captions = make_scene(seed, index, size)
    name = image_name(index)
    # Fixed settings and no metadata: the bytes depend only on the pixels (and zlib). Level 1 takes about 27 % less time
    # than zlib's default 6, at 4 % more bytes; the pixels are the same (PNG is lossless).
    image.save(os.path.join(image_dir, name), format="PNG", compress_level=1)
    return name, record, captions


def split_sizes(num_images: int) -> tuple[int, int, int]:
    """(train, dev, test) counts: 75 / 12.5 / 12.5 %, e.g. 6000/1000/1000 for 8000."""
    train = round(num_images * SPLIT_FRACTIONS[0])
    dev = round(num_images * SPLIT_FRACTIONS[1])
    return train, dev, num_images - train - dev


def generate(
    out_dir: str | os.PathLike,
    num_images: int = 8000,
    seed: int = 0,
    size: int = 112,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the synthetic dataset in the Flickr8k layout.

    ``objects.json`` is written last of all, so its presence means a complete
    dataset; a re-run first deletes it (and the token file).

    Args:
        out_dir: target folder; created if needed, existing files are overwritten.
        num_images: number of images (>= 1).
        seed: dataset seed; the same seed gives byte-identical files.
        size: image side in pixels (>= 32).
        workers: processes; None uses ``os.cpu_count()``. The output does not depend on it.
        progress: show a tqdm progress bar.

    Returns:
        The dataset root, ``Path(out_dir)``.

    Raises:
        ValueError: for a non-positive `num_images` or a too small `size`.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels so that the shapes stay recognisable, got {size}.")
    root = Path(out_dir)
    image_dir = root / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    for marker in (OBJECTS_FILE, TOKEN_FILE):  # an interrupted re-run must not look complete
        (root / marker).unlink(missing_ok=True)
    for stale in image_dir.glob("synth_*.png"):  # left from an earlier, larger run
        m = re.fullmatch(r"synth_(\d+)\.png", stale.name)
        if m and int(m.group(1)) >= num_images:
            stale.unlink()

    workers = max(1, min(workers or os.cpu_count() or 1, num_images))
    jobs = [(seed, i, size, str(image_dir)) for i in range(num_images)]
    bar = tqdm(total=num_images, desc="synthetic images", unit="img", disable=not progress)
    results: list[tuple[str, dict[str, Any], list[str]]] = []
    if workers == 1:
        for job in jobs:
            results.append(_write_one(job))
            bar.update()
    else:
        # fork: no re-import per worker; the results come back in index order whatever the timing.
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        with ctx.Pool(workers) as pool:
            for result in pool.imap(_write_one, jobs, chunksize=32):
                results.append(result)
                bar.update()
    bar.close()

    names = [name for name, _, _ in results]
    n_train, n_dev, _ = split_sizes(num_images)
    # Contiguous splits are unbiased: every image is drawn independently from (seed, index).
    splits = {"train": names[:n_train], "dev": names[n_train : n_train + n_dev], "test": names[n_train + n_dev :]}
    for split, file in SPLIT_FILES.items():
        write_text_atomic(root / file, "".join(f"{n}\n" for n in splits[split]))
    lines = [f"{name}#{k}\t{c}\n" for name, _, caps in results for k, c in enumerate(caps)]
    write_text_atomic(root / TOKEN_FILE, "".join(lines))
    meta = {"image_size": size, "seed": seed, "images": {name: record for name, record, _ in results}}
    write_text_atomic(root / OBJECTS_FILE, json.dumps(meta, separators=(",", ":")) + "\n")
    return root


def _parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m training.synthetic", __doc__)
    parser.add_argument("--out", required=True, help="output folder (required)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--num-images", type=cli.positive_int, default=8000, help="number of images")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels, at least 32")
    parser.add_argument("--workers", type=cli.positive_int, default=None, help="processes (default: all CPU cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Command-line entry point; returns the dataset root. A bad argument exits with code 2 and one ``error:`` line."""
    parser = _parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with cli.user_errors(parser):
        root = generate(args.out, args.num_images, args.seed, args.size, args.workers, progress=not args.quiet)
    print(f"Wrote {args.num_images} images to {root} in {time.perf_counter() - start:.1f} s.")
    return root


if __name__ == "__main__":
    main()
