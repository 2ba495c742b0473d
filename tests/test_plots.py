"""The trade-off figure: one function for the evaluation's tradeoff.png and the app's marked plot."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

from vlm_demo import plots, pruning

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"method": "none", "keep_ratio": 1.0, "gmacs": 0.30, "mean_r1": 40.0, "pair_acc": 80.0,
     "latency_ms_bs1": 7.0, "latency_ms_bs32": 170.0},
    # mean_r1 absent: computed from the two directions
    {"method": "learned", "keep_ratio": 1.0, "gmacs": 0.30, "r1_i2t": 42.0, "r1_t2i": 38.0, "pair_acc": 80.0},
    {"method": "learned", "keep_ratio": 0.4, "gmacs": 0.16, "r1_i2t": 32.0, "r1_t2i": 28.0, "pair_acc": 70.0},
    {"method": "learned", "keep_ratio": 0.2, "gmacs": 0.10, "r1_i2t": None, "r1_t2i": None, "pair_acc": None},
    {"method": "text_guided", "keep_ratio": 0.4, "gmacs": 0.16, "r1_i2t": None, "r1_t2i": None, "pair_acc": 75.0},
    {"method": "retired_method", "keep_ratio": 0.5, "gmacs": 0.2, "mean_r1": 1.0},  # not in the registry: left out
]  # fmt: skip


def _texts(ax) -> str:
    return " ".join(t.get_text() for t in ax.texts)


def _stars(ax) -> list:
    return [ln for ln in ax.lines if ln.get_marker() == "*"]


def test_curves_follow_the_registry_and_fill_mean_r1():
    per = plots.curves({"rows": ROWS})
    assert list(per) == [m for m in pruning.names() if m in ("none", "learned", "text_guided")]
    assert [r["gmacs"] for r in per["learned"]] == [0.10, 0.16, 0.30]  # sorted by GMACs
    assert per["learned"][1]["mean_r1"] == pytest.approx(30.0)


def test_without_metrics_it_says_how_to_make_them():
    for metrics in (None, {"rows": []}):
        fig = plots.tradeoff_figure(metrics, plots.Marker("learned", 0.5, 0.2))
        text = _texts(fig.axes[0])
        assert "python -m training.evaluate" in text and "metrics.json" in text


def test_the_app_plot_marks_the_current_point():
    fig = plots.tradeoff_figure({"rows": ROWS}, plots.Marker("learned", 0.7, 0.23), panels=("r1", "pair"))
    r1_axis, pair_axis = fig.axes
    (star,) = _stars(r1_axis)
    x, y = star.get_xdata()[0], star.get_ydata()[0]
    assert x == pytest.approx(0.23) and y == pytest.approx(35.0)  # halfway between R@1 30 (0.4) and 40 (1.0)
    assert [ln for ln in r1_axis.lines if ln.get_linestyle() == ":"]  # the dotted line at its GMACs

    fig = plots.tradeoff_figure({"rows": ROWS}, plots.Marker("text_guided", 0.4, 0.16), panels=("r1", "pair"))
    r1_axis, pair_axis = fig.axes
    assert not _stars(r1_axis) and "no text_guided results" in _texts(r1_axis)  # no R@1 for text_guided...
    assert _stars(pair_axis)  # ...but a pair accuracy


def test_labels_colours_and_baseline_marker_come_from_the_registry():
    fig = plots.tradeoff_figure({"rows": ROWS})
    r1_axis = fig.axes[0]
    labels = r1_axis.get_legend_handles_labels()[1]
    assert f"{pruning.get('none').label} (baseline)" in labels
    assert pruning.get("learned").label in labels
    caption_only = [m for m in pruning.names() if pruning.get(m).needs_caption]
    assert any(pruning.get(m).label in lab and "per caption" in lab for m in caption_only for lab in labels)
    (baseline,) = [ln for ln in r1_axis.lines if ln.get_label().endswith("(baseline)")]
    assert baseline.get_marker() == "D"
    (learned,) = [ln for ln in r1_axis.lines if ln.get_label() == pruning.get("learned").label]
    tab10 = matplotlib.colormaps["tab10"]
    assert matplotlib.colors.same_color(learned.get_color(), tab10(pruning.names().index("learned")))


def test_panels_are_checked():
    assert [ax.get_title() for ax in plots.tradeoff_figure({"rows": ROWS}).axes] == [
        p.title for p in plots.PANELS.values()
    ]
    with pytest.raises(ValueError, match="panel"):
        plots.tradeoff_figure({"rows": ROWS}, panels=("r1", "accuracy"))


def test_evaluate_saves_the_same_figure_atomically_without_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    from training.evaluate import plot_tradeoff

    metrics = json.loads((ROOT / "checkpoints" / "metrics.json").read_text())
    out = plot_tradeoff(metrics, tmp_path / "tradeoff.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tradeoff.png"]  # no temporary file left
    assert plt.get_fignums() == []  # nothing registered with pyplot, so nothing leaks between calls
