"""Training the caption-conditioned keep predictors of ``text_guided`` (in the pruned phase).

Each stage's `vlm_demo.pruning.QueryKeepPredictor` learns, with the towers frozen, to rank
the patch tokens at the stage's input like the caption's share of the frozen baseline's
image-caption cosine, carried back to that stage (`training.saliency.stage_effects`), with
the same listwise loss as the ``learned`` predictors.

A predictor that only ever sees captions naming every object in the scene may ignore the
caption: keeping every object is then always right. So where the data has object ground
truth (``objects.json``, as the synthetic scenes do), each image with two or more objects
is trained with a caption naming a random non-empty proper subset of them, written with
the dataset's own templates. Its teacher is contrastive: the effects on the cosine with
that caption minus those on the cosine with a caption naming the other objects, so what
both captions share (that there are shapes on a grey ground) cancels, the named objects
rank first and the others last. Images with one object, and data without ground truth,
use the image's own caption and no contrast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from training.losses import keep_rank_loss
from training.synthetic import describe
from vlm_demo.model import DualEncoder
from vlm_demo.tokenizer import Tokenizer

Scene = Sequence[dict[str, Any]]  # an image's objects, as objects.json lists them


class Query(NamedTuple):
    """A caption naming part of a scene, and one naming the rest (its teacher's contrast)."""

    caption: str
    rest: str


def subset_captions(
    index: Sequence[int], scenes: Sequence[Scene | None] | None, seed: int, epoch: int
) -> dict[int, Query]:
    """Captions naming part of each multi-object scene, by row of the batch, with captions naming the rest.

    Args:
        index: the dataset index of each row.
        scenes: per dataset index, its objects (None or empty where unknown); None: no ground truth.
        seed: the run's seed.
        epoch: the epoch; with `seed` and the index it fixes every draw, whatever the batch.

    Returns:
        ``{row: Query}`` for the rows whose scene has two or more objects.
    """
    out: dict[int, Query] = {}
    if scenes is None:
        return out
    for row, i in enumerate(index):
        objects = scenes[i]
        if not objects or len(objects) < 2:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, int(i), 1]))  # apart from the dataset's draws
        k = int(rng.integers(1, len(objects)))
        pick = sorted(int(j) for j in rng.choice(len(objects), size=k, replace=False))
        caption = describe(rng, [objects[j] for j in pick])
        out[row] = Query(caption, describe(rng, [o for j, o in enumerate(objects) if j not in pick]))
    return out


@torch.no_grad()
def query_text(
    teacher: DualEncoder, tokenizer: Tokenizer, text: torch.Tensor, queries: dict[int, Query]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, E) caption embeddings to train on, and (B, E) those of their contrasts.

    `text` with the rows of `queries` replaced by their captions' embeddings; the contrast is
    the embedding of the caption naming the rest of the scene there, and zero elsewhere.
    """
    contrast = torch.zeros_like(text)
    if not queries:
        return text, contrast
    rows = list(queries)
    encoded = teacher.encode_text(tokenizer.encode_batch([q for r in rows for q in queries[r]]).to(text.device))
    out = text.clone()
    out[rows], contrast[rows] = encoded[0::2], encoded[1::2]
    return out, contrast


def query_loss(
    predictors: Sequence[torch.nn.Module],
    tokens: Sequence[torch.Tensor],
    effects: Sequence[torch.Tensor],
    text: torch.Tensor,
    contrast: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over stages of the listwise loss of each predictor against the caption's effects at its stage.

    Args:
        predictors: one `QueryKeepPredictor` per stage.
        tokens: per stage, (B, P) x C patch tokens at its input in the frozen baseline.
        effects: per stage, (B, P, E) from `training.saliency.stage_effects`.
        text: (B, E) normalised caption embeddings: what the predictors see.
        contrast: (B, E) embeddings of the captions naming the rest of each scene, zero where none; None: none.

    Returns:
        The loss. Each row's effects on the cosine with ``text - contrast`` rank its patches at
        both ends: the positive part, normalised, is the target of the logits (what to keep
        first), the negative part that of the negated logits (what to drop first). With the
        positive part alone, every patch it gives no mass to, the other objects and the
        background alike, could fall anywhere below.
    """
    direction = text if contrast is None else text - contrast
    losses = []
    for f, t, e in zip(predictors, tokens, effects):
        score = torch.einsum("bpe,be->bp", e, direction)  # (B, P)
        logits = f(t, text)
        losses.append(keep_rank_loss(logits, score.clamp_min(0)) + keep_rank_loss(-logits, (-score).clamp_min(0)))
    return sum(losses) / len(losses)
