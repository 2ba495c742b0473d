"""Can the baseline's text tower learn which attribute goes with which object? Its initialisations, trained alone.

    python -m benchmarks.text_binding                          # the default preset's tower, 2,000 steps per init
    python -m benchmarks.text_binding --steps 200 --inits clip

Hard-negative pairs that swap an attribute between two objects ("a red circle ... and a blue square" against
"a blue circle ... and a red square") are where the shipped baseline falls short of its pair-accuracy target,
and its text tower hardly tells such captions apart (cosine 0.966 for colour swaps). This benchmark isolates the
text tower: the default preset's tower, freshly initialised with each `TextConfig.init`, is trained alone on
the baseline's auxiliary layout objective (`training.layout`: the caption's embedding must point at its scene's
conjunctive code), with the baseline's optimiser, schedule and gradient clipping, on captions of random scenes
(`training.synthetic`). At evenly spaced steps it prints, on fixed held-out scenes of two or three objects:

- **layout cos:** the mean cosine of a caption's embedding to its scene's code (1 is perfect);
- **swap cosines:** per attribute, the mean cosine between a caption and a hard negative swapping that
  attribute between two objects. A bag of words gives about 1; the codes of such a pair lie at about 0.67
  for two objects (two of six code vectors differ).

No image tower runs, so the figures say how fast the text side can bind, not what a full build reaches.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from training.layout import LayoutCode, layout_targets
from training.synthetic import describe, hard_negative, sample_objects
from training.train import lr_at, param_groups
from vlm_demo import cli
from vlm_demo.config import TEXT_INITS, TrainConfig, get_preset
from vlm_demo.model import DualEncoder
from vlm_demo.tokenizer import Tokenizer

SIZE = 112  # the default preset's image size; it fixes where objects may sit, and so the scenes
VOCAB_SCENES = 20_000  # scenes whose captions build the vocabulary (every word of the generator)


class HeldOut:
    """Fixed evaluation captions: scenes of 2-3 objects, one caption and one hard negative each."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.scenes: list[list[dict[str, Any]]] = []
        while len(self.scenes) < n:
            objects = sample_objects(rng, SIZE)
            if len(objects) > 1:
                self.scenes.append(objects)
        self.captions = [describe(rng, s) for s in self.scenes]
        self.negatives, self.kinds = zip(*(hard_negative(rng, s) for s in self.scenes))

    def measure(self, model: DualEncoder, tok: Tokenizer, code: LayoutCode) -> tuple[float, dict[str, float]]:
        """(mean cosine to the scene's code, {swap kind: mean cosine of caption and negative})."""
        model.eval()
        with torch.no_grad():
            pos = model.encode_text(tok.encode_batch(self.captions))
            neg = model.encode_text(tok.encode_batch(self.negatives))
            target = code.codes(layout_targets(self.scenes, range(len(self.scenes))))
        model.train()
        cos = (pos * neg).sum(-1)
        kinds = np.array(self.kinds)
        swaps = {k: float(cos[torch.from_numpy(kinds == k)].mean()) for k in sorted(set(self.kinds)) if "swap" in k}
        return float((pos * target).sum(-1).mean()), swaps


def train_text(
    init: str, steps: int, batch: int, lr: float, held: HeldOut, tok: Tokenizer, seed: int, reports: int
) -> list[tuple[int, float, float, dict[str, float]]]:
    """Train the default preset's text tower, started with `init`, alone on the layout objective.

    Returns:
        Per report point: (step, seconds so far, layout cos, swap cosines).
    """
    torch.manual_seed(seed)
    cfg = get_preset("default").model
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tok), init=init))
    model = DualEncoder(cfg)
    code = LayoutCode(cfg.embed_dim)
    tcfg = TrainConfig()
    named = list(model.text.named_parameters())
    opt = torch.optim.AdamW(param_groups(named, tcfg.weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(seed + 1)  # the training scenes: apart from the held-out ones
    at = {round(i * steps / reports) for i in range(reports + 1)}
    out, t0 = [], time.perf_counter()
    for step in range(steps + 1):
        if step in at:
            out.append((step, time.perf_counter() - t0, *held.measure(model, tok, code)))
        if step == steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, min(tcfg.warmup_steps, steps // 4 + 1))
        scenes = [sample_objects(rng, SIZE) for _ in range(batch)]
        emb = model.encode_text(tok.encode_batch([describe(rng, s) for s in scenes]))
        loss = code.loss(emb, layout_targets(scenes, range(batch)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
    return out


def vocabulary(held: HeldOut, seed: int) -> Tokenizer:
    """The generator's words: captions and hard negatives of `VOCAB_SCENES` scenes, and the held-out set."""
    rng = np.random.default_rng(seed + 2)
    scenes = [sample_objects(rng, SIZE) for _ in range(VOCAB_SCENES)]
    texts = [describe(rng, s) for s in scenes] + [hard_negative(rng, s)[0] for s in scenes if len(s) > 1]
    context = get_preset("default").model.text.context_length
    return Tokenizer.build(texts + held.captions + list(held.negatives), context)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inits", nargs="+", choices=TEXT_INITS, default=list(TEXT_INITS),
                   help="the TextConfig.init values to train (default: all)")  # fmt: skip
    p.add_argument("--steps", type=cli.positive_int, default=2000, help="training steps per init (default 2000)")
    p.add_argument("--batch", type=cli.positive_int, default=64, help="captions per step (default 64)")
    p.add_argument("--lr", type=cli.positive_float, default=TrainConfig().lr,
                   help="peak learning rate (default: the baseline's)")  # fmt: skip
    p.add_argument("--held-out", type=cli.positive_int, default=600, help="evaluation scenes (default 600)")
    p.add_argument("--reports", type=cli.positive_int, default=4, help="report points after step 0 (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    held = HeldOut(args.held_out, seed=args.seed + 123)
    tok = vocabulary(held, args.seed)
    kinds = sorted(k for k in set(held.kinds) if "swap" in k)
    print(f"text tower of the default preset, trained alone on the layout objective: {args.steps} steps of "
          f"{args.batch} captions, peak lr {args.lr:g}; {len(held.scenes)} held-out scenes of 2-3 objects")
    print(f"{'init':<13} {'step':>5} {'s':>5}  {'layout cos':>10}  " + "  ".join(f"{k:>13}" for k in kinds))
    for init in args.inits:
        for step, seconds, layout, swaps in train_text(
            init, args.steps, args.batch, args.lr, held, tok, args.seed, args.reports
        ):
            cells = "  ".join(f"{swaps.get(k, float('nan')):>13.3f}" for k in kinds)
            print(f"{init:<13} {step:>5} {seconds:>5.0f}  {layout:>10.3f}  {cells}", flush=True)


if __name__ == "__main__":
    main()
