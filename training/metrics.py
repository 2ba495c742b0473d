"""Evaluation metrics: pure functions on tensors, no I/O.

Shape legend: I images, T captions (texts), E embedding width, B images in a
batch, k kept patch tokens, P patches of the full grid (``grid * grid``).

Definitions (also stated in the evaluation report):

* **Recall@K** follows the Flickr8k protocol (Hodosh et al. 2013, Karpathy split
  practice). Image -> text: an image is a hit at K if *any* of its captions is
  among its K best captions. Text -> image: a caption is a hit at K if its image
  is among its K best images. **Ties are pessimistic**: a competitor whose score
  equals the ground truth's counts as ranked above it, so a constant model scores
  (close to) zero rather than a lucky 100.
* **Lossy-ness** is the course report's Eq. 6, ``1 - R@1_method / R@1_baseline``,
  taken on mean R@1 (average of i2t and t2i). 0 means no loss; negative means the
  method beat the baseline.
* **Object recall** is the share of ground-truth object patches whose token
  survives the last pruning stage. A patch is an object patch when at least half
  of its cell's area lies inside one object box. Counts pool over every image, so
  images with large objects weigh more. Uniformly random pruning that keeps k of
  P patches has expectation ``k / P`` (`random_expectation`).
* **Pair accuracy**: the share of images whose cosine with their true caption is
  strictly higher than with the hard-negative caption (ties count as misses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def recall_at_k(
    sim: torch.Tensor, caption_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image<->text retrieval Recall@K in percent, Flickr8k protocol, pessimistic ties.

    Args:
        sim: (I, T) similarity of every image with every caption.
        caption_to_image: (T,) int64, the index of each caption's image.
        ks: the cut-offs K.

    Returns:
        ``{"r{k}_i2t": ..., "r{k}_t2i": ...}`` for each K, in percent (0..100).
        Image -> text averages over the images that own at least one caption.

    Raises:
        ValueError: if the shapes disagree or a caption points at no image.
    """
    if sim.ndim != 2:
        raise ValueError(f"sim must be (images, captions), got shape {tuple(sim.shape)}.")
    num_images, num_captions = sim.shape
    owner = caption_to_image.to(device=sim.device, dtype=torch.long).reshape(-1)
    if owner.numel() != num_captions:
        raise ValueError(f"caption_to_image has {owner.numel()} entries but sim has {num_captions} captions.")
    if num_captions == 0 or num_images == 0:
        raise ValueError("recall_at_k needs at least one image and one caption.")
    if int(owner.min()) < 0 or int(owner.max()) >= num_images:
        raise ValueError(f"caption_to_image must index images 0..{num_images - 1}.")
    sim = sim.float()
    gt = owner[None, :] == torch.arange(num_images, device=sim.device)[:, None]  # (I, T)

    # i2t: the first ground-truth caption in the ranking sits after every non-GT caption
    # that scores at least as high as the best GT caption (ties pessimistic).
    best_gt = sim.masked_fill(~gt, -math.inf).amax(1)  # (I,)
    rank_i2t = ((sim >= best_gt[:, None]) & ~gt).sum(1) + 1  # (I,) 1-based
    has_caption = gt.any(1)
    rank_i2t = rank_i2t[has_caption]

    # t2i: every other image scoring at least the GT image's score ranks above it.
    cols = torch.arange(num_captions, device=sim.device)
    gt_score = sim[owner, cols]  # (T,)
    rank_t2i = (sim >= gt_score[None, :]).sum(0)  # (T,) counts the GT image itself, hence already 1-based

    out: dict[str, float] = {}
    for k in ks:
        out[f"r{k}_i2t"] = 100.0 * float((rank_i2t <= k).float().mean())
        out[f"r{k}_t2i"] = 100.0 * float((rank_t2i <= k).float().mean())
    return out


def lossyness(r1_method: float | None, r1_baseline: float | None) -> float | None:
    """The report's Eq. 6: ``1 - r1_method / r1_baseline``.

    Args:
        r1_method: the method's (mean) R@1.
        r1_baseline: the unpruned baseline's (mean) R@1, same units.

    Returns:
        The loss as a fraction (0.2 = a fifth of the baseline's R@1 lost), or None when
        either value is missing or the baseline's R@1 is 0 (the ratio is undefined).
    """
    if r1_method is None or r1_baseline is None:
        return None
    if not math.isfinite(r1_baseline) or not math.isfinite(r1_method) or r1_baseline <= 0:
        return None
    return 1.0 - r1_method / r1_baseline


