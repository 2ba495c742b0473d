"""Comparisons an expert can trust, read from a metrics dict (``metrics.json``): pure functions, no I/O.

* **Matched GMACs.** Methods are set side by side at the same compute, fused tokens and
  predictors included, not at the same nominal keep ratio: the papers count keep rates
  differently (see `KEEP_RATE_NOTE`), and one keep ratio costs each method something else.
  A method is measured at a few keep ratios only, so its metrics at a target GMACs ratio are
  interpolated linearly, in the GMACs ratio, between the two measured rows that bracket it
  (`matched`); the tables name both rows.
* **Placement.** A row's ``"placement"`` says where its stages sat (`vlm_demo.pruning.PLACEMENTS`);
  files written before the key existed hold ``"paper"`` rows (`placement_of`). The baseline
  prunes nowhere, so its one row serves every placement.
* **Ceiling.** ``metrics["oracle"]`` is the R@1 a ground-truth oracle reaches on the test split
  (`training.oracle`); `ceiling_line` puts the baseline against it.

Tables are Markdown lines; a missing figure is `DASH`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from vlm_demo.pruning import BASELINE
from vlm_demo.results import DEFAULT_PLACEMENT, placement_of, placements, rows_at  # noqa: F401  (re-exported)

MATCHED_GMACS = (0.65, 0.5)  # the GMACs ratios the matched tables compare methods at
MATCHED_KEYS = ("mean_r1", "pair_acc", "object_recall", "latency_ratio_bs32", "latency_ratio_bs1")
DASH = "–"  # a figure the row does not have (text_guided has no retrieval recall)
EVALUATE = "python -m training.evaluate"
RERUN_CMD = f"re-run `{EVALUATE}`"
RERUN = f"not measured in this file; {RERUN_CMD}"
CEILING = "**R@1 ceiling of the test split (oracle):**"
KEEP_RATE_NOTE = (
    "Keep ratios are nominal: ours is the share of patch tokens left after the last stage, while DynamicViT and "
    "EViT state a per-stage keep rate ρ (with S stages our r = ρ^S) and ToMe a number r of tokens merged in every "
    "block (our r maps to round((P − round(P·r)) / S) merges per stage). One keep ratio therefore costs each method "
    "something else, and methods are compared at matched GMACs."
)
MATCHED_NOTE = (
    f"{KEEP_RATE_NOTE} A method's figures at a GMACs ratio (fused tokens and predictors counted) are interpolated "
    "linearly in the GMACs ratio between its two measured keep ratios that bracket it, both named."
)


# ----------------------------------------------------------------------------- formatting


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or `DASH` for None; a negative value that rounds to zero loses its sign ("0.000")."""
    if value is None:
        return DASH
    text = format(value, spec)
    return text[1:] if text.startswith("-") and not any(c in "123456789" for c in text) else text


def table(header: list[str], align: str, rows: Iterable[list[str]]) -> list[str]:
    """A Markdown table; `align` has one letter a column, l or r."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]


# ----------------------------------------------------------------------------- rows


def recorded(metrics: dict[str, Any]) -> bool:
    """Whether the file records its rows' placements (files from before the key do not)."""
    return any("placement" in r for r in metrics["rows"])


def placement_label(metrics: dict[str, Any], placement: str) -> str:
    """"paper placement", or what a file from before the key can say."""
    return f"{placement} placement" if recorded(metrics) else "placement not recorded in this file"


def methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The pruning methods of `rows`, in their order, the baseline left out."""
    return [m for m in dict.fromkeys(r["method"] for r in rows) if m != BASELINE]


def find_row(metrics: dict[str, Any], method: str, keep: float, placement: str | None = None) -> dict[str, Any]:
    """The row of (method, keep ratio) at `placement` (None: the file's first).

    Raises:
        ValueError: there is no such row.
    """
    for r in rows_at(metrics, placement):
        if r["method"] == method and abs(r["keep_ratio"] - keep) < 1e-9:
            return r
    raise ValueError(f"metrics.json has no row for {method} at keep ratio {keep:g}; rerun training.evaluate.")


# ----------------------------------------------------------------------------- matched GMACs


def matched(
    rows: Sequence[dict[str, Any]], method: str, target: float, keys: Sequence[str] = MATCHED_KEYS
) -> dict[str, Any] | None:
    """A method's metrics at a GMACs ratio, interpolated between the measured rows that bracket it.

    Args:
        rows: metrics rows of one placement.
        method: the method.
        target: the GMACs ratio to the baseline.
        keys: the row fields to interpolate; a field missing on either side is None.

    Returns:
        ``{"method", "gmacs_ratio": target, "lo": row, "hi": row, "weight": w, "exact": bool, key: value ...}``
        where ``lo`` and ``hi`` are the rows just below and above the target (the same row when
        one hits it) and a value is ``lo + w * (hi - lo)``; None when the method's rows do not
        reach the target.
    """
    pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["gmacs_ratio"])
    hit = next((r for r in pts if abs(r["gmacs_ratio"] - target) < 1e-9), None)
    between = [(a, b) for a, b in zip(pts, pts[1:]) if a["gmacs_ratio"] < target < b["gmacs_ratio"]]
    pairs = [(hit, hit)] if hit else between
    if not pairs:
        return None
    lo, hi = pairs[0]
    w = 0.0 if hit else (target - lo["gmacs_ratio"]) / (hi["gmacs_ratio"] - lo["gmacs_ratio"])
    out: dict[str, Any] = {"method": method, "gmacs_ratio": target, "lo": lo, "hi": hi, "weight": w, "exact": bool(hit)}
    for key in keys:
        x, y = lo.get(key), hi.get(key)
        out[key] = None if x is None or y is None else x + w * (y - x)
    return out


def matched_table(
    metrics: dict[str, Any], placement: str | None = None, targets: Sequence[float] = MATCHED_GMACS
) -> list[str]:
    """Every method at each target GMACs ratio, interpolated; a line for a target a method does not reach."""
    rows = rows_at(metrics, placement)
    base = next(r for r in rows if r["method"] == BASELINE)
    header = ["GMACs ratio", "method", "measured rows (keep: GMACs ratio)", "mean R@1", "pair acc", "object recall",
              "latency ratio bs32 / bs1"]  # fmt: skip
    body = [["1.00", BASELINE, "keep 1: 1.00", fmt(base["mean_r1"], ".1f"), fmt(base["pair_acc"], ".1f"),
             fmt(base["object_recall"], ".2f"), f"{fmt(base.get('latency_ratio_bs32'), '.2f')} / "
             f"{fmt(base.get('latency_ratio_bs1'), '.2f')}"]]  # fmt: skip
    for target in targets:
        for method in methods(rows):
            m = matched(rows, method, target)
            if m is None:
                body.append([f"{target:.2f}", method, "not reached by the measured keep ratios", *[DASH] * 4])
                continue
            lo, hi = m["lo"], m["hi"]
            where = f"keep {hi['keep_ratio']:g}: {hi['gmacs_ratio']:.2f}"
            if not m["exact"]:
                where += f" and keep {lo['keep_ratio']:g}: {lo['gmacs_ratio']:.2f}, interpolated"
            body.append([f"{target:.2f}", method, where, fmt(m["mean_r1"], ".1f"), fmt(m["pair_acc"], ".1f"),
                         fmt(m["object_recall"], ".2f"), f"{fmt(m['latency_ratio_bs32'], '.2f')} / "
                         f"{fmt(m['latency_ratio_bs1'], '.2f')}"])  # fmt: skip
    return table(header, "rllrrrr", body)


# ----------------------------------------------------------------------------- placement ablation


def ablation_table(metrics: dict[str, Any]) -> list[str]:
    """Placement x method x keep ratio below 1, the baseline's row first (it serves every placement).

    One line when the file measured a single placement.
    """
    measured = placements(metrics)
    if len(measured) < 2 or not recorded(metrics):
        return [f"Placement ablation: not measured in this file; re-run `{EVALUATE} --placements paper shared`."]
    header = ["method", "keep", "placement", "stage blocks", "tokens per stage", "GMACs ratio", "mean R@1",
              "pair acc", "object recall"]  # fmt: skip
    rows = metrics["rows"]
    base = next(r for r in rows if r["method"] == BASELINE)
    ordered = [base]
    for method in methods(rows):
        # At keep 1 nothing is pruned, whatever the placement: one row per method says it.
        keeps = sorted({r["keep_ratio"] for r in rows if r["method"] == method and r["keep_ratio"] < 1}, reverse=True)
        for keep in keeps:
            ordered += [r for p in measured for r in rows
                        if r["method"] == method and r["keep_ratio"] == keep and placement_of(r) == p]  # fmt: skip
    body = []
    for r in ordered:
        where = "all" if r["method"] == BASELINE else placement_of(r)
        if r.get("same_as_placement"):
            where += f" (= {r['same_as_placement']})"
        blocks = r.get("stage_blocks")
        body.append([r["method"], format(r["keep_ratio"], "g"), where, ",".join(map(str, blocks)) if blocks else DASH,
                     "/".join(map(str, r["tokens"])), f"{r['gmacs_ratio']:.2f}", fmt(r["mean_r1"], ".1f"),
                     fmt(r["pair_acc"], ".1f"), fmt(r["object_recall"], ".2f")])  # fmt: skip
    return table(header, "lrllrrrrr", body)


# ----------------------------------------------------------------------------- ceiling


def ceiling_line(metrics: dict[str, Any]) -> str:
    """"baseline mean R@1 X of a ceiling of Y (Z%)", from the oracle's figures; a re-run hint without them."""
    if "oracle" not in metrics:
        return f"{CEILING} {RERUN}."
    oracle = metrics["oracle"]
    if oracle is None:
        return f"{CEILING} none, the dataset has no object ground truth (objects.json)."
    base = next(r for r in metrics["rows"] if r["method"] == BASELINE)
    share = DASH if base["mean_r1"] is None or not oracle["mean_r1"] else f"{base['mean_r1'] / oracle['mean_r1']:.0%}"
    return (
        f"{CEILING} baseline mean R@1 {fmt(base['mean_r1'], '.1f')} of a ceiling "
        f"of {oracle['mean_r1']:.1f} ({share}); the oracle matches each caption's stated objects to the ground truth "
        f"and breaks ties at random (R@1 image→text {oracle['r1_i2t']:.1f}, text→image {oracle['r1_t2i']:.1f}): "
        "captions that fit more than one test image cap what any model can reach."
    )
