"""training.compare: matched-GMACs interpolation, placements and the ceiling line, on hand-made metrics."""

from __future__ import annotations

import pytest

from training import compare


def _row(method: str, keep: float, g: float, r1: float | None, pair: float | None, **extra) -> dict:
    return {"method": method, "keep_ratio": keep, "gmacs_ratio": g, "mean_r1": r1, "pair_acc": pair,
            "object_recall": keep, "latency_ratio_bs32": g + 0.1, "latency_ratio_bs1": None, "tokens": [4, 2],
            **extra}  # fmt: skip


@pytest.fixture
def metrics() -> dict:
    rows = [
        _row("none", 1.0, 1.0, 40.0, 80.0),
        _row("a", 1.0, 1.0, 40.0, 80.0),
        _row("a", 0.5, 0.6, 30.0, 70.0),
        _row("a", 0.3, 0.4, 20.0, None),
        _row("b", 0.5, 0.55, 10.0, 60.0),
    ]
    return {"rows": rows}


def test_matched_interpolates_between_the_bracketing_rows(metrics: dict) -> None:
    rows = metrics["rows"]
    m = compare.matched(rows, "a", 0.5)  # halfway between keep 0.3 (0.4) and keep 0.5 (0.6)
    assert m is not None and not m["exact"] and m["weight"] == pytest.approx(0.5)
    assert (m["lo"]["keep_ratio"], m["hi"]["keep_ratio"]) == (0.3, 0.5)
    assert m["mean_r1"] == pytest.approx(25.0)
    assert m["object_recall"] == pytest.approx(0.4)
    assert m["latency_ratio_bs32"] == pytest.approx(0.6)
    assert m["pair_acc"] is None  # missing on one side: no figure, not a made-up one
    assert m["latency_ratio_bs1"] is None
    m = compare.matched(rows, "a", 0.9)  # a quarter of the way from 1.0 down to 0.6
    assert m is not None and m["mean_r1"] == pytest.approx(37.5) and m["pair_acc"] == pytest.approx(77.5)


def test_matched_hits_a_measured_row_exactly_and_refuses_to_extrapolate(metrics: dict) -> None:
    rows = metrics["rows"]
    m = compare.matched(rows, "a", 0.6)
    assert m is not None and m["exact"] and m["lo"] is m["hi"] and m["lo"]["keep_ratio"] == 0.5
    assert m["mean_r1"] == 30.0 and m["pair_acc"] == 70.0
    assert compare.matched(rows, "a", 0.3) is None  # below the cheapest row
    assert compare.matched(rows, "b", 0.5) is None  # one row: nothing brackets 0.5
    assert compare.matched(rows, "b", 0.55)["mean_r1"] == 10.0


def test_matched_table_names_the_bracketing_keep_ratios(metrics: dict) -> None:
    lines = compare.matched_table(metrics, targets=(0.5, 0.6))
    assert lines[2] == "| 1.00 | none | keep 1: 1.00 | 40.0 | 80.0 | 1.00 | 1.10 / – |"
    assert "| 0.50 | a | keep 0.5: 0.60 and keep 0.3: 0.40, interpolated | 25.0 | – | 0.40 | 0.60 / – |" in lines
    assert "| 0.60 | a | keep 0.5: 0.60 | 30.0 | 70.0 | 0.50 | 0.70 / – |" in lines
    assert "| 0.50 | b | not reached by the measured keep ratios | – | – | – | – |" in lines


def test_rows_without_a_placement_are_paper_rows_and_the_baseline_serves_all(metrics: dict) -> None:
    rows = metrics["rows"]
    assert compare.placements(metrics) == ["paper"] and compare.rows_at(metrics) == rows
    shared = [dict(r, placement="shared", mean_r1=0.0) for r in rows if r["method"] != "none"]
    metrics["rows"] = [dict(r, placement="paper") for r in rows] + shared
    metrics["options"] = {"placements": ["paper", "shared"]}
    assert compare.placements(metrics) == ["paper", "shared"]
    assert [r["method"] for r in compare.rows_at(metrics, "shared")] == ["none", "a", "a", "a", "b"]
    assert compare.find_row(metrics, "a", 0.5)["mean_r1"] == 30.0  # the file's first placement
    assert compare.find_row(metrics, "a", 0.5, "shared")["mean_r1"] == 0.0
    assert compare.find_row(metrics, "none", 1.0, "shared")["mean_r1"] == 40.0
    with pytest.raises(ValueError, match="no row for a at keep ratio 0.7"):
        compare.find_row(metrics, "a", 0.7)


def test_ablation_table(metrics: dict) -> None:
    assert compare.ablation_table(metrics) == [
        "Placement ablation: not measured in this file; re-run `python -m training.evaluate --placements paper shared`."
    ]
    paper = [dict(r, placement="paper", stage_blocks=[1, 3] if r["method"] != "none" else [], same_as_placement=None)
             for r in metrics["rows"]]  # fmt: skip
    shared = [dict(r, placement="shared", stage_blocks=[1, 3], same_as_placement="paper") for r in paper[1:]]
    metrics["rows"], metrics["options"] = paper + shared, {"placements": ["paper", "shared"]}
    lines = compare.ablation_table(metrics)
    assert lines[2] == "| none | 1 | all | – | 4/2 | 1.00 | 40.0 | 80.0 | 1.00 |"
    assert lines[3:5] == [
        "| a | 0.5 | paper | 1,3 | 4/2 | 0.60 | 30.0 | 70.0 | 0.50 |",
        "| a | 0.5 | shared (= paper) | 1,3 | 4/2 | 0.60 | 30.0 | 70.0 | 0.50 |",
    ]
    assert not any("| a | 1 |" in line for line in lines)  # at keep 1 nothing is pruned, whatever the placement


def test_ceiling_line(metrics: dict) -> None:
    assert "not measured in this file" in compare.ceiling_line(metrics)
    metrics["oracle"] = None
    assert "no object ground truth" in compare.ceiling_line(metrics)
    metrics["oracle"] = {"r1_i2t": 96.0, "r1_t2i": 94.0, "mean_r1": 95.0}
    line = compare.ceiling_line(metrics)
    assert "baseline mean R@1 40.0 of a ceiling of 95.0 (42%)" in line
    assert "image→text 96.0, text→image 94.0" in line


def test_fmt_drops_the_sign_of_a_negative_value_that_rounds_to_zero() -> None:
    assert compare.fmt(-0.00004, ".3f") == "0.000" and compare.fmt(-0.0004, ".0%") == "0%"
    assert compare.fmt(-0.004, ".3f") == "-0.004" and compare.fmt(None, ".1f") == compare.DASH