def object_patch_mask(boxes: Sequence[Sequence[float]], grid: int, image_size: float) -> torch.Tensor:
    """Which patches of a ``grid x grid`` layout are object patches.

    A patch is an object patch when its overlap with one box covers at least 50%
    of the patch's area (overlaps with different boxes are not added together).

    Args:
        boxes: ``[x0, y0, x1, y1]`` pixel boxes (x1, y1 exclusive) in an image of side `image_size`.
        grid: patches per side.
        image_size: the side the boxes are expressed in.

    Returns:
        (P,) bool, row-major like the patch tokens.
    """
    cell = image_size / grid
    edges = torch.arange(grid + 1, dtype=torch.float64) * cell
    lo, hi = edges[:-1], edges[1:]  # (grid,)
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        ox = (torch.minimum(hi, torch.tensor(x1)) - torch.maximum(lo, torch.tensor(x0))).clamp_min(0)  # (grid,)
        oy = (torch.minimum(hi, torch.tensor(y1)) - torch.maximum(lo, torch.tensor(y0))).clamp_min(0)
        mask |= (oy[:, None] * ox[None, :]) >= 0.5 * cell * cell - 1e-9  # rows are y, columns x
    return mask.reshape(-1)


def object_recall_counts(
    kept_positions: torch.Tensor,
    boxes: Sequence[Sequence[Sequence[float]]],
    grid: int,
    image_size: float,
) -> tuple[int, int]:
    """(object patches kept, object patches) pooled over a batch; see `object_recall`."""
    kept_positions = torch.as_tensor(kept_positions).long().cpu()
    if kept_positions.ndim != 2 or kept_positions.shape[0] != len(boxes):
        raise ValueError(
            f"kept_positions must be (B, k) with one row per image; got {tuple(kept_positions.shape)} "
            f"for {len(boxes)} images."
        )
    P = grid * grid
    kept_total, objects_total = 0, 0
    for row, image_boxes in zip(kept_positions, boxes):
        obj = object_patch_mask(image_boxes, grid, image_size)  # (P,)
        row = row[(row >= 0) & (row < P)]  # -1 marks a fused token: it is no patch
        kept = torch.zeros(P, dtype=torch.bool)
        kept[row] = True
        kept_total += int((kept & obj).sum())
        objects_total += int(obj.sum())
    return kept_total, objects_total


def object_recall(
    kept_positions: torch.Tensor,
    boxes: Sequence[Sequence[Sequence[float]]],
    grid: int,
    image_size: float,
) -> float:
    """Share of object patches that survive pruning, pooled over all images.

    Args:
        kept_positions: (B, k) original patch positions (row-major, 0..P-1) kept after the
            last stage; -1 entries (a fused token) are ignored.
        boxes: per image, its ``[x0, y0, x1, y1]`` object boxes in pixels of an image of side `image_size`.
        grid: patches per side.
        image_size: the side the boxes are expressed in.

    Returns:
        Kept object patches / object patches, in [0, 1]; NaN if there is no object patch.
    """
    kept, total = object_recall_counts(kept_positions, boxes, grid, image_size)
    return kept / total if total else math.nan


def random_expectation(keep_ratio: float, num_patches: int | None = None) -> float:
    """Object recall that uniformly random pruning gets in expectation.

    Random keeping of k of P patches keeps each patch with probability k / P, whatever
    is on it. With `num_patches` the rounding of the final count is taken into account
    (k = round(P * keep_ratio), at least 1); without it this is the keep ratio itself.
    """
    if num_patches is None:
        return float(keep_ratio)
    return max(1, round(num_patches * keep_ratio)) / num_patches


def pair_accuracy(
    img_emb: torch.Tensor,
    pos_text_emb: torch.Tensor,
    neg_text_emb: torch.Tensor,
    neg_img_emb: torch.Tensor | None = None,
) -> float:
    """Percent of images closer (cosine) to their true caption than to the hard negative (`pair_right`)."""
    return 100.0 * float(pair_right(img_emb, pos_text_emb, neg_text_emb, neg_img_emb).float().mean())


def pair_right(
    img_emb: torch.Tensor,
    pos_text_emb: torch.Tensor,
    neg_text_emb: torch.Tensor,
    neg_img_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """Whether each image is closer (cosine) to its true caption than to its hard negative.

    Args:
        img_emb: (B, E) image embeddings (normalised here).
        pos_text_emb: (B, E) embeddings of each image's true caption (caption #0).
        neg_text_emb: (B, E) embeddings of each image's hard-negative caption.
        neg_img_emb: (B, E) optional image embeddings to score the hard negative with.
            Query-aware pruning (``text_guided``) prunes an image differently for each
            caption, so each caption is scored against the image pruned with it:
            `img_emb` pruned with the true caption, `neg_img_emb` with the hard negative.
            None scores both captions against `img_emb`.

    Returns:
        (B,) booleans; a tie counts as a miss.
    """
    neg_img_emb = img_emb if neg_img_emb is None else neg_img_emb
    shapes = [tuple(t.shape) for t in (img_emb, pos_text_emb, neg_text_emb, neg_img_emb)]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise ValueError(f"pair_accuracy needs (B, E) tensors of one shape, got {shapes}.")
    if shapes[0][0] == 0:
        raise ValueError("pair_accuracy needs at least one image.")
    pos = (F.normalize(img_emb.float(), dim=-1) * F.normalize(pos_text_emb.float(), dim=-1)).sum(-1)
    neg = (F.normalize(neg_img_emb.float(), dim=-1) * F.normalize(neg_text_emb.float(), dim=-1)).sum(-1)
    return pos > neg
