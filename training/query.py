"""Training the caption-conditioned keep predictors of ``text_guided`` (in the pruned phase).

Each stage's `vlm_demo.pruning.QueryKeepPredictor` learns, with the towers frozen, to rank
the patch tokens at the stage's input like the caption's direct effects on the frozen
baseline's image-caption cosine (`training.saliency.direct_effects`), with the same
listwise loss as the ``learned`` predictors.

A predictor that only ever sees captions naming every object in the scene may ignore the
caption: keeping every object is then always right. So where the data has object ground
truth (``objects.json``, as the synthetic scenes do), each image with two or more objects
is trained with a caption naming a random non-empty proper subset of them, written with
the dataset's own templates; its teacher puts most of its mass on the named objects.
Images with one object, and data without ground truth, use the image's own caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from training.losses import keep_rank_loss
from training.synthetic import describe
from vlm_demo.model import DualEncoder
from vlm_demo.tokenizer import Tokenizer

Scene = Sequence[dict[str, Any]]  # an image's objects, as objects.json lists them


def subset_captions(
    index: Sequence[int], scenes: Sequence[Scene | None] | None, seed: int, epoch: int
) -> dict[int, str]:
    """Captions naming part of each multi-object scene, by row of the batch.

    Args:
        index: the dataset index of each row.
        scenes: per dataset index, its objects (None or empty where unknown); None: no ground truth.
        seed: the run's seed.
        epoch: the epoch; with `seed` and the index it fixes every draw, whatever the batch.

    Returns:
        ``{row: caption}`` for the rows whose scene has two or more objects.
    """
    out: dict[int, str] = {}
    if scenes is None:
        return out
    for row, i in enumerate(index):
        objects = scenes[i]
        if not objects or len(objects) < 2:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, int(i), 1]))  # apart from the dataset's draws
        k = int(rng.integers(1, len(objects)))
        pick = sorted(int(j) for j in rng.choice(len(objects), size=k, replace=False))
        out[row] = describe(rng, [objects[j] for j in pick])
    return out


@torch.no_grad()
def query_text(
    teacher: DualEncoder, tokenizer: Tokenizer, text: torch.Tensor, captions: dict[int, str]
) -> torch.Tensor:
    """(B, E) caption embeddings to train on: `text` with the rows of `captions` replaced by theirs."""
    if not captions:
        return text
    rows = list(captions)
    out = text.clone()
    out[rows] = teacher.encode_text(tokenizer.encode_batch([captions[r] for r in rows]).to(text.device))
    return out


def query_loss(
    predictors: Sequence[torch.nn.Module], tokens: Sequence[torch.Tensor], effects: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """Mean over stages of the listwise loss of each predictor against the caption's direct effects.

    Args:
        predictors: one `QueryKeepPredictor` per stage.
        tokens: per stage, (B, P) x C patch tokens at its input in the frozen baseline.
        effects: (B, P, E) from `training.saliency.direct_effects`.
        text: (B, E) normalised caption embeddings.

    Returns:
        The loss; the target of each row is its positive direct effects, normalised.
    """
    target = torch.einsum("bpe,be->bp", effects, text).clamp_min(0)  # (B, P)
    return sum(keep_rank_loss(f(t, text), target) for f, t in zip(predictors, tokens)) / len(tokens)
