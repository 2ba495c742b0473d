"""Training objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, hard_text: torch.Tensor | None = None
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of matching pairs.

    Args:
        image: (B, E) L2-normalised image embeddings.
        text: (B, E) L2-normalised caption embeddings; row i matches image i.
        logit_scale: log of the inverse temperature.
        hard_text: (K * B, E) optional hard-negative captions (an attribute changed or swapped), added
            as extra wrong answers of every image on the image->text side, as in NegCLIP; they teach
            the model to bind colours, shapes and positions to the right object.

    Returns:
        The mean of the image->text and text->image cross-entropies.
    """
    scale = logit_scale.exp()
    logits = scale * image @ text.t()  # (B, B)
    labels = torch.arange(len(image), device=image.device)
    i2t = logits if hard_text is None else torch.cat([logits, scale * image @ hard_text.t()], dim=1)  # (B, B + KB)
    return 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(logits.t(), labels))


def pair_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, hard_text: torch.Tensor
) -> torch.Tensor:
    """Each image's true caption against its own hard negatives alone: a softmax over 1 + K captions.

    In `contrastive_loss` an image's K hard negatives are K of B + KB wrong answers, and the
    easy ones (other scenes) share the gradient with them; this term puts the weight where
    attribute binding is learned (`TrainConfig.hard_negative_weight`).

    Args:
        image: (B, E) L2-normalised image embeddings.
        text: (B, E) L2-normalised caption embeddings; row i matches image i.
        logit_scale: log of the inverse temperature.
        hard_text: (K * B, E) hard negatives, negative j of image i at row ``j * B + i``
            (`training.synthetic.fresh_hard_negatives`).

    Returns:
        The mean over images of the cross-entropy of the true caption among the 1 + K.
    """
    b = len(image)
    if len(hard_text) == 0 or len(hard_text) % b:
        raise ValueError(f"pair_loss needs K * {b} hard negatives for {b} images, got {len(hard_text)}.")
    hard = hard_text.reshape(-1, b, hard_text.shape[-1])  # (K, B, E)
    cos = torch.cat([(image * text).sum(-1, keepdim=True), (image[None] * hard).sum(-1).t()], dim=1)  # (B, 1 + K)
    return F.cross_entropy(logit_scale.exp() * cos, torch.zeros(b, dtype=torch.long, device=image.device))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine between the pruned student's and the frozen teacher's embeddings, averaged."""
    return (1.0 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def keep_rank_loss(logits: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Listwise cross-entropy from a teacher's patch saliency to a keep predictor's logits.

    The target is the saliency normalised to a distribution over the patches, so the
    predictor learns the teacher's ranking at every keep ratio at once (top-k of the
    logits is what `learned` keeps, whatever k is).

    Args:
        logits: (B, n) keep logits.
        saliency: (B, n) non-negative importances; a row of zeros adds 0 to the mean.

    Returns:
        The mean over rows of ``-sum(q * log_softmax(logits))``.
    """
    q = saliency / saliency.sum(1, keepdim=True).clamp_min(1e-12)
    return -(q * F.log_softmax(logits, dim=1)).sum(1).mean()
