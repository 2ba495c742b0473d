"""An auxiliary objective of the baseline on synthetic data: both embeddings must point at the scene's layout code.

Contrastive training alone leaves the baseline blind to where things are and to what goes with what:
after 9 epochs the shipped baseline's caption embeddings of "a small red circle at the top left" and
"... at the bottom right" had a cosine of 1.000, and hard-negative pairs that move or swap an attribute
scored at chance. Neither tower gains from encoding position until the other does: a symmetric saddle
that contrastive gradients leave slowly. A learned linear head reading each cell's attributes from the
embeddings (this module's first version) sat on the same saddle: while the embeddings ignore position,
its readouts of the 9 cells become alike, and so do the gradients they send back (after 8 epochs its
loss had stalled at 0.774 and the captions' cosine across positions was still 1.000).

So the readout is fixed instead. `LayoutCode` holds one random unit vector per (cell, attribute value),
drawn once from a fixed seed; a scene's code is the normalised sum of the vectors of its objects'
(cell, colour), (cell, shape) and (cell, size). The baseline phase adds ``1 - cos(embedding, code)`` for
the image and for its caption, so both towers learn the same conjunctive coordinates: moving an object,
or swapping a colour between two, changes a third to a ninth of the code. The code is training-only (not
in the checkpoint); without objects.json (real data) the objective is off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.synthetic import COLORS, POSITIONS, SHAPES, SIZES

ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}
CELLS = len(POSITIONS)
CODE_SEED = 0  # the fixed seed of the code vectors: a property of the objective, not of a run


class LayoutCode(nn.Module):
    """Fixed random code vectors; `loss` pulls (B, E) embeddings towards their scenes' codes."""

    def __init__(self, embed_dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(CODE_SEED)
        for name, values in ATTRIBUTES.items():  # row 0 ("empty") stays zero: an empty cell adds nothing
            vectors = F.normalize(torch.randn(CELLS, len(values), embed_dim, generator=g), dim=-1)
            # not persistent: the seed alone rebuilds them, so no state file carries them
            self.register_buffer(name, torch.cat([torch.zeros(CELLS, 1, embed_dim), vectors], dim=1), persistent=False)

    def codes(self, target: torch.Tensor) -> torch.Tensor:
        """(B, 3, CELLS) class per attribute (`ATTRIBUTES` order) and cell, 0 = empty -> (B, E) unit codes."""
        cells = torch.arange(CELLS, device=target.device)
        total = sum(getattr(self, name)[cells, target[:, i]].sum(1) for i, name in enumerate(ATTRIBUTES))
        return F.normalize(total, dim=-1)

    def loss(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean of ``1 - cos(emb, code)`` over the batch.

        Args:
            emb: (B, E) embeddings.
            target: (B, 3, CELLS) `layout_targets`.
        """
        return (1.0 - F.cosine_similarity(emb.float(), self.codes(target), dim=-1)).mean()


def layout_targets(scenes: Sequence[Sequence[dict[str, Any]] | None], index: Sequence[int]) -> torch.Tensor | None:
    """(B, 3, CELLS) `LayoutCode` targets of the batch rows' scenes; None when a row's objects are unknown."""
    out = torch.zeros(len(index), len(ATTRIBUTES), CELLS, dtype=torch.long)
    for row, i in enumerate(index):
        objects = scenes[i]
        if not objects:
            return None
        for o in objects:
            cell = POSITIONS.index(o["position"])
            for a, (name, values) in enumerate(ATTRIBUTES.items()):
                out[row, a, cell] = 1 + values.index(o[name])
    return out
