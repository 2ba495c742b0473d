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


@torch.no_grad()
def direct_effects(model: DualEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """The teacher of ``text_guided``: each patch's direct effect on the image-caption cosine, for any caption.

    The image embedding is the final norm and projection of the CLS token, and the CLS
    token is a sum: its first value, plus each block's attention output and MLP output.
    Each attention output is a sum over the tokens the CLS token attends to,
    ``sum_j a_j W_O v_j`` (heads concatenated). Holding the final layer norm's scale at its
    value, the norm and projection are linear, so the embedding splits exactly into one
    term per (block, token) (Gandelsman et al., *Interpreting CLIP's Image Representation
    via Text-Based Decomposition*, ICLR 2024). A patch's direct effect on the cosine with
    a caption ``t`` is the sum of its terms over the blocks, dotted with ``t``, over the
    embedding's norm. Unlike the gradient norm of `stage_saliency`, it has a sign and
    follows the caption: a caption that names one of two objects gives that object's
    patches most of the mass, and the other object's little.

    Args:
        model: the frozen baseline, unpruned.
        pixels: (B, 3, H, W) normalised images.

    Returns:
        (B, P, E) vectors; ``effects @ t`` is each patch's direct effect on the cosine with
        the normalised caption embedding ``t``.
    """
    v = model.visual
    x = v.embed(pixels)  # (B, 1 + P, C)
    B, N, C = x.shape
    total = torch.zeros(B, N - 1, C, dtype=x.dtype, device=x.device)
    for block in v.blocks:
        h = block.attn.heads
        q, k, val = block.attn.qkv(block.norm1(x)).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        a = ((q[:, :, :1] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)[:, :, 0]  # (B, h, N) CLS row
        per_token = (a[..., None] * val).transpose(1, 2).reshape(B, N, C)  # (B, N, C) heads concatenated
        total += per_token[:, 1:] @ block.attn.proj.weight.T  # W_O, its bias belongs to no token
        x, _ = block(x)
    cls = x[:, 0]  # (B, C) the CLS token before the final norm
    scale = (cls.var(-1, unbiased=False, keepdim=True) + v.norm.eps).sqrt()  # (B, 1)
    norm = v.proj(v.norm(cls)).norm(dim=-1, keepdim=True)  # (B, 1) the embedding's norm
    centred = total - total.mean(-1, keepdim=True)  # the norm's mean is linear too
    return v.proj(v.norm.weight * centred / scale[:, None]) / norm[:, None]
