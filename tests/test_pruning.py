"""Pruning methods: hand-worked examples, the common rules, and the learned scorer's fused token."""

import pytest
import torch

from vlm_demo import pruning
from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder
from vlm_demo.pruning import PruneSpec, Signals, keep_counts

METHODS = pruning.names()


def tokens(n: int = 6, c: int = 3) -> torch.Tensor:
    """(1, 1 + n, c): CLS = -1s, patch i = i + 1 in every channel, easy to follow."""
    patches = torch.arange(1, n + 1, dtype=torch.float32)[:, None].expand(n, c)
    return torch.cat([-torch.ones(1, c), patches])[None]


def test_keep_counts_schedule():
    assert keep_counts(196, 1.0, 2) == [196, 196]
    assert keep_counts(196, 0.25, 2) == [98, 49]  # sqrt(0.25) = 0.5 after stage 1, 0.25 after stage 2
    assert keep_counts(196, 0.3, 3)[-1] == round(196 * 0.3)
    assert keep_counts(10, 0.01, 2) == [1, 1]  # never below one patch
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_counts(196, 0.0, 2)


def test_cls_attention_keeps_top_attention_in_order():
    x = tokens()
    attn = torch.tensor([[0.10, 0.50, 0.05, 0.30, 0.02, 0.03]])
    red = pruning.cls_attention(x, 2, Signals(cls_attn=attn))
    # Patches 1 and 3 (values 2 and 4) have the most attention; they stay in original order.
    assert torch.equal(red.x, torch.tensor([[[-1.0] * 3, [2.0] * 3, [4.0] * 3]]))
    assert red.source.tolist() == [[-1, 0, -1, 1, -1, -1]]
    assert red.rep.tolist() == [[1, 3]]


def test_cls_attention_fuses_the_inattentive_tokens():
    x = tokens()
    attn = torch.tensor([[0.10, 0.50, 0.05, 0.30, 0.02, 0.03]])
    red = pruning.cls_attention(x, 2, Signals(cls_attn=attn, fuse=True))
    # EViT's extra token is the attention-weighted *sum* of the dropped tokens, as in its code:
    # patches 0, 2, 4, 5 (values 1, 3, 5, 6) weighted 0.10, 0.05, 0.02, 0.03 -> 0.10 + 0.15 + 0.10 + 0.18 = 0.53.
    assert red.x.shape == (1, 4, 3)
    assert torch.allclose(red.x[0, 3], torch.full((3,), 0.53))
    assert red.source.tolist() == [[2, 0, 2, 1, 2, 2]]
    assert red.rep.tolist() == [[1, 3, -1]]


def test_random_is_seeded_and_keeps_exact_rows():
    x = torch.randn(3, 9, 4)
    runs = [pruning.random(x, 3, Signals(generator=torch.Generator().manual_seed(s))) for s in (7, 7, 8)]
    assert torch.equal(runs[0].rep, runs[1].rep)  # same seed, same patches
    assert not torch.equal(runs[0].rep, runs[2].rep)
    red = runs[0]
    assert red.rep.shape == (3, 3)  # the same k for every sample
    assert torch.equal(red.rep, red.rep.sort(dim=1).values)
    for b in range(3):
        assert torch.equal(red.x[b, 0], x[b, 0])  # CLS first, untouched
        assert torch.equal(red.x[b, 1:], x[b, 1 + red.rep[b]])


def tome_example():
    # Similarity metric: A = patches 0, 2, 4; B = patches 1, 3, 5.
    # 0 ~ 1 exactly (cos 1), 4 ~ 3 closely (cos 0.99), 2 is far from everything.
    e = torch.eye(4)
    metric = torch.stack([e[0], e[0], e[1], e[2], 0.99 * e[2] + 0.14 * e[3], e[3]])[None]
    return tokens(), metric


def test_tome_merges_the_most_similar_pair():
    x, metric = tome_example()
    red = pruning.tome(x, 5, Signals(keys=metric))
    # Patch 0 merges into patch 1: (1 + 2) / 2 = 1.5. Output: unmerged A (2, 4), then B (1, 3, 5).
    expected = torch.tensor([-1.0, 3.0, 5.0, 1.5, 4.0, 6.0])[:, None].expand(6, 3)
    assert torch.equal(red.x[0], expected)
    assert red.size.tolist() == [[1, 1, 1, 2, 1, 1]]
    assert red.source.tolist() == [[2, 2, 0, 3, 1, 4]]  # the patch-to-group map the overlay draws
    assert red.rep.tolist() == [[2, 4, 1, 3, 5]]


