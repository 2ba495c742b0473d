"""An auxiliary objective of the baseline on synthetic data: read the scene's layout from both embeddings.

Contrastive training alone leaves the shipped baseline blind to where things are and to what goes
with what: after 9 epochs its caption embeddings of "a small red circle at the top left" and "... at
the bottom right" had a cosine of 1.000, and hard-negative pairs that move or swap an attribute
scored at chance. Neither tower gains from encoding position until the other does (a symmetric
saddle that contrastive gradients leave slowly). So the baseline phase also trains one linear
`LayoutHead`, shared by both towers, to read from an L2-normalised embedding, for each of the
synthetic scene's 9 cells, the colour, shape and size of the object there (or "empty"): the image
embedding and the caption's must both carry the layout, in the same coordinates. The head is
training-only (not in the checkpoint); without objects.json (real data) the objective is off.
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


class LayoutHead(nn.Module):
    """(B, E) embeddings -> per cell and attribute, logits over "empty" + the attribute's values."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({a: nn.Linear(embed_dim, CELLS * (1 + len(v))) for a, v in ATTRIBUTES.items()})

    def loss(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over cells and attributes.

        Args:
            emb: (B, E) embeddings.
            target: (B, 3, CELLS) class per attribute (`ATTRIBUTES` order) and cell; 0 is "empty".
        """
        losses = []
        for i, (name, head) in enumerate(self.heads.items()):
            logits = head(emb).view(len(emb), CELLS, -1)  # (B, CELLS, 1 + values)
            losses.append(F.cross_entropy(logits.flatten(0, 1), target[:, i].flatten()))
        return torch.stack(losses).mean()


def layout_targets(scenes: Sequence[Sequence[dict[str, Any]] | None], index: Sequence[int]) -> torch.Tensor | None:
    """(B, 3, CELLS) `LayoutHead` targets of the batch rows' scenes; None when a row's objects are unknown."""
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
