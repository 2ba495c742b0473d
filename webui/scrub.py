"""Live scrubbing: every slider stop rendered once, swapped in the browser while the slider moves.

`Session.sweep` computes each stop of one (image, caption, method); `frames_html`
draws them into one HTML fragment, one hidden ``div.frame`` per stop holding its
overlays (data URIs) and figures. `SWAP_JS` runs in the browser on every slider
event and shows the frame of the slider's value, with no server round trip, so
the picture follows the hand. Latency is the one figure that needs the server:
the page measures it when the slider settles (see app.py).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io

from PIL import Image, ImageChops

from vlm_demo import overlay
from vlm_demo.api import Sweep, SweepStop

FRAME_SIDE = 384  # longest side of the images inside a frame: 25 stops x 3 images stay near 1.5 MB
JPEG_QUALITY = 82


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _small(image: Image.Image, side: int = FRAME_SIDE) -> Image.Image:
    """The image at most `side` px on its longest side (overlays are drawn at this size)."""
    scale = side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def trim_white(image: Image.Image) -> Image.Image:
    """Crop the white letterbox around the stage strip, so it fills its wide slot."""
    bg = Image.new("RGB", image.size, "white")
    box = ImageChops.difference(image.convert("RGB"), bg).getbbox()
    return image.crop(box) if box else image


def stop_key(keep_ratio: float) -> str:
    """How a stop is named in the page: the slider's value to two decimals."""
    return f"{keep_ratio:.2f}"


def _figures(sweep: Sweep, stop: SweepStop) -> str:
    tokens = " → ".join(str(t) for t in stop.tokens_per_stage)
    return (
        '<table class="scrub-figures"><tr><th></th><th>Baseline</th><th>Pruned</th><th>Ratio</th></tr>'
        f"<tr><td>Patch tokens</td><td>{stop.tokens_per_stage[0]}</td><td>{html.escape(tokens)}</td>"
        f"<td>{stop.tokens / stop.tokens_per_stage[0]:.2f}</td></tr>"
        f"<tr><td>GMACs</td><td>{sweep.baseline_gmacs:.3f}</td><td>{stop.gmacs:.3f}</td>"
        f"<td>{stop.gmacs / sweep.baseline_gmacs:.2f}</td></tr>"
        f"<tr><td>Cosine</td><td>{sweep.baseline_score:.3f}</td><td>{stop.score:.3f}</td>"
        f"<td>{stop.score - sweep.baseline_score:+.3f}</td></tr></table>"
    )


def frame_html(sweep: Sweep, stop: SweepStop, image: Image.Image, style: str, visible: bool) -> str:
    """One stop: kept patches, the per-stage strip, the importance heat map (if any) and the figures."""
    trace = stop.trace
    parts = [f'<img class="kept" alt="kept patches at keep ratio {stop_key(stop.keep_ratio)}" '
             f'src="{_data_uri(overlay.kept_overlay(image, trace, style=style))}">']  # fmt: skip
    parts.append(f'<img class="stages" alt="tokens after each stage" '
                 f'src="{_data_uri(trim_white(overlay.stage_strip(image, trace, style=style)))}">')  # fmt: skip
    heat = overlay.heatmap_overlay(image, trace)
    if heat is not None:
        parts.append(f'<img class="heat" alt="patch importance" src="{_data_uri(heat)}">')
    hidden = "" if visible else ' style="display:none"'
    return (
        f'<div class="frame" data-r="{stop_key(stop.keep_ratio)}"{hidden}>'
        f'<div class="legend">{html.escape(overlay.legend_text(trace))}</div>'
        + "".join(parts)
        + _figures(sweep, stop)
        + "</div>"
    )


def frames_html(sweep: Sweep, current: float, style: str = "dim", total: int | None = None) -> str:
    """The sweep as one fragment, the frame of `current` showing.

    Args:
        sweep: the sweep (its image, method and stops).
        current: the slider's value.
        style: the kept-patch overlay style (`vlm_demo.overlay.STYLES`).
        total: the stops the full sweep will have, when `sweep` holds only the first
            ones (the page shows them at once, with progress, while the rest is computed).
    """
    image = _small(sweep.image)
    key = stop_key(current)
    frames = [frame_html(sweep, s, image, style, visible=stop_key(s.keep_ratio) == key) for s in sweep.stops]
    status = ""
    if total is not None and total > len(sweep.stops):
        status = f'<div class="scrub-status">computing the other stops… ({len(sweep.stops)}/{total})</div>'
    input_key = hashlib.sha1(f"{sweep.method}\n{sweep.caption}".encode() + image.tobytes()).hexdigest()[:12]
    return f'<div class="scrub" data-key="{input_key}" data-method="{html.escape(sweep.method)}">{status}{"".join(frames)}</div>'


# Runs in the browser on every slider event: show the frame of the slider's value, hide the others, and mark
# the cost table (latency) stale until the server has measured the value where the slider settles.
SWAP_JS = """
(r) => {
  const key = Number(r).toFixed(2);
  const root = document.querySelector('#kept-overlay');
  if (root) {
    for (const f of root.querySelectorAll('.frame')) f.style.display = (f.dataset.r === key) ? '' : 'none';
  }
  const costs = document.querySelector('#costs');
  if (costs && window.__vlmSettled !== key) costs.classList.add('stale');
  return r;
}
"""

# Runs before the settle event (its inputs: image, caption, method, keep ratio, ...): waits until the slider
# has rested 300 ms; if it moved on meanwhile, the keep ratio goes to the server as -1 and the server skips it.
DEBOUNCE_JS = """
(...args) => new Promise((resolve) => {
  const r = args[3];
  window.__vlmKeep = r;
  setTimeout(() => { if (window.__vlmKeep !== r) args[3] = -1; resolve(args); }, 300);
})
"""

# Runs after a settle event: the cost table now shows the slider's value.
SETTLED_JS = """
(r) => {
  window.__vlmSettled = Number(r).toFixed(2);
  const key = document.querySelector('#keep-ratio input[type=range]')?.value;
  if (key === undefined || Number(key).toFixed(2) === window.__vlmSettled) {
    document.querySelector('#costs')?.classList.remove('stale');
  }
  return r;
}
"""
