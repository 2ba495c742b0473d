"""The teacher signal of the learned keep predictors: how much each patch token matters.

For each pruning stage, the saliency of a patch token is the norm of the gradient of
the image-caption cosine with respect to that token at the stage's input, in the
frozen baseline. It is large on the tokens the caption depends on (on the synthetic
set, the objects) and needs the caption only in training: the predictors learn to
rank patches without it.
"""

from __future__ import annotations

import torch

from vlm_demo.model import DualEncoder


def stage_saliency(
    model: DualEncoder, pixels: torch.Tensor, text: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The unpruned model's patch tokens at each stage's input, their saliency, and its embedding.

    Args:
        model: the frozen baseline.
        pixels: (B, 3, H, W) normalised images.
        text: (B, E) normalised embeddings of each image's caption.

    Returns:
        ``(tokens, saliency, image)``: per stage, (B, P, C) patch tokens (detached) and (B, P)
        gradient norms; and the (B, E) normalised image embeddings (detached).
    """
    captured: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, args: tuple) -> None:
        captured.append(args[0])

    blocks = model.visual.blocks
    hooks = [blocks[s].register_forward_pre_hook(grab) for s in model.cfg.pruning.stages]
    try:
        with torch.enable_grad():
            pixels = pixels.detach().requires_grad_(True)  # the graph exists even with frozen weights
            image = model.encode_image(pixels)
            score = (image * text).sum()
            grads = torch.autograd.grad(score, captured)
    finally:
        for h in hooks:
            h.remove()
    tokens = [x[:, 1:].detach() for x in captured]
    return tokens, [g[:, 1:].norm(dim=-1) for g in grads], image.detach()
