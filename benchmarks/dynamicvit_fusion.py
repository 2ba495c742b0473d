"""What dropping outright costs DynamicViT on the shipped model: the same predictors and tower, with and without
a fused background token, at matched GMACs.

    python -m benchmarks.dynamicvit_fusion                 # checkpoints/ (with dynamicvit/), 1,000 test images
    python -m benchmarks.dynamicvit_fusion --limit 200

DynamicViT drops the tokens it does not keep (`vlm_demo.pruning.dynamicvit`), as its paper does. The ablation
runs the same `dynamicvit/` checkpoint, the same stages and the same ranking (its `PredictorLG`s), but fuses the
dropped tokens into one size-weighted background token with ToMe's ``log(size)`` attention bias, as ``learned``
does (`vlm_demo.pruning.learned`). Both, and ``learned`` and ``random`` for reference, run at the keep ratios
whose GMACs come closest to each ``--fractions`` share of the baseline's (`vlm_demo.flops.keep_ratio_for`),
through `training.evaluate`; the table gives mean R@1, pair accuracy and object recall.

The ablation is registered in this process only (`vlm_demo.pruning.register`); the shipped registry is unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from training.evaluate import evaluate
from vlm_demo import cli, flops, pruning
from vlm_demo.model import load_checkpoint

DYNAMICVIT, FUSED = "dynamicvit", "dynamicvit_fused"
REFERENCE = ("learned", "random")


def register_ablation() -> None:
    """DynamicViT's checkpoint and ranking with ``learned``'s fused background token, in this process's registry."""
    learned = pruning.get("learned")
    pruning.register(dataclasses.replace(
        pruning.get(DYNAMICVIT), name=FUSED, fn=pruning.learned, fusion=learned.fusion,
        label="DynamicViT, fused background", summary="DynamicViT's predictors and tower; the dropped tokens "
        "fused into one size-weighted background token, as learned does.",
    ))  # fmt: skip


def measure(checkpoints: Path, fractions: list[float], limit: int | None) -> list[dict[str, Any]]:
    """Rows of (fraction, method, keep ratio, GMACs ratio, mean R@1, pair acc, object recall)."""
    register_ablation()
    cfg = load_checkpoint(checkpoints / "baseline")[0].cfg
    methods = [DYNAMICVIT, FUSED, *REFERENCE]
    keeps = {(f, m): flops.keep_ratio_for(cfg, m, f) for f in fractions for m in methods}
    with tempfile.TemporaryDirectory() as out:
        m = evaluate(checkpoints, out, methods=methods, keep_ratios=sorted(set(keeps.values())),
                     placements=["paper"], latency=False, limit=limit, progress=False)  # fmt: skip
    by = {(r["method"], r["keep_ratio"]): r for r in m["rows"]}
    return [
        {"fraction": f, "method": meth, **{k: by[(meth, keeps[(f, meth)])][k] for k in
         ("keep_ratio", "gmacs_ratio", "mean_r1", "pair_acc", "object_recall")}}
        for f in fractions for meth in methods
    ]  # fmt: skip


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'GMACs':>6} {'method':<17} {'keep':>5} {'ratio':>6} {'mean R@1':>9} {'pair':>6} {'obj':>5}"]
    for r in rows:
        lines.append(f"{r['fraction']:>6.2f} {r['method']:<17} {r['keep_ratio']:>5.2f} {r['gmacs_ratio']:>6.2f} "
                     f"{r['mean_r1']:>9.1f} {r['pair_acc']:>6.1f} {r['object_recall']:>5.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m benchmarks.dynamicvit_fusion", __doc__)
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="with baseline/, pruned/, dynamicvit/")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.65, 0.5], help="GMACs shares of the baseline's")
    p.add_argument("--limit", type=cli.positive_int, default=1000,
                   help="first N test images (default: 1000, as the shipped metrics.json)")
    args = p.parse_args(argv)
    with cli.user_errors(p):
        if not (args.checkpoints / DYNAMICVIT).is_dir():
            raise ValueError(f"{args.checkpoints / DYNAMICVIT} is missing; train it: python -m training.dynamicvit")
        print(format_rows(measure(args.checkpoints, args.fractions, args.limit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
