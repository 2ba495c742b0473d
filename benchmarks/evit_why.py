"""Why EViT (``cls_attention``) does what it does on the shipped model, at matched GMACs: a figure and a table.

    python -m benchmarks.evit_why                        # checkpoints/ -> docs/evit_why.png, table on stdout
    python -m benchmarks.evit_why --limit 200 --out /tmp/evit.png

Three questions, each answered by a measurement on the test split:

1. **Where** each method prunes, and so how hard it must prune for the same compute: the tokens every block
   sees at the GMACs ratio (``--fraction``, 0.5), from `vlm_demo.flops.block_tokens`. EViT prunes inside
   blocks at 1/4, 1/2 and 3/4 of the depth, later than ``random``'s stages, so it must keep fewer tokens.
2. **What** the CLS attention looks at: per block of the unpruned baseline, the share of its CLS attention
   that falls on object patches (objects.json boxes), against the share of the grid they cover (what
   uniform attention gives).
3. **Which part costs accuracy:** mean R@1, pair accuracy and object recall of EViT, of EViT with its
   selection replaced by seeded random scores (same blocks, same counts, the same attention-weighted fused
   token), of EViT without the fused token, and of ``random`` at its own stages, every one at the keep ratio
   whose GMACs match the fraction (`vlm_demo.flops.keep_ratio_for`), through `training.evaluate`.

The two ablations are registered in this process only (`vlm_demo.pruning.register`); the shipped registry
is unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from training.data import eval_data, load_objects, load_splits
from training.evaluate import evaluate, resolve_data
from training.metrics import object_patch_mask
from vlm_demo import api, cli, flops, pruning
from vlm_demo.pruning import PruneSpec, Signals, topk_keep

EVIT, RANDOM = "cls_attention", "random"
SHUFFLED, NO_FUSION = "evit_random_scores", "evit_no_fusion"


def _random_scores(x: torch.Tensor, k: int, sig: Signals) -> pruning.Reduction:
    """EViT's stage with seeded random scores: its blocks, counts and attention-weighted fused token."""
    attn = sig.cls_attn
    assert attn is not None
    scores = torch.rand(attn.shape, generator=sig.generator, device=x.device)
    return topk_keep(x, scores, k, fuse_weights=attn if sig.fuse else None, mean=False)


def _no_fusion(x: torch.Tensor, k: int, sig: Signals) -> pruning.Reduction:
    """EViT's stage with the dropped tokens discarded (no fused token)."""
    return pruning.cls_attention(x, k, dataclasses.replace(sig, fuse=False))


def register_ablations() -> None:
    """The two EViT ablations, in this process's registry."""
    evit = pruning.get(EVIT)
    pruning.register(dataclasses.replace(
        evit, name=SHUFFLED, fn=_random_scores, label="EViT, random scores", signals=("cls_attn", "seed"),
        summary="EViT's blocks, counts and fused token; seeded random scores instead of CLS attention.",
    ))  # fmt: skip
    pruning.register(dataclasses.replace(
        evit, name=NO_FUSION, fn=_no_fusion, label="EViT, no fused token", fusion="",
        summary="EViT's blocks, counts and scores; the dropped tokens are discarded.",
    ))  # fmt: skip


@torch.inference_mode()
def attention_on_objects(
    session: api.Session, images: torch.Tensor, per_object: list[list[torch.Tensor]]
) -> list[dict[str, float]]:
    """Per block of the unpruned baseline: CLS attention on object patches, the chance share, and entropy."""
    model, cfg = session.baseline.visual, session.cfg.vision
    masks = torch.stack([torch.stack(objs).any(0) for objs in per_object]).float()  # (N, P): any object's patch
    on_objects = torch.zeros(cfg.depth)
    entropy = torch.zeros(cfg.depth)
    for i in range(0, len(masks), 100):
        x = model.embed(images[i : i + 100])
        m = masks[i : i + 100]
        for b, block in enumerate(model.blocks):
            x, aux = block(x, aux=(True, False))
            attn = aux.cls_attn / aux.cls_attn.sum(1, keepdim=True)  # (B, P), over the patches only
            on_objects[b] += (attn * m).sum(1).sum()
            entropy[b] += (-(attn * attn.clamp_min(1e-12).log()).sum(1) / torch.log(torch.tensor(attn.shape[1]))).sum()
    n = len(masks)
    chance = float(masks.mean())
    return [{"block": b, "on_objects": float(on_objects[b] / n), "chance": chance, "entropy": float(entropy[b] / n)}
            for b in range(cfg.depth)]  # fmt: skip


