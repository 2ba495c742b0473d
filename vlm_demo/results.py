"""Reading the evaluation's ``metrics.json`` rows: which placement each row ran at.

The evaluation (``training.evaluate``) may measure every method at several stage
placements (``--placements paper shared``); its main tables, the trade-off plot and
the app show the first. The report, the plot and the app read rows through here.
"""

from __future__ import annotations

from typing import Any

from .pruning import BASELINE, PLACEMENTS

DEFAULT_PLACEMENT = PLACEMENTS[0]  # the placement of a row without the key (files older than the key)


def placement_of(row: dict[str, Any]) -> str:
    """Where a row's stages sat; `DEFAULT_PLACEMENT` for a row from before the key existed."""
    return row.get("placement") or DEFAULT_PLACEMENT


def placements(metrics: dict[str, Any]) -> list[str]:
    """The placements a file measured, in its order; the first is the one its main tables show."""
    asked = metrics.get("options", {}).get("placements")
    found = list(dict.fromkeys(placement_of(r) for r in metrics["rows"] if r["method"] != BASELINE))
    return list(asked) if asked else found or [DEFAULT_PLACEMENT]


def rows_at(metrics: dict[str, Any], placement: str | None = None) -> list[dict[str, Any]]:
    """The rows of one placement (None: the file's first), the baseline's row included."""
    placement = placement or placements(metrics)[0]
    return [r for r in metrics["rows"] if r["method"] == BASELINE or placement_of(r) == placement]
