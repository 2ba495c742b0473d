"""The learned predictors' teacher signal: gradient norms at each stage's input."""

import torch
import torch.nn.functional as F

from training.saliency import stage_effects, stage_saliency
from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder


def _by_hand(model: DualEncoder, pixels: torch.Tensor, text: torch.Tensor, stage: int) -> torch.Tensor:
    """The gradient norm at block `stage`'s input, running the blocks one by one."""
    v = model.visual
    x = v.embed(pixels)
    for block in v.blocks[:stage]:
        x = block(x)[0]
    x = x.detach().requires_grad_(True)
    y = x
    for block in v.blocks[stage:]:
        y = block(y)[0]
    score = (F.normalize(v.forward_head(y), dim=-1) * text).sum()
    (grad,) = torch.autograd.grad(score, x)
    return grad[:, 1:].norm(dim=-1)


def test_stage_saliency_is_the_gradient_norm_at_each_stage_input():
    torch.manual_seed(0)
    model = DualEncoder(get_preset("tiny").model).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen, as in the pruned phase
    pixels = torch.randn(3, 3, 32, 32)
    text = F.normalize(torch.randn(3, model.cfg.embed_dim), dim=-1)
    tokens, saliency, image = stage_saliency(model, pixels, text)
    stages = model.cfg.pruning.stages
    assert len(tokens) == len(saliency) == len(stages)
    for s, t, sal in zip(stages, tokens, saliency):
        assert t.shape == (3, model.cfg.vision.num_patches, model.cfg.vision.width) and not t.requires_grad
        assert torch.allclose(sal, _by_hand(model, pixels, text, s), atol=1e-6)
        assert (sal > 0).all()
    assert torch.allclose(image, model.encode_image(pixels), atol=1e-6)
    assert not any(b._forward_pre_hooks for b in model.visual.blocks)  # the hooks are removed


def test_stage_effects_from_the_saliency_pass_states_are_bit_identical():
    """The pruned phase shares one teacher forward between both teachers: the same effects, bit for bit."""
    torch.manual_seed(1)
    model = DualEncoder(get_preset("tiny").model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pixels = torch.randn(4, 3, 32, 32)
    text = F.normalize(torch.randn(4, model.cfg.embed_dim), dim=-1)
    states: list[torch.Tensor] = []
    shared = stage_saliency(model, pixels, text, states)
    alone = stage_saliency(model, pixels, text)
    assert len(states) == model.cfg.vision.depth + 1 and not any(s.requires_grad for s in states)
    for a, b in zip(shared[0] + shared[1] + [shared[2]], alone[0] + alone[1] + [alone[2]]):
        assert torch.equal(a, b)
    for a, b in zip(stage_effects(model, pixels, states), stage_effects(model, pixels)):
        assert torch.equal(a, b)
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in model.visual.blocks)
