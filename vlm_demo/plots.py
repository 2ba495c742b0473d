"""The accuracy-against-compute figure, drawn from the rows of ``metrics.json``.

One function, `tradeoff_figure`, draws it for both readers: `training.evaluate`
saves it as ``tradeoff.png`` (every panel), and the app shows it with the
analysis on screen marked (a star on the method's curve at its keep ratio and a
dotted line at its GMACs). The methods, their order, colours and labels, the
baseline's marker and the note on caption-steered methods all come from the
pruning registry.

It uses matplotlib's `Figure` API, not pyplot: a figure registers nothing
globally, so none leaks between requests or needs closing, and
``Figure.savefig`` renders PNGs with Agg whatever pyplot's backend is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from . import pruning, results

GMACS_LABEL = "GMACs per image (fvcore)"
NO_METRICS = (
    "No evaluation results (metrics.json) in the checkpoints folder.\n"
    "Run `python -m training.evaluate --out checkpoints` to produce checkpoints/metrics.json."
)


@dataclass(frozen=True)
class Panel:
    """One axes of the figure: which row fields it plots against GMACs."""

    series: tuple[tuple[str, str], ...]  # (row field, legend suffix); the first also carries the star
    short: str  # what it measures, in a legend note
    ylabel: str
    title: str
    log_y: bool = False


PANELS: dict[str, Panel] = {
    "r1": Panel((("mean_r1", ""),), "R@1", "mean R@1 (i2t, t2i), %", "Retrieval vs compute"),
    "pair": Panel((("pair_acc", ""),), "pair accuracy", "pair accuracy, %", "Hard-negative pairs"),
    "latency": Panel(
        (("latency_ms_bs32", " bs32"), ("latency_ms_bs1", " bs1")), "latency",
        "ms per call (median)", "Latency: bs32 solid, bs1 dashed", log_y=True,
    ),  # fmt: skip
}
EMPTY_NOTES = {  # what a panel says when no method has a value for it
    "r1": "no retrieval results",
    "pair": "no hard negatives\n(no objects.json)",
    "latency": "latency not measured",
}


@dataclass(frozen=True)
class Marker:
    """The analysis on screen, marked on the curves.

    Attributes:
        method: its pruning method.
        keep_ratio: its keep ratio; places the star along the method's curve.
        gmacs: its GMACs; places the star and the dotted line.
    """

    method: str
    keep_ratio: float
    gmacs: float


def curves(metrics: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    """The rows of `metrics` (its main placement) per registered method, in registry order, each sorted by GMACs.

    Rows without a method, keep ratio or GMACs, and rows of methods the registry no
    longer has, are left out. ``mean_r1`` is filled from ``r1_i2t`` and ``r1_t2i``
    where only those are recorded.
    """
    per: dict[str, list[dict[str, Any]]] = {}
    for row in results.rows_at(metrics) if metrics and metrics.get("rows") else []:
        method = row.get("method")
        if method not in pruning.REGISTRY or row.get("keep_ratio") is None or row.get("gmacs") is None:
            continue
        row = dict(row)
        if row.get("mean_r1") is None and row.get("r1_i2t") is not None and row.get("r1_t2i") is not None:
            row["mean_r1"] = (row["r1_i2t"] + row["r1_t2i"]) / 2
        per.setdefault(method, []).append(row)
    return {m: sorted(per[m], key=lambda r: r["gmacs"]) for m in pruning.names() if m in per}


def interpolate(x: float, points: Iterable[tuple[float, float]]) -> float:
    """Piecewise-linear y at `x` through `points` (any order), held constant beyond the ends."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


def _style(method: str, marker: Marker | None) -> dict[str, Any]:
    info = pruning.get(method)
    if not info.prunes:  # the baseline is one point per panel
        return {"color": "black", "marker": "D", "markersize": 7, "linestyle": "none", "zorder": 4}
    colour = matplotlib.colormaps["tab10"](pruning.names().index(method) % 10)
    if marker is None:
        return {"color": colour, "marker": "o", "markersize": 5, "linewidth": 1.5}
    on_screen = method == marker.method
    return {"color": colour, "marker": "o", "markersize": 6 if on_screen else 4,
            "linewidth": 2.4 if on_screen else 1.2, "alpha": 1.0 if on_screen else 0.5}  # fmt: skip