def matched_rows(
    session: api.Session, checkpoints: Path, data: Path, fraction: float, limit: int,
    images: torch.Tensor, masks: list[list[torch.Tensor]],
) -> list[dict]:  # fmt: skip
    """`training.evaluate` rows of EViT, its two ablations and random, each at its matched keep ratio, with
    ``objects_kept``: the share of objects that keep at least one patch token after the last stage."""
    methods = (EVIT, SHUFFLED, NO_FUSION, RANDOM)
    keep = {m: flops.keep_ratio_for(session.cfg, m, fraction) for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        metrics = evaluate(checkpoints, tmp, data, methods=methods, keep_ratios=sorted(set(keep.values())),
                           placements=("paper",), limit=limit, latency=False, progress=False)  # fmt: skip
    rows = {(r["method"], r["keep_ratio"]): r for r in metrics["rows"]}
    out = [dict(rows[(pruning.BASELINE, 1.0)], objects_kept=1.0)]
    for m in methods:
        spec = PruneSpec(m, keep[m])
        hit = total = 0
        with torch.inference_mode():
            for i in range(0, len(images), 100):
                _, trace = session.baseline.encode_image_with_trace(images[i : i + 100], spec)
                kept = trace.stages[-1].kept  # (B, k), -1 for a fused token
                for row, objs in zip(kept, masks[i : i + 100]):
                    positions = row[row >= 0]
                    hit += sum(bool(obj[positions].any()) for obj in objs)
                    total += len(objs)
        out.append(dict(rows[(m, keep[m])], objects_kept=hit / total))
    return out


def load_test_objects(session: api.Session, data: Path, limit: int) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The first `limit` test images, normalised, and per image one (P,) patch mask per object."""
    objects = load_objects(data)
    if objects is None:
        raise ValueError(f"{data} has no objects.json: object patches are unknown.")
    v = session.cfg.vision
    ed = eval_data(load_splits(data)["test"], session.preprocess, limit=limit, progress=False)
    side = float(objects.get("image_size", v.image_size))
    masks = [[object_patch_mask([o["box"]], v.grid, side) for o in objects["images"][n]["objects"]] for n in ed.names]
    return ed.images, masks


def figure(cfg: Any, fraction: float, attention: list[dict[str, float]], rows: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(13.5, 3.8), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    blocks = list(range(cfg.vision.depth))
    for r in rows[1:]:
        if r["method"] in (EVIT, RANDOM):
            tokens = [a for a, _ in flops.block_tokens(cfg, r["method"], r["keep_ratio"])]
            label = f"{pruning.get(r['method']).label}, keep {r['keep_ratio']:.2f}"
            ax1.step([*blocks, len(blocks)], [*tokens, tokens[-1]], where="post", label=label)
    ax1.set(xlabel="block (its attention starts at the tick)", ylabel="tokens at attention",
            title=f"Where: tokens per block at {fraction:.2f}x GMACs")
    ax1.legend(fontsize=8)
    ax2.plot(blocks, [a["on_objects"] for a in attention], "o-", label="CLS attention on object patches")
    ax2.plot(blocks, [a["chance"] for a in attention], "k--", label="object patches' share (uniform attention)")
    ax2.plot(blocks, [a["entropy"] for a in attention], "s:", label="normalised entropy of CLS attention")
    ax2.set(xlabel="block (unpruned baseline)", ylim=(0, 1.05), title="What the CLS token attends to")
    ax2.legend(fontsize=8)
    names = [pruning.get(r["method"]).label for r in rows[1:]]
    pos = range(len(names))
    width = 0.27
    ax3.bar([p - width for p in pos], [r["mean_r1"] for r in rows[1:]], width, label="mean R@1, %")
    ax3.bar(list(pos), [100 * r["object_recall"] for r in rows[1:]], width, label="object patches kept, %")
    ax3.bar([p + width for p in pos], [100 * r["objects_kept"] for r in rows[1:]], width,
            label="objects with a patch kept, %")  # fmt: skip
    ax3.axhline(rows[0]["mean_r1"], color="k", ls="--", lw=1, label="baseline mean R@1")
    ax3.set_xticks(list(pos), names, rotation=20, ha="right", fontsize=8)
    ax3.set(title=f"Which part costs accuracy ({fraction:.2f}x GMACs)", ylim=(0, 135))
    ax3.legend(fontsize=8, loc="upper center", ncols=2)
    return fig


def table(attention: list[dict[str, float]], rows: list[dict[str, Any]], fraction: float) -> str:
    lines = ["block  CLS attention on objects  chance  entropy"]
    for a in attention:
        lines.append(f"{a['block']:>5}  {a['on_objects']:>24.3f}  {a['chance']:>6.3f}  {a['entropy']:>7.3f}")
    lines += ["", f"at {fraction:.2f}x the baseline's GMACs (mean R@1 / pair accuracy in %):",
              "method                    keep  GMACs ratio  tokens/stage        mean R@1  pair acc  object recall"
              "  objects kept"]
    for r in rows:
        label = pruning.get(r["method"]).label
        lines.append(f"{label:<24}  {r['keep_ratio']:.2f}  {r['gmacs_ratio']:>11.3f}  {str(r['tokens']):<18}  "
                     f"{r['mean_r1']:>8.2f}  {r['pair_acc']:>8.2f}  {r['object_recall']:>13.3f}  "
                     f"{r['objects_kept']:>12.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m benchmarks.evit_why", __doc__.split("\n")[0])
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="the shipped checkpoints folder")
    p.add_argument("--data", type=Path, default=None, help="dataset root (default: the one baseline/ records)")
    p.add_argument("--out", type=Path, default=Path("docs/evit_why.png"), help="where the figure goes")
    p.add_argument("--fraction", type=float, default=0.5, help="GMACs ratio every method is matched to")
    p.add_argument("--limit", type=int, default=1000, help="test images")
    args = p.parse_args(argv)
    with cli.user_errors(p):
        session = api.load(args.checkpoints)
        recorded = json.loads((args.checkpoints / "baseline" / "training.json").read_text()).get("data")
        data = resolve_data(args.data, recorded, args.checkpoints)
        register_ablations()
        images, masks = load_test_objects(session, Path(data), args.limit)  # loaded once, for both measurements
        attention = attention_on_objects(session, images, masks)
        rows = matched_rows(session, args.checkpoints, Path(data), args.fraction, args.limit, images, masks)
        print(table(attention, rows, args.fraction))
        figure(session.cfg, args.fraction, attention, rows).savefig(args.out, dpi=110)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
