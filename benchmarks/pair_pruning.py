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

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from training.data import eval_data, load_objects, load_splits
from training.evaluate import resolve_data
from training.metrics import pair_accuracy
from vlm_demo import cli
from vlm_demo.model import DualEncoder, load_checkpoint
from vlm_demo.pruning import PruneSpec
from vlm_demo.tokenizer import Tokenizer


def _texts(model: DualEncoder, tokenizer: Tokenizer, captions: Sequence[str], batch: int = 250) -> torch.Tensor:
    return torch.cat([model.encode_text(tokenizer.encode_batch(list(captions[i : i + batch])))
                      for i in range(0, len(captions), batch)])  # fmt: skip


def _images(model: DualEncoder, pixels: torch.Tensor, spec, batch: int = 100) -> torch.Tensor:
    """(N, E) embeddings; `spec(s, e)` is the PruneSpec of rows s..e (None: unpruned)."""
    return torch.cat([model.encode_image(pixels[s : s + batch], spec(s, s + batch))
                      for s in range(0, len(pixels), batch)])  # fmt: skip


@torch.inference_mode()
def measure(model: DualEncoder, tokenizer: Tokenizer, data: Path, limit: int, ratios: Sequence[float]) -> str:
    """The table: per keep ratio, pair accuracy scored each way, with the unpruned model's for reference."""
    objects = load_objects(data)
    if objects is None:
        raise ValueError(f"{data} has no objects.json: pair accuracy needs the synthetic set's hard negatives.")
    split = load_splits(data)["test"]
    ed = eval_data(split, model.cfg.vision.image_size, limit=limit, progress=False)
    records = [objects["images"].get(n) or {} for n in ed.names]
    rows = [i for i, r in enumerate(records) if r.get("hard_negative")]
    pixels = ed.images[rows]
    pos = _texts(model, tokenizer, [split.captions[i][0] for i in rows])
    neg = _texts(model, tokenizer, [records[i]["hard_negative"] for i in rows])
    full = pair_accuracy(_images(model, pixels, lambda s, e: None), pos, neg)
    lines = [f"{len(rows)} test images with a hard negative; text_guided pair accuracy (%), unpruned {full:.1f}", "",
             f"{'keep':>5s}  {'each caption on its own pruning':>32s}  {'both on the true caption':>25s}"]  # fmt: skip
    for r in ratios:
        with_pos = _images(model, pixels, lambda s, e: PruneSpec("text_guided", r, text=pos[s:e]))
        with_neg = _images(model, pixels, lambda s, e: PruneSpec("text_guided", r, text=neg[s:e]))
        own, same = pair_accuracy(with_pos, pos, neg, with_neg), pair_accuracy(with_pos, pos, neg)
        lines.append(f"{r:5.2f}  {own:32.1f}  {same:25.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = cli.parser("python -m benchmarks.pair_pruning", __doc__.split("\n")[0])
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="the checkpoints folder")
    p.add_argument("--data", type=Path, default=None, help="dataset root (default: the one pruned/ records)")
    p.add_argument("--limit", type=cli.positive_int, default=1000, help="test images (default: 1000)")
    p.add_argument("--keep-ratios", type=cli.positive_float, nargs="+", default=[0.5, 0.3, 0.2])
    args = p.parse_args(argv)
    with cli.user_errors(p):
        record = args.checkpoints / "pruned" / "training.json"
        recorded = json.loads(record.read_text()).get("data") if args.data is None else None
        data = resolve_data(args.data, recorded, args.checkpoints, "pruned/training.json")
        model, tokenizer = load_checkpoint(args.checkpoints / "pruned")
        model.eval()
        text = measure(model, tokenizer, Path(data), args.limit, args.keep_ratios)
    print(text)
    return text


if __name__ == "__main__":
    main()
