"""Does ``text_guided`` keep what the caption names? Its teachers and its predictors, on unseen two-object scenes.

    python -m benchmarks.steering                    # checkpoints/pruned, 80 scenes, keep ratio 0.3
    python -m benchmarks.steering --checkpoint /tmp/ck/pruned --scenes 40

Scenes with exactly two objects, drawn past the index of any shipped dataset (seed 0, from 100,000: never
trained on); each object is named alone by a caption of one fixed template (``a large black cross at the top
left``). For each caption, the share of the named object's patches kept, and of the other object's:

1. **Teachers,** at each stage's input of the unpruned tower (`training.saliency`), keeping the top
   ``keep ratio`` of their scores: the caption's direct effects (the previous teacher; they sit on the final
   block's token positions), their rollout back to the stage, and the rollout contrasted with the other
   object's caption (the teacher ``text_guided`` trains on, `training.query`).
2. **The predictors:** ``text_guided`` on the checkpoint, the last stage's kept patches at the keep ratio; and
   ``learned``, which never sees the caption, for reference.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.metrics import object_patch_mask, object_recall
from training.saliency import direct_effects, stage_effects
from training.synthetic import POSITION_PHRASES, make_scene
from vlm_demo import cli
from vlm_demo.model import DualEncoder, load_checkpoint
from vlm_demo.pruning import PruneSpec
from vlm_demo.tokenizer import Tokenizer
from vlm_demo.transforms import to_batch

ROOT = Path(__file__).resolve().parents[1]
FIRST_UNSEEN = 100_000  # past every shipped dataset's scene indices
SIZE = 112


def named(obj: dict[str, Any]) -> str:
    """A caption that names one object of a synthetic scene, in one fixed template."""
    return f"a {obj['size']} {obj['color']} {obj['shape']} {POSITION_PHRASES[obj['position']][0]}"


def two_object_scenes(start: int, count: int, size: int = SIZE) -> list[tuple[Any, list[dict[str, Any]]]]:
    """`count` synthetic scenes (seed 0) with exactly two objects, from index `start` on: (image, objects)."""
    out, i = [], start
    while len(out) < count:
        image, record, _ = make_scene(0, i, size)
        if len(record["objects"]) == 2:
            out.append((image, record["objects"]))
        i += 1
    return out


class Pairs:
    """Each scene twice, once per object; row i names object i, row ``i ^ 1`` the other object of its scene.

    Scenes with an object that covers no patch (at least half of one, `object_patch_mask`) are left out
    (`left_out` counts them): no share of it can be kept.
    """

    def __init__(self, model: DualEncoder, tokenizer: Tokenizer, scenes: Sequence[tuple[Any, list[dict]]]):
        size, grid = model.cfg.vision.image_size, model.cfg.vision.grid
        visible = [s for s in scenes if all(object_patch_mask([o["box"]], grid, size).any() for o in s[1])]
        self.left_out, scenes = len(scenes) - len(visible), visible
        if not scenes:
            raise ValueError("no scene has two objects that cover a patch each: use more scenes or larger images")
        self.pixels = to_batch([image for image, _ in scenes for _ in range(2)], size)
        objects = [obj for _, objs in scenes for obj in objs]
        with torch.inference_mode():
            self.text = model.encode_text(tokenizer.encode_batch([named(o) for o in objects]))
        self.boxes = [o["box"] for o in objects]
        self.grid, self.size = grid, size
        self.other = torch.arange(len(objects)) ^ 1

    def share(self, kept: torch.Tensor, row: int) -> float:
        """Share of row `row`'s object patches among the kept positions (k,) of one image (-1: a fused token)."""
        return object_recall(kept[None], [[self.boxes[row]]], self.grid, self.size)

    def shares(self, kept: Sequence[torch.Tensor]) -> tuple[float, float]:
        """Mean share of each row's named object, and of its other object, among the row's kept positions."""
        own = [self.share(kept[i], i) for i in range(len(kept))]
        other = [self.share(kept[i], int(self.other[i])) for i in range(len(kept))]
        return sum(own) / len(own), sum(other) / len(other)

    def top(self, scores: torch.Tensor, keep_ratio: float) -> tuple[float, float]:
        """`shares` of the top ``keep_ratio`` of (2S, P) scores."""
        return self.shares(list(scores.topk(round(keep_ratio * scores.shape[1]), dim=1).indices))


def teachers(model: DualEncoder, pairs: Pairs, keep_ratio: float) -> dict[str, list[tuple[float, float]]]:
    """Per teacher, per stage: (named, other) shares of the top `keep_ratio` of its scores."""
    contrast = pairs.text - pairs.text[pairs.other]
    with torch.inference_mode():
        direct = torch.einsum("bpe,be->bp", direct_effects(model, pairs.pixels), pairs.text)
        rolled = stage_effects(model, pairs.pixels)
    stages = len(rolled)
    return {
        "direct effects (final token positions)": [pairs.top(direct, keep_ratio)] * stages,
        "rolled back to the stage": [pairs.top(torch.einsum("bpe,be->bp", e, pairs.text), keep_ratio)
                                     for e in rolled],  # fmt: skip
        "rolled back, contrasted (trained on)": [pairs.top(torch.einsum("bpe,be->bp", e, contrast), keep_ratio)
                                                 for e in rolled],  # fmt: skip
    }


def predictors(model: DualEncoder, pairs: Pairs, keep_ratio: float) -> dict[str, tuple[float, float]]:
    """(named, other) shares of the last stage's kept patches of ``text_guided`` and ``learned``."""
    out = {}
    with torch.inference_mode():
        for method, text in (("text_guided", pairs.text), ("learned", None)):
            _, trace = model.encode_image_with_trace(pairs.pixels, PruneSpec(method, keep_ratio, text=text))
            out[method] = pairs.shares(list(trace.stages[-1].kept))
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "pruned"), help="a pruned checkpoint folder")
    p.add_argument("--scenes", type=cli.positive_int, default=80, help="two-object scenes (default: 80)")
    p.add_argument("--keep-ratio", type=float, default=0.3, help="keep ratio (default: 0.3)")
    args = p.parse_args(argv)
    model, tokenizer = load_checkpoint(args.checkpoint)
    model.eval()
    pairs = Pairs(model, tokenizer, two_object_scenes(FIRST_UNSEEN, args.scenes, model.cfg.vision.image_size))
    stages = model.cfg.pruning.stages
    left_out = f" ({pairs.left_out} left out: an object covers no patch)" if pairs.left_out else ""
    lines = [f"{args.scenes} unseen two-object scenes{left_out}, each object named alone; keep ratio {args.keep_ratio}",
             "share of the named object's patches kept / of the other object's", "",
             f"{'teacher (top of its scores, unpruned tower)':44s}" + "".join(f"  stage {s:<9d}" for s in stages)]
    for name, per_stage in teachers(model, pairs, args.keep_ratio).items():
        lines.append(f"{name:44s}" + "".join(f"  {a:.3f} / {b:.3f}" for a, b in per_stage))
    lines += ["", f"{'predictor (last stage of the checkpoint)':44s}  named / other"]
    for name, (a, b) in predictors(model, pairs, args.keep_ratio).items():
        lines.append(f"{name:44s}  {a:.3f} / {b:.3f}")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