def _label(method: str) -> str:
    info = pruning.get(method)
    return info.label if info.prunes else f"{info.label} (baseline)"


def _draw_panel(ax: Axes, key: str, per: dict[str, list[dict[str, Any]]], marker: Marker | None) -> None:
    panel, drew = PANELS[key], False
    for method, rows in per.items():
        style = _style(method, marker)
        for i, (field, suffix) in enumerate(panel.series):
            xy = [(r["gmacs"], r[field]) for r in rows if r.get(field) is not None]
            if xy:
                dashed = {"linestyle": "--", "alpha": 0.7 * style.get("alpha", 1.0)} if i else {}
                ax.plot(*zip(*xy), label=_label(method) + suffix, **{**style, **dashed})
                drew = True
            elif i == 0 and pruning.get(method).needs_caption:  # e.g. text_guided has no retrieval R@1
                ax.plot([], [], label=f"{_label(method)} (no {panel.short}: it prunes per caption)", **style)
    if marker is not None:
        _mark(ax, panel, per.get(marker.method, []), marker)
    elif not drew:
        ax.text(0.5, 0.5, EMPTY_NOTES[key], ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel=GMACS_LABEL, ylabel=panel.ylabel, title=panel.title)
    ax.grid(alpha=0.3)
    if panel.log_y and drew:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7 if len(panel.series) == 1 else 6, ncol=len(panel.series))


def _mark(ax: Axes, panel: Panel, rows: list[dict[str, Any]], marker: Marker) -> None:
    """A dotted line at the marker's GMACs and a star on its method's curve, at its keep ratio."""
    ax.axvline(marker.gmacs, color="#444", linestyle=":", linewidth=1.2)
    field = panel.series[0][0]
    own = [(r["keep_ratio"], r[field]) for r in rows if r.get(field) is not None]
    if own:
        ax.plot([marker.gmacs], [interpolate(marker.keep_ratio, own)], marker="*", markersize=18, color="gold",
                markeredgecolor="black", linestyle="none", zorder=5,
                label="this analysis")  # fmt: skip
    else:
        ax.text(0.02, 0.97, f"no {marker.method} results here", ha="left", va="top", transform=ax.transAxes,
                color="#444", fontsize=8)  # fmt: skip


def tradeoff_figure(
    metrics: dict[str, Any] | None,
    marker: Marker | None = None,
    panels: Sequence[str] = tuple(PANELS),
    width: float = 5.3,
    height: float = 4.4,
) -> Figure:
    """Accuracy (and latency) against GMACs, one curve per method, from ``metrics.json``.

    Args:
        metrics: the evaluation's metrics dict (its ``rows``, and ``dataset`` for the title); None or no
            rows gives a one-line figure that says how to produce them.
        marker: the analysis to mark (the app); None draws the curves alone (the evaluation).
        panels: which panels, in order: keys of `PANELS` ("r1", "pair", "latency").
        width: inches per panel.
        height: inches of the figure.

    Returns:
        A pyplot-free `Figure`; save it with ``fig.savefig(path)``.
    """
    unknown = [p for p in panels if p not in PANELS]
    if unknown or not panels:
        raise ValueError(f"Unknown panel(s) {unknown}; choose from {', '.join(PANELS)}.")
    per = curves(metrics)
    if not per:
        fig = Figure(figsize=(width * len(panels), 0.9), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, NO_METRICS, ha="center", va="center", fontsize=11, color="#444")
        return fig
    fig = Figure(figsize=(width * len(panels), height), dpi=100, layout="constrained")
    for i, key in enumerate(panels):
        _draw_panel(fig.add_subplot(1, len(panels), i + 1), key, per, marker)
    ds = (metrics or {}).get("dataset") or {}
    title = f"{ds.get('split', 'test')} split, {ds.get('images', '?')} images x {ds.get('captions', '?')} captions"
    if marker is not None:
        title += f"; star and dotted line: {pruning.get(marker.method).label} at keep ratio {marker.keep_ratio:g}"
    fig.suptitle(title, fontsize=10)
    return fig
