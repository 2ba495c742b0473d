"""The teacher signals of the keep predictors: how much each patch token matters.

``learned`` (`stage_saliency`): for each pruning stage, the norm of the gradient of the
image-caption cosine with respect to each patch token at the stage's input, in the
frozen baseline. It is large on the tokens the caption depends on (on the synthetic
set, the objects) and needs the caption only in training: the predictors learn to
rank patches without it.

``text_guided`` (`stage_effects`): each token's signed share of the cosine, linear in
the caption, so that captions naming different objects rank different patches first.
"""

from __future__ import annotations

import torch

from vlm_demo.model import DualEncoder


def stage_saliency(
    model: DualEncoder, pixels: torch.Tensor, text: torch.Tensor, states: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The unpruned model's patch tokens at each stage's input, their saliency, and its embedding.

    Args:
        model: the frozen baseline.
        pixels: (B, 3, H, W) normalised images.
        text: (B, E) normalised embeddings of each image's caption.
        states: a list that, if given, receives the (B, 1 + P, C) tokens at every block's input and, last, the
            last block's output, detached: the forward `stage_effects` would otherwise run again.

    Returns:
        ``(tokens, saliency, image)``: per stage, (B, P, C) patch tokens (detached) and (B, P)
        gradient norms; and the (B, E) normalised image embeddings (detached).
    """
    captured: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, args: tuple) -> None:
        captured.append(args[0])

    def grab_output(_module: torch.nn.Module, _args: tuple, output: tuple) -> None:
        captured.append(output[0])

    blocks = model.visual.blocks
    hooks = [block.register_forward_pre_hook(grab) for block in blocks]
    hooks.append(blocks[-1].register_forward_hook(grab_output))
    try:
        with torch.enable_grad():
            pixels = pixels.detach().requires_grad_(True)  # the graph exists even with frozen weights
            image = model.encode_image(pixels)
            score = (image * text).sum()
            at_stages = [captured[s] for s in model.cfg.pruning.stages]
            grads = torch.autograd.grad(score, at_stages)
    finally:
        for h in hooks:
            h.remove()
    if states is not None:
        states.extend(x.detach() for x in captured)
    tokens = [x[:, 1:].detach() for x in at_stages]
    return tokens, [g[:, 1:].norm(dim=-1) for g in grads], image.detach()


@torch.no_grad()
def _decompose(
    model: DualEncoder, pixels: torch.Tensor, states: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block of the unpruned image tower: the (B, P, E) direct effects of the patch tokens at its input, and
    its (B, N, N) attention averaged over heads (CLS first). See `direct_effects`. `states`, from `stage_saliency`
    on the same pixels, are the tokens at each block's input and after the last: the blocks are not run again."""
    v = model.visual
    x = v.embed(pixels) if states is None else states[0]  # (B, 1 + P, C)
    B, N, C = x.shape
    terms, attention = [], []
    for i, block in enumerate(v.blocks):
        h = block.attn.heads
        q, k, val = block.attn.qkv(block.norm1(x)).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)  # (B, h, N, N)
        per_token = (a[:, :, 0, :, None] * val).transpose(1, 2).reshape(B, N, C)  # (B, N, C) heads concatenated
        terms.append(per_token[:, 1:] @ block.attn.proj.weight.T)  # W_O, its bias belongs to no token
        attention.append(a.mean(1))
        x = block(x)[0] if states is None else states[i + 1]
    cls = x[:, 0]  # (B, C) the CLS token before the final norm
    scale = (cls.var(-1, unbiased=False, keepdim=True) + v.norm.eps).sqrt()  # (B, 1)
    norm = v.proj(v.norm(cls)).norm(dim=-1, keepdim=True)  # (B, 1) the embedding's norm
    # The norm's mean is linear too: centre each term, then scale and project it.
    effects = [v.proj(v.norm.weight * (t - t.mean(-1, keepdim=True)) / scale[:, None]) / norm[:, None] for t in terms]
    return effects, attention


def direct_effects(model: DualEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """Each patch's direct effect on the image-caption cosine, for any caption.

    The image embedding is the final norm and projection of the CLS token, and the CLS
    token is a sum: its first value, plus each block's attention output and MLP output.
    Each attention output is a sum over the tokens the CLS token attends to,
    ``sum_j a_j W_O v_j`` (heads concatenated). Holding the final layer norm's scale at its
    value, the norm and projection are linear, so the embedding splits exactly into one
    term per (block, token) (Gandelsman et al., *Interpreting CLIP's Image Representation
    via Text-Based Decomposition*, ICLR 2024). A patch's direct effect on the cosine with
    a caption ``t`` is the sum of its terms over the blocks, dotted with ``t``, over the
    embedding's norm. Unlike the gradient norm of `stage_saliency`, it has a sign and
    follows the caption.

    Args:
        model: the frozen baseline, unpruned.
        pixels: (B, 3, H, W) normalised images.

    Returns:
        (B, P, E) vectors; ``effects @ t`` is each patch's direct effect on the cosine with
        the normalised caption embedding ``t``.
    """
    return sum(_decompose(model, pixels)[0])


def stage_effects(
    model: DualEncoder, pixels: torch.Tensor, states: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """The teacher of ``text_guided``: the direct effects of `direct_effects`, carried back to each stage's input.

    A block's direct effects sit on the tokens at that block's input, and in a trained
    tower they are sparse: a few tokens of an object carry what the CLS token reads of
    it, after earlier blocks gathered it there. Attention rollout (Abnar and Zuidema,
    *Quantifying Attention Flow in Transformers*, ACL 2020) says where a token's content
    came from: through a block, token p is ``sum_q A'[p, q]`` times token q, with
    ``A' = (I + A) / 2`` for the residual and A the attention averaged over heads. Each
    block's effects are carried back to the stage's input that way and summed, so a
    stage token gets the effects of what the later tokens took from it; signed, and
    linear in the caption like the direct effects.

    Args:
        model: the frozen baseline, unpruned.
        pixels: (B, 3, H, W) normalised images.
        states: what `stage_saliency` put in its ``states`` for the same pixels and model, if it ran: the
            same effects, bit for bit, without running the blocks again (the pruned phase needs both).

    Returns:
        Per stage of ``model.cfg.pruning.stages``, (B, P, E) vectors; ``effects @ t`` is
        each stage token's share of the cosine with the caption embedding ``t``.
    """
    effects, attention = _decompose(model, pixels, states)
    B, P, E = effects[0].shape
    carried = torch.zeros(B, P + 1, E, dtype=effects[0].dtype, device=effects[0].device)  # at the next block's input
    at_input = []
    for block in reversed(range(len(effects))):
        mixed = 0.5 * (carried + torch.einsum("bpe,bpq->bqe", carried, attention[block]))  # back through the block
        carried = torch.cat([mixed[:, :1], mixed[:, 1:] + effects[block]], dim=1)
        at_input.append(carried[:, 1:])
    at_input.reverse()  # at_input[b]: at block b's input
    return [at_input[s] for s in model.cfg.pruning.stages]