def test_tome_second_merge_and_size_weighting():
    x, metric = tome_example()
    red = pruning.tome(x, 4, Signals(keys=metric))
    # Also patch 4 -> patch 3: (4 + 5) / 2.
    assert red.x[0, :, 0].tolist() == [-1.0, 3.0, 1.5, 4.5, 6.0]
    assert red.source.tolist() == [[1, 1, 0, 2, 2, 3]]
    # Sizes weight the mean: patch 0 already stands for 3 patches.
    size = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    red = pruning.tome(x, 5, Signals(keys=metric, size=size))
    assert red.x[0, 3, 0].item() == pytest.approx((3 * 1 + 1 * 2) / 4)
    assert red.size[0, 3].item() == 4


def test_tome_several_rounds_reach_k():
    x = torch.randn(2, 1 + 16, 8)
    red = pruning.tome(x, 3, Signals(keys=torch.randn(2, 16, 4)))
    assert red.x.shape == (2, 4, 8)
    assert red.size[:, 1:].sum(1).tolist() == [16.0, 16.0]  # every patch is in exactly one group
    assert set(red.source[0].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_identity_at_full_keep(method):
    x = torch.randn(2, 1 + 8, 4)
    sig = Signals(
        cls_attn=torch.rand(2, 8), keys=torch.randn(2, 8, 4), predictor=torch.randn(2, 8), text=torch.randn(2, 8),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    red = pruning.REGISTRY[method].fn(x, 8, sig)
    assert torch.equal(red.x, x)


@pytest.mark.parametrize("method", METHODS)
def test_keep_ratio_one_gives_the_baseline_output(method):
    torch.manual_seed(0)
    model = DualEncoder(pruning.checkpoint_config(get_preset("tiny").model, method)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    text = torch.nn.functional.normalize(torch.randn(1, model.cfg.embed_dim), dim=-1)
    with torch.inference_mode():
        base = model.encode_image(pixels)
        out = model.encode_image(pixels, PruneSpec(method, 1.0, text=text if method == "text_guided" else None))
    assert torch.equal(out, base)


@pytest.mark.parametrize("method", METHODS[1:])
def test_pruned_forward_keeps_cls_and_the_schedule(method):
    torch.manual_seed(0)
    model = DualEncoder(pruning.checkpoint_config(get_preset("default").model, method)).eval()
    pixels = torch.randn(2, 3, 112, 112)
    text = torch.nn.functional.normalize(torch.randn(1, model.cfg.embed_dim), dim=-1)
    spec = PruneSpec(method, 0.3, text=text if method == "text_guided" else None)
    with torch.inference_mode():
        tokens_out, trace = model.visual.forward_features(pixels, spec)
    # Paper placements on 6 blocks: EViT inside blocks 1, 3, 4, DynamicViT before them (its own checkpoint's
    # stages); ToMe in all 6; the others before 1 and 3.
    blocks = {"cls_attention": (1, 3, 4), "dynamicvit": (1, 3, 4), "tome": tuple(range(6))}.get(method, (1, 3))
    assert trace.stage_blocks == blocks and [s.block for s in trace.stages] == list(blocks)
    info = pruning.get(method)
    fused = bool(info.fusion)  # learned, text_guided, cls_attention: a fused token rides along, its position -1
    final = trace.tokens_per_stage()[-1]
    assert tokens_out.shape == (2, 1 + final, 128)
    for i, stage in enumerate(trace.stages):
        assert stage.kept.shape[0] == 2  # one k for the whole batch
        assert stage.groups.shape == (2, 196)
        assert ((stage.kept >= -1) & (stage.kept < 196)).all()
        # learned and text_guided keep one background token; EViT may keep an earlier stage's fused token.
        most = {"background": 1, "stage": i + 1}.get(info.fusion, 0)
        assert ((stage.kept == -1).sum(1) <= most).all() and (not fused or (stage.kept[:, -1] == -1).all())
    if info.reduction == "merge" or fused:
        assert (trace.stages[-1].groups >= 0).all()  # merged or fused: every patch is in some token
    else:
        assert (trace.stages[-1].groups >= 0).sum(1).tolist() == [final] * 2


def test_stage_counts_follow_each_papers_convention():
    # DynamicViT / EViT: a per-stage keep rate r ** (1 / S); ToMe: a constant r per block.
    assert pruning.stage_counts("cls_attention", 196, 0.343, 3) == [137, 96, 67]  # 0.7 per stage, as EViT-S
    assert pruning.stage_counts("tome", 196, 0.5, 12) == [188 - 8 * i for i in range(12)]  # r = round(98 / 12) = 8
    assert pruning.stage_counts("tome", 16, 0.1, 2) == [9, 5]  # r = 7, then capped at half of 9
    assert pruning.quarter_points(12) == (3, 6, 9) and pruning.quarter_points(6) == (1, 3, 4)
    assert pruning.resolve_stages("tome", 12, (1, 3)) == tuple(range(12))
    assert pruning.resolve_stages("tome", 12, (1, 3), "shared") == (1, 3)
    assert pruning.resolve_stages("random", 12, (1, 3), (9, 2)) == (2, 9)
    with pytest.raises(ValueError, match="trained for blocks"):
        pruning.resolve_stages("learned", 6, (1, 3), (2, 4))
    with pytest.raises(ValueError, match="blocks 1..5"):
        pruning.resolve_stages("random", 6, (1, 3), (0, 2))  # before block 0 there is no block to score with
    with pytest.raises(ValueError, match="Unknown placement"):
        pruning.resolve_stages("random", 6, (1, 3), "everywhere")


def test_evit_prunes_inside_the_block_from_its_own_attention():
    """One block by hand: EViT's order is attention, prune and fuse by that attention, then the MLP."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").model
    model = DualEncoder(cfg).eval()
    vit = model.visual
    pixels = torch.randn(1, 3, 32, 32)
    spec = PruneSpec("cls_attention", 0.5, stages=(2,))
    with torch.inference_mode():
        got, trace = vit.forward_features(pixels, spec)
        x = vit.embed(pixels)
        for block in vit.blocks[:2]:
            x, _ = block(x)
        y, aux = vit.blocks[2].attend(x, aux=(True, False))
        attn = aux.cls_attn  # (1, 16): block 2's own CLS attention
        keep = attn.topk(8, dim=1).indices.sort(dim=1).values
        dropped = torch.ones(16, dtype=torch.bool)
        dropped[keep[0]] = False
        fused = (attn[0, dropped, None] * y[0, 1:][dropped]).sum(0)
        x = torch.cat([y[:, :1], y[:, 1:][:, keep[0]], fused[None, None]], dim=1)
        x = vit.blocks[3](vit.blocks[2].feed_forward(x))[0]
    assert trace.stages[0].kept[0, :8].tolist() == keep[0].tolist()
    assert torch.allclose(got, x, atol=1e-6)


def test_text_guided_follows_the_caption():
    torch.manual_seed(0)
    model = DualEncoder(get_preset("default").model).eval()
    pixels = torch.randn(1, 3, 112, 112)
    kept = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        text = torch.nn.functional.normalize(torch.randn(1, model.cfg.embed_dim, generator=g), dim=-1)
        _, trace = model.encode_image_with_trace(pixels, PruneSpec("text_guided", 0.2, text=text))
        kept.append(set(trace.stages[-1].kept[0].tolist()))
    assert kept[0] != kept[1]


def test_spec_validation():
    with pytest.raises(ValueError, match="Unknown pruning method"):
        PruneSpec("magic", 0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        PruneSpec("random", 1.5)
    with pytest.raises(ValueError, match="caption embedding"):
        PruneSpec("text_guided", 0.5)


def test_learned_keeps_top_logits_and_fuses_the_rest_by_size():
    x = tokens()
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.5, -1.0, 0.2]])
    red = pruning.learned(x, 2, Signals(predictor=logits))
    assert red.x[0, 1:3, 0].tolist() == [2.0, 4.0]  # patches 1 and 3, in their original order
    assert red.x[0, 3, 0].item() == pytest.approx((1 + 3 + 5 + 6) / 4)  # the mean of the dropped four
    assert red.size[0].tolist() == [1.0, 1.0, 1.0, 4.0]
    assert red.rep[0].tolist() == [1, 3, -1] and red.source[0].tolist() == [2, 0, 2, 1, 2, 2]
    # A second stage fuses the first one's token again, weighted by its size: still one fused token.
    red2 = pruning.learned(red.x, 1, Signals(predictor=torch.tensor([[0.0, 1.0, 99.0]]), size=red.size))
    assert red2.x[0, 1, 0].item() == 4.0  # the fused token's logit of 99 does not keep it
    assert red2.size[0].tolist() == [1.0, 1.0, 5.0]
    assert red2.x[0, 2, 0].item() == pytest.approx((1 + 2 + 3 + 5 + 6) / 5)  # the mean of every dropped patch


def test_learned_sizes_bias_attention_so_the_fused_token_weighs_its_patches():
    torch.manual_seed(0)
    model = DualEncoder(get_preset("default").model).eval()
    with torch.inference_mode():
        tokens_out, trace = model.visual.forward_features(torch.randn(2, 3, 112, 112), PruneSpec("learned", 0.3))
    k = keep_counts(196, 0.3, 2)
    assert trace.tokens_per_stage() == [196, k[0] + 1, k[1] + 1]  # a fused token included
    assert tokens_out.shape[1] == 1 + k[1] + 1
    assert (trace.stages[-1].groups >= 0).all()  # every patch is kept or inside the fused token
    assert (trace.stages[-1].kept[:, -1] == -1).all()
