"""Does a text tower tell which attribute goes with which object? Trained checkpoints, and fresh towers trained alone.

    python -m benchmarks.text_binding --checkpoint checkpoints/baseline --steps 0   # the shipped text tower only
    python -m benchmarks.text_binding                     # the default preset's tower, 2,000 steps per init
    python -m benchmarks.text_binding --steps 200 --inits clip

Hard-negative pairs that swap an attribute between two objects ("a red circle ... and a blue square" against
"a blue circle ... and a red square") are where the baseline falls short of its pair-accuracy target. If the
text tower embeds such captions alike, no image can tell them apart. On fixed held-out scenes of exactly two
objects, each swap kind gets minimal pairs: the caption, and the same caption with the words naming one
attribute of the two objects exchanged (`swap_words`), the same words in another order. Per kind, the mean
cosine of the two embeddings: a bag of words gives 1; the ``code`` row gives the cosine of the two scenes' layout codes
(`training.layout`), what a tower that matched the codes exactly would give. ``layout cos`` is the mean cosine
of a caption's embedding to its scene's code (1 is perfect).

``--checkpoint DIR`` measures a trained checkpoint's text tower (with its own vocabulary). Then, per
`TextConfig.init`, the default preset's text tower, freshly initialised, is trained alone on the baseline's
auxiliary layout objective, with the baseline's AdamW settings, learning rate, warm-up and gradient clipping, on
captions of random scenes (none of them a held-out scene); rows at evenly spaced steps, ``s`` its training
seconds so far. Unlike the baseline phase, no image tower runs, the layout loss is alone (no InfoNCE and no weight
of 10, which Adam mostly cancels but gradient clipping does not) and the tower runs in float32: the figures say
how fast the text side can learn to bind, not what a full build reaches.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from training.layout import LayoutCode, layout_targets
from training.synthetic import (
    HARD_NEGATIVE_ATTRS, POSITION_PHRASES, SHAPE_WORDS, SIZE_WORDS, describe, sample_objects, scene_key,
)
from training.train import ADAMW, GRAD_CLIP, lr_at, param_groups, warmup_for
from vlm_demo import cli
from vlm_demo.config import TEXT_INITS, get_preset
from vlm_demo.model import DualEncoder, load_checkpoint
from vlm_demo.tokenizer import TextTokenizer, Tokenizer

PRESET = get_preset("default")
SIZE = PRESET.model.vision.image_size  # where objects may sit, and so which scenes there are
VOCAB_SCENES = 20_000  # scenes whose captions build a fresh tower's vocabulary (every word of the generator)
KINDS = tuple(f"swap_{a}" for a in HARD_NEGATIVE_ATTRS)


def _words(obj: dict[str, Any], attr: str) -> tuple[str, ...]:
    """The phrases a caption may use for one object's `attr` (`training.synthetic`'s synonyms)."""
    value = obj[attr]
    return {"shape": SHAPE_WORDS, "size": SIZE_WORDS, "position": POSITION_PHRASES}.get(attr, {}).get(value, (value,))


def _spans(text: str, phrases: Sequence[str]) -> set[tuple[int, int]]:
    return {m.span() for ph in phrases for m in re.finditer(rf"(?<![a-z]){re.escape(ph)}(?![a-z])", text)}


def swap_words(caption: str, objects: list[dict[str, Any]], attr: str) -> str | None:
    """`caption` of two objects with the words naming their `attr` exchanged: the minimal pair that swaps it.

    Each object's phrase is found as its longest match that no match of the other object's contains (``at the
    top`` inside the other's ``at the top left``); None when either is not found exactly once, or the two are
    the same value (a swap that changes nothing).
    """
    if objects[0][attr] == objects[1][attr]:
        return None
    a, b = (_spans(caption.lower(), _words(o, attr)) for o in objects)

    def own(mine: set[tuple[int, int]], other: set[tuple[int, int]]) -> set[tuple[int, int]]:
        free = {m for m in mine if not any(o[0] <= m[0] and m[1] <= o[1] and o != m for o in other)}
        return {m for m in free if not any(f[0] <= m[0] and m[1] <= f[1] and f != m for f in free)}

    a, b = own(a, b), own(b, a)
    if len(a) != 1 or len(b) != 1:
        return None
    (sa, ea), (sb, eb) = sorted([a.pop(), b.pop()])
    return caption[:sa] + caption[sb:eb] + caption[ea:sb] + caption[sa:ea] + caption[eb:]


class HeldOut:
    """Fixed two-object scenes, each with a caption and, per swap kind, the minimal pair that swaps it."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.scenes: list[list[dict[str, Any]]] = []
        self.captions: list[str] = []
        self.pairs: dict[str, list[tuple[int, str, list[dict[str, Any]]]]] = {k: [] for k in KINDS}
        while len(self.scenes) < n:
            objects = sample_objects(rng, SIZE)
            if len(objects) != 2:
                continue
            i, caption = len(self.scenes), describe(rng, objects)
            self.scenes.append(objects)
            self.captions.append(caption)
            for kind, attr in zip(KINDS, HARD_NEGATIVE_ATTRS):
                negative = swap_words(caption, objects, attr)
                if negative is not None:
                    a, b = (dict(o) for o in objects)
                    a[attr], b[attr] = b[attr], a[attr]
                    self.pairs[kind].append((i, negative, [a, b]))
        self.keys = {tuple(scene_key(s)) for s in self.scenes}

    def code_cosines(self, code: LayoutCode) -> dict[str, float]:
        """Per swap kind, the mean cosine of the true and the swapped scenes' layout codes."""
        true = code.codes(layout_targets(self.scenes, range(len(self.scenes))))
        out = {}
        for kind, pairs in self.pairs.items():
            fake = code.codes(layout_targets([f for _, _, f in pairs], range(len(pairs))))
            out[kind] = float((true[[i for i, _, _ in pairs]] * fake).sum(-1).mean())
        return out

    def measure(self, model: DualEncoder, tok: TextTokenizer, code: LayoutCode) -> tuple[float, dict[str, float]]:
        """(mean cosine of a caption to its scene's code, {swap kind: mean cosine of the minimal pairs})."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            pos = model.encode_text(tok.encode_batch(self.captions))
            target = code.codes(layout_targets(self.scenes, range(len(self.scenes))))
            swaps = {}
            for kind, pairs in self.pairs.items():
                neg = model.encode_text(tok.encode_batch([c for _, c, _ in pairs]))
                swaps[kind] = float((pos[[i for i, _, _ in pairs]] * neg).sum(-1).mean())
        model.train(was_training)
        return float((pos * target).sum(-1).mean()), swaps


def train_text(
    init: str, steps: int, batch: int, lr: float, held: HeldOut, tok: Tokenizer, seed: int, reports: int
) -> list[tuple[int, float, float, dict[str, float]]]:
    """Train the default preset's text tower, started with `init`, alone on the layout objective.

    Returns:
        Per report point: (step, training seconds so far, layout cos, swap cosines).
    """
    torch.manual_seed(seed)
    cfg = PRESET.model.replace(text=dataclasses.replace(PRESET.model.text, vocab_size=len(tok), init=init))
    model = DualEncoder(cfg)
    code = LayoutCode(cfg.embed_dim)
    tcfg = PRESET.train
    named = list(model.text.named_parameters())
    opt = torch.optim.AdamW(param_groups(named, tcfg.weight_decay), lr=lr, **ADAMW)
    rng = np.random.default_rng(seed + 1)
    at = {round(i * steps / reports) for i in range(reports + 1)}
    out, seconds = [], 0.0
    for step in range(steps + 1):
        if step in at:
            out.append((step, seconds, *held.measure(model, tok, code)))
        if step == steps:
            break
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup_for(tcfg, steps))
        scenes: list[list[dict[str, Any]]] = []
        while len(scenes) < batch:
            objects = sample_objects(rng, SIZE)
            if tuple(scene_key(objects)) not in held.keys:
                scenes.append(objects)
        emb = model.encode_text(tok.encode_batch([describe(rng, s) for s in scenes]))
        loss = code.loss(emb, layout_targets(scenes, range(batch)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for _, p in named], GRAD_CLIP)
        opt.step()
        seconds += time.perf_counter() - t0
    return out


def vocabulary(held: HeldOut, seed: int) -> Tokenizer:
    """The generator's words: captions of `VOCAB_SCENES` scenes and every held-out caption."""
    rng = np.random.default_rng(seed + 2)
    texts = [describe(rng, sample_objects(rng, SIZE)) for _ in range(VOCAB_SCENES)]
    texts += held.captions + [c for pairs in held.pairs.values() for _, c, _ in pairs]
    return Tokenizer.build(texts, PRESET.model.text.context_length)


def _row(name: str, step: int | str, seconds: float | str, layout: float | str, swaps: dict[str, float]) -> str:
    layout = f"{layout:.3f}" if isinstance(layout, float) else layout
    seconds = f"{seconds:.0f}" if isinstance(seconds, float) else seconds
    return f"{name:<22} {step:>5} {seconds:>5}  {layout:>10}  " + "  ".join(f"{swaps[k]:>13.3f}" for k in KINDS)


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser("python -m benchmarks.text_binding", __doc__)
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="a trained checkpoint whose text tower to measure (repeatable)")  # fmt: skip
    p.add_argument("--inits", nargs="+", choices=TEXT_INITS, default=list(TEXT_INITS),
                   help="the TextConfig.init values to train fresh towers from (default: all)")  # fmt: skip
    p.add_argument("--steps", type=cli.non_negative_int, default=2000,
                   help="training steps per fresh tower; 0 trains none (default 2000)")  # fmt: skip
    p.add_argument("--batch", type=cli.positive_int, default=64, help="captions per step (default 64)")
    p.add_argument("--lr", type=cli.positive_float, default=PRESET.train.lr,
                   help="peak learning rate (default: the baseline's)")  # fmt: skip
    p.add_argument("--held-out", type=cli.positive_int, default=600, help="two-object evaluation scenes (default 600)")
    p.add_argument("--reports", type=cli.positive_int, default=4, help="report points after step 0 (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    held = HeldOut(args.held_out, seed=args.seed + 123)
    code = LayoutCode(PRESET.model.embed_dim)
    print(f"{len(held.scenes)} held-out two-object scenes; minimal pairs per kind: "
          + ", ".join(f"{k} {len(v)}" for k, v in held.pairs.items()))  # fmt: skip
    print(f"{'text tower':<22} {'step':>5} {'s':>5}  {'layout cos':>10}  " + "  ".join(f"{k:>13}" for k in KINDS))
    print(_row("code (exact binding)", "-", "-", "1.000", held.code_cosines(code)))
    for folder in args.checkpoint:
        with cli.user_errors(p):
            model, tok = load_checkpoint(folder)
        print(_row(folder, "-", "-", *held.measure(model, tok, LayoutCode(model.cfg.embed_dim))), flush=True)
    if args.steps == 0:
        return
    tok = vocabulary(held, args.seed)
    print(f"fresh towers, trained alone: {args.steps} steps of {args.batch} captions, peak lr {args.lr:g}")
    for init in args.inits:
        for row in train_text(init, args.steps, args.batch, args.lr, held, tok, args.seed, args.reports):
            print(_row(init, *row), flush=True)


if __name__ == "__main__":
    main()
