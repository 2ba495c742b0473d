"""Why does ``text_guided`` lose pair accuracy? The same pairs, scored two ways.

    python -m benchmarks.pair_pruning                 # checkpoints/, 1,000 test images, keep 0.5, 0.3, 0.2
    python -m benchmarks.pair_pruning --limit 200 --keep-ratios 0.3

Each test image has its true caption (the first) and a hard negative (objects.json). ``text_guided`` prunes
an image once per caption, so `training.evaluate` scores each caption against the image pruned with it: the
true caption against its copy, the negative against the copy the negative pruned (what a user of the method
would get). Scoring both captions against the copy the true caption pruned tells whether the loss comes from
what the negative makes the pruning keep, or from what pruning loses either way.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.data import eval_data, load_objects, load_splits
from training.evaluate import _encode_images, _encode_text, read_training, resolve_data
from training.metrics import pair_accuracy, pair_right
from vlm_demo import cli
from vlm_demo.model import DualEncoder, load_checkpoint
from vlm_demo.pruning import PruneSpec
from vlm_demo.tokenizer import Tokenizer


def measure(
    model: DualEncoder, tokenizer: Tokenizer, data: Path, limit: int, ratios: Sequence[float]
) -> dict[str, Any]:
    """Pair accuracy (%) of the unpruned model, and per keep ratio scored each way, with the pairs that differ.

    Returns:
        ``{"images": n, "unpruned": acc, "rows": [{"keep", "own", "same", "only_own", "only_same"}, ...]}``:
        ``own`` each caption on its own pruning (`training.evaluate`'s figure), ``same`` both on the true
        caption's; ``only_own`` / ``only_same`` count the pairs right one way only.
    """
    objects = load_objects(data)
    if objects is None:
        raise ValueError(f"{data} has no objects.json: pair accuracy needs the synthetic set's hard negatives.")
    split = load_splits(data)["test"]
    ed = eval_data(split, model.cfg.vision.image_size, limit=limit, progress=False)
    records = [objects["images"].get(n) or {} for n in ed.names]
    rows = [i for i, r in enumerate(records) if r.get("hard_negative")]
    pixels = ed.images[rows]
    pos = _encode_text(model, tokenizer, [split.captions[i][0] for i in rows])
    neg = _encode_text(model, tokenizer, [records[i]["hard_negative"] for i in rows])

    def encode(text: torch.Tensor | None, r: float) -> torch.Tensor:
        spec = (lambda s, e: PruneSpec("none", 1.0)) if text is None else (
            lambda s, e: PruneSpec("text_guided", r, text=text[s:e]))  # fmt: skip
        return _encode_images(model, pixels, spec, 100, "", progress=False).emb

    out: dict[str, Any] = {"images": len(rows), "unpruned": pair_accuracy(encode(None, 1.0), pos, neg), "rows": []}
    for r in ratios:
        with_pos, with_neg = encode(pos, r), encode(neg, r)
        own, same = pair_right(with_pos, pos, neg, with_neg), pair_right(with_pos, pos, neg)
        out["rows"].append({"keep": r, "own": 100.0 * float(own.float().mean()),
                            "same": 100.0 * float(same.float().mean()),
                            "only_own": int((own & ~same).sum()), "only_same": int((same & ~own).sum())})  # fmt: skip
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['images']} test images with a hard negative; text_guided pair accuracy (%), "
             f"unpruned {result['unpruned']:.1f}", "",
             f"{'keep':>5s}  {'each caption on its own pruning':>32s}  {'both on the true caption':>25s}"
             "  pairs right only one way (own / true)"]  # fmt: skip
    for row in result["rows"]:
        lines.append(f"{row['keep']:5.2f}  {row['own']:32.1f}  {row['same']:25.1f}"
                     f"  {row['only_own']:>18d} / {row['only_same']}")  # fmt: skip
    return "\n".join(lines)


def _keep_ratio(text: str) -> float:
    value = cli.positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a keep ratio is at most 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = cli.parser("python -m benchmarks.pair_pruning", __doc__.split("\n")[0])
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="the checkpoints folder")
    p.add_argument("--data", type=Path, default=None, help="dataset root (default: the one pruned/ records)")
    p.add_argument("--limit", type=cli.positive_int, default=1000, help="test images (default: 1000)")
    p.add_argument("--keep-ratios", type=_keep_ratio, nargs="+", default=[0.5, 0.3, 0.2])
    args = p.parse_args(argv)
    with cli.user_errors(p):
        folder = args.checkpoints / "pruned"
        recorded = read_training(folder).get("data") if args.data is None else None
        data = resolve_data(args.data, recorded, args.checkpoints, "pruned/training.json")
        model, tokenizer = load_checkpoint(folder)
        model.eval()
        result = measure(model, tokenizer, Path(data), args.limit, args.keep_ratios)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
