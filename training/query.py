"""Training the caption-conditioned keep predictors of ``text_guided`` (in the pruned phase).

Each stage's `vlm_demo.pruning.QueryKeepPredictor` learns, with the towers frozen, to rank
the patch tokens at the stage's input like the caption's share of the frozen baseline's
image-caption cosine, carried back to that stage (`training.saliency.stage_effects`), with
the same listwise loss as the ``learned`` predictors.

A predictor that only ever sees captions naming every object in the scene may ignore the
caption: keeping every object is then always right. So where the data has object ground
truth (``objects.json``, as the synthetic scenes do), each image with n >= 2 objects draws
how many to name, 1 to n alike; short of n, it is trained with a caption naming that many,
chosen at random, written with the dataset's own templates, and its teacher is
contrastive: the effects on the cosine with that caption minus those on the cosine with a
caption naming the other objects, so what both captions share (that there are shapes on a
grey ground) cancels. The positive part ranks what to keep first (the named objects), the
negative part, at `DROP_WEIGHT`, what to drop first (the others). Drawing n, and images
with one object or without ground truth, use the image's own caption and no contrast, and
only the keep-first half: there the negative part marks no object the caption leaves out.

`DROP_WEIGHT` trades the two uses against each other (pilots in docs/training.md): at 1,
captions naming one object keep little of the other, but captions naming all of them keep
fewer of their objects; at 0.25, the other object comes back.
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
DROP_WEIGHT = 0.3  # of the drop-first half of the loss, against 1 for the keep-first half


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
        ``{row: Query}`` for the rows whose scene has two or more objects and drew fewer than all.
    """
    out: dict[int, Query] = {}
    if scenes is None:
        return out
    for row, i in enumerate(index):
        objects = scenes[i]
        if not objects or len(objects) < 2:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, int(i), 1]))  # apart from the dataset's draws
        k = int(rng.integers(1, len(objects) + 1))
        if k == len(objects):
            continue  # all of them: the image's own caption, which names them all, and no contrast
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
        The loss. Each row's effects on the cosine with ``text - contrast`` rank its patches: the
        positive part, normalised, is the target of the logits (what to keep first); in rows with
        a contrast, the negative part is that of the negated logits (what to drop first), at
        `DROP_WEIGHT`. With the positive part alone, every patch it gives no mass to, the other
        objects and the background alike, could fall anywhere below.
    """
    if contrast is None:
        contrast = torch.zeros_like(text)
    contrasted = contrast.ne(0).any(-1, keepdim=True)  # (B, 1) rows with a contrast
    losses = []
    for f, t, e in zip(predictors, tokens, effects):
        score = torch.einsum("bpe,be->bp", e, text - contrast)  # (B, P)
        logits = f(t, text)
        drop = torch.where(contrasted, (-score).clamp_min(0), torch.zeros_like(score))
        losses.append(keep_rank_loss(logits, score.clamp_min(0)) + DROP_WEIGHT * keep_rank_loss(-logits, drop))
    return sum(losses) / len(losses)
