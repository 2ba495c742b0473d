"""Training objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of matching pairs.

    Args:
        image: (B, E) L2-normalised image embeddings.
        text: (B, E) L2-normalised caption embeddings; row i matches image i.
        logit_scale: log of the inverse temperature.

    Returns:
        The mean of the image->text and text->image cross-entropies.
    """
    logits = logit_scale.exp() * image @ text.t()  # (B, B)
    labels = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine between the pruned student's and the frozen teacher's embeddings, averaged."""
    return (1.0 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()
