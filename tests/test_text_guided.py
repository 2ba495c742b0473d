"""text_guided: the caption-conditioned keep predictor, its teacher, and the caption moving the kept patches."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.steering import FIRST_UNSEEN, Pairs, two_object_scenes
from training import saliency
from training.losses import keep_rank_loss
from training.query import DROP_WEIGHT, query_loss, subset_captions
from training.saliency import direct_effects, stage_effects
from training.synthetic import make_scene
from vlm_demo import pruning
from vlm_demo.config import ModelConfig, PruningConfig, get_preset
from vlm_demo.model import DualEncoder, load_checkpoint, save_checkpoint
from vlm_demo.pruning import PruneSpec, QueryKeepPredictor, Signals
from vlm_demo.tokenizer import Tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "pruned"


# ----------------------------------------------------------------------------- the teacher


def _tiny(depth: int, stages: tuple[int, ...]) -> DualEncoder:
    cfg = get_preset("tiny").model
    return DualEncoder(cfg.replace(vision=dataclasses.replace(cfg.vision, depth=depth),
                                   pruning=PruningConfig(stages=stages))).eval()  # fmt: skip


def test_direct_effects_split_the_cosine_exactly():
    # One block, and nothing but the patches reaching the CLS token: no CLS value, biases or MLP output. Then the
    # patches' direct effects are the whole embedding, and they sum to the image-caption cosine.
    torch.manual_seed(0)
    model = _tiny(1, ())
    cfg = model.cfg
    v = model.visual
    with torch.no_grad():
        v.cls_token.zero_()
        v.pos_embed[:, 0].zero_()
        block = v.blocks[0]
        for t in (block.attn.qkv.bias, block.attn.proj.bias, block.mlp[2].weight, block.mlp[2].bias):
            t.zero_()
        v.norm.weight.normal_(1.0, 0.2)  # a scale that is not 1 must be carried into every term
    pixels = torch.randn(3, 3, 32, 32)
    text = F.normalize(torch.randn(3, cfg.embed_dim), dim=-1)
    effects = direct_effects(model, pixels)  # (B, P, E)
    assert effects.shape == (3, cfg.vision.num_patches, cfg.embed_dim)
    cosine = (model.encode_image(pixels) * text).sum(-1)
    assert torch.allclose(torch.einsum("bpe,be->b", effects, text), cosine, atol=1e-5)


def test_stage_effects_carry_each_blocks_effects_back_through_the_attention_by_hand():
    # Zero queries and keys: every attention row is uniform, 1/N over the N = 1 + P tokens. Going back through a
    # block, a token keeps half its own share (the residual) and gets half the mean over all tokens of the shares
    # after it; the CLS token starts with none.
    torch.manual_seed(0)
    model = _tiny(3, (1, 2))
    C = model.cfg.vision.width
    with torch.no_grad():
        for block in model.visual.blocks:
            block.attn.qkv.weight[: 2 * C].zero_()
            block.attn.qkv.bias[: 2 * C].zero_()
    pixels = torch.randn(2, 3, 32, 32)
    (e0, e1, e2), attention = saliency._decompose(model, pixels)
    N = model.cfg.vision.num_patches + 1
    assert all(torch.allclose(a, torch.full_like(a, 1 / N)) for a in attention)
    assert torch.allclose(e0 + e1 + e2, direct_effects(model, pixels), atol=1e-6)
    at_1, at_2 = stage_effects(model, pixels)
    assert torch.allclose(at_2, e2) and not torch.allclose(at_1, e1)
    assert torch.allclose(at_1, e1 + 0.5 * e2 + 0.5 * e2.sum(1, keepdim=True) / N, atol=1e-6)


def test_stage_effects_are_the_rollout_of_every_later_blocks_effects():
    # Any attention: stage s gets sum over blocks l >= s of e_l times A'_{l-1} ... A'_s, A' = (I + A) / 2.
    torch.manual_seed(1)
    model = _tiny(3, (1, 2))
    pixels = torch.randn(2, 3, 32, 32)
    effects, attention = saliency._decompose(model, pixels)
    eye = torch.eye(attention[0].shape[-1])
    for stage, got in zip((1, 2), stage_effects(model, pixels)):
        want, rollout = 0, eye
        for block in range(stage, 3):
            padded = F.pad(effects[block], (0, 0, 1, 0))  # the CLS token has no direct effect of its own
            want = want + torch.einsum("bpe,bpq->bqe", padded, rollout.expand(2, -1, -1))[:, 1:]
            rollout = (eye + attention[block]) / 2 @ rollout
        assert torch.allclose(got, want, atol=1e-6)


def test_subset_captions_name_part_of_each_scene_and_the_rest_and_are_reproducible():
    scenes = [
        [{"shape": "circle", "color": "red", "size": "small", "position": "top left"},
         {"shape": "star", "color": "blue", "size": "large", "position": "center"},
         {"shape": "heart", "color": "green", "size": "small", "position": "bottom right"}],
        [{"shape": "cross", "color": "white", "size": "large", "position": "top"}],
        None,
    ]  # fmt: skip
    drawn = [subset_captions([0, 1, 2, 0], scenes, seed=0, epoch=e) for e in range(30)]
    # One object or no ground truth: never. Three objects: naming 1, 2 or all 3 alike; all 3 is the image's own
    # caption, so no query.
    assert all(set(q) <= {0, 3} for q in drawn)
    named_all = sum(row not in q for q in drawn for row in (0, 3))
    assert 10 <= named_all <= 30, named_all  # of 60 draws, a third expected
    for queries in drawn:
        for row, query in queries.items():
            named = {o["color"] for o in scenes[0]} & set(re.findall(r"[a-z]+", query.caption.lower()))
            rest = {o["color"] for o in scenes[0]} & set(re.findall(r"[a-z]+", query.rest.lower()))
            assert 1 <= len(named) < 3 and named.isdisjoint(rest) and named | rest == {"red", "blue", "green"}, query
    assert drawn[0] == subset_captions([0, 1, 2, 0], scenes, seed=0, epoch=0)
    assert subset_captions([0], None, seed=0, epoch=0) == {}


# ----------------------------------------------------------------------------- the predictor


def test_the_caption_conditions_the_predictor_and_the_loss_teaches_it_to():
    torch.manual_seed(0)
    n, width, dim = 8, 16, 12
    predictor = QueryKeepPredictor(width, dim, 16)
    tokens = torch.randn(2, n, width).repeat(2, 1, 1)  # two images, each with caption a, then caption b
    a, b = F.normalize(torch.randn(2, dim), dim=-1)
    text = torch.stack([a, a, b, b])
    # Caption a names patches 0-3, caption b patches 4-7: each patch's effect vector is +-(a - b) / 2.
    sign = torch.tensor([1.0] * 4 + [-1.0] * 4)
    effects = torch.stack([sign[:, None] * (a - b)] * 4) / 2  # (4, n, dim)
    opt = torch.optim.Adam(predictor.parameters(), lr=1e-2)
    for _ in range(150):
        loss = query_loss([predictor], [tokens], [effects], text)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        top = predictor(tokens, text).topk(4, dim=1).indices.sort(dim=1).values
    assert top.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]
    # One caption for the whole batch broadcasts.
    assert predictor(tokens, text[:1]).shape == (4, n)


def test_the_contrast_caption_cancels_what_both_captions_share():
    # Patch 0 carries what captions a and b share, patch 1 what only a names, patch 2 what only b names.
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(2, 6), dim=-1)
    effects = torch.stack([a + b, a, b])[None]  # (1, 3, E)
    logits = torch.randn(1, 3)

    class Fixed(torch.nn.Module):
        def forward(self, tokens, text):
            return logits

    plain = query_loss([Fixed()], [torch.zeros(1, 3, 4)], [effects], a[None])
    contrasted = query_loss([Fixed()], [torch.zeros(1, 3, 4)], [effects], a[None], b[None])
    ab = float(a @ b)
    assert ab > -0.5  # so a + b scores positive without the contrast
    # No contrast: only what to keep first.
    assert torch.isclose(plain, keep_rank_loss(logits, torch.tensor([[1 + ab, 1.0, max(ab, 0.0)]])))
    # a - b: patch 0 gets (a + b)(a - b) = 0, patch 1 gets 1 - a.b (keep first), patch 2 a.b - 1 (drop first).
    keep = keep_rank_loss(logits, torch.tensor([[0.0, 1.0, 0.0]]))
    drop = keep_rank_loss(-logits, torch.tensor([[0.0, 0.0, 1.0]]))
    assert torch.isclose(contrasted, keep + DROP_WEIGHT * drop, atol=1e-6)
    # In a batch, each row keeps its own kind: the mean of the two.
    both = query_loss([Fixed()], [torch.zeros(2, 3, 4)], [effects.expand(2, -1, -1)], a[None].expand(2, -1),
                      torch.stack([torch.zeros(6), b]))  # fmt: skip
    assert torch.isclose(both, (plain + contrasted) / 2, atol=1e-6)


def test_text_guided_keeps_the_top_logits_and_fuses_the_rest_like_learned():
    x = torch.arange(7, dtype=torch.float32)[None, :, None].repeat(1, 1, 3)  # CLS + 6 patches
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.5, -1.0, 0.2]])
    got = pruning.text_guided(x, 2, Signals(text=logits))
    want = pruning.learned(x, 2, Signals(predictor=logits))
    assert torch.equal(got.x, want.x) and torch.equal(got.size, want.size) and torch.equal(got.rep, want.rep)
    with pytest.raises(ValueError, match="caption-conditioned"):
        pruning.text_guided(x, 2, Signals())


def test_a_checkpoint_saved_before_the_query_predictors_loads_and_says_how_to_get_them(tmp_path):
    tok = Tokenizer.build(["a red circle"], 16)
    cfg = get_preset("tiny").model
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tok)))
    old = tmp_path / "old"
    legacy = cfg.replace(pruning=dataclasses.replace(cfg.pruning, query_predictors=False))
    save_checkpoint(DualEncoder(legacy), tok, old)
    data = json.loads((old / "config.json").read_text())
    del data["pruning"]["query_predictors"]  # as written before the setting existed
    (old / "config.json").write_text(json.dumps(data))
    assert ModelConfig.from_dict(data).pruning.query_predictors is False
    model, _ = load_checkpoint(old)
    text = F.normalize(torch.randn(1, cfg.embed_dim), dim=-1)
    pixels = torch.randn(1, 3, 32, 32)
    assert model.encode_image(pixels, PruneSpec("learned", 0.5)).shape == (1, cfg.embed_dim)
    with pytest.raises(ValueError, match="python -m training.train --phases pruned"):
        model.encode_image(pixels, PruneSpec("text_guided", 0.5, text=text))
    # The pruned phase adds them; saved, they load with the checkpoint.
    model.enable_query_predictors()
    save_checkpoint(model, tok, tmp_path / "new")
    again, _ = load_checkpoint(tmp_path / "new")
    assert again.cfg.pruning.query_predictors and len(again.visual.query_predictors) == len(cfg.pruning.stages)
    assert again.encode_image(pixels, PruneSpec("text_guided", 0.5, text=text)).shape == (1, cfg.embed_dim)


def test_a_checkpoint_saved_before_the_caption_mlp_keeps_its_linear_query_until_a_pruned_phase_rebuilds_it(tmp_path):
    tok = Tokenizer.build(["a red circle"], 16)
    cfg = get_preset("tiny").model
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tok)))
    assert cfg.pruning.query_mlp  # the current kind
    linear = cfg.replace(pruning=dataclasses.replace(cfg.pruning, query_mlp=False))
    save_checkpoint(DualEncoder(linear), tok, tmp_path / "old")
    data = json.loads((tmp_path / "old" / "config.json").read_text())
    del data["pruning"]["query_mlp"]  # as written before the setting existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(data))
    model, _ = load_checkpoint(tmp_path / "old")
    assert all(isinstance(q.query, torch.nn.Linear) for q in model.visual.query_predictors)
    text = F.normalize(torch.randn(2, cfg.embed_dim), dim=-1)
    pixels = torch.randn(2, 3, 32, 32)
    before = model.encode_image(pixels, PruneSpec("text_guided", 0.5, text=text))
    model.enable_query_predictors()  # None: the config's kind, nothing changes
    assert torch.equal(model.encode_image(pixels, PruneSpec("text_guided", 0.5, text=text)), before)
    model.enable_query_predictors(mlp=True)  # what the pruned phase asks for
    assert model.cfg.pruning.query_mlp and len(model.visual.query_predictors) == len(cfg.pruning.stages)
    assert all(isinstance(q.query, torch.nn.Sequential) for q in model.visual.query_predictors)
    save_checkpoint(model, tok, tmp_path / "new")
    again, _ = load_checkpoint(tmp_path / "new")
    assert again.cfg.pruning.query_mlp
    want = model.encode_image(pixels, PruneSpec("text_guided", 0.5, text=text))
    assert torch.allclose(again.encode_image(pixels, PruneSpec("text_guided", 0.5, text=text)), want)


def test_adding_query_predictors_changes_no_other_initial_weight():
    cfg = get_preset("tiny").model
    torch.manual_seed(0)
    without = DualEncoder(cfg.replace(pruning=dataclasses.replace(cfg.pruning, query_predictors=False)))
    torch.manual_seed(0)
    with_them = DualEncoder(cfg)
    after = torch.rand(1)
    torch.manual_seed(0)
    DualEncoder(cfg.replace(pruning=dataclasses.replace(cfg.pruning, query_predictors=False)))
    assert torch.equal(after, torch.rand(1))  # nor any later random draw
    theirs = with_them.state_dict()
    for name, tensor in without.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    assert any(name.startswith("visual.query_predictors.") for name in theirs)


def test_the_steering_benchmark_reports_every_teacher_and_both_predictors(tmp_path):
    from benchmarks import steering

    torch.manual_seed(0)
    cfg = get_preset("tiny").model
    scenes = two_object_scenes(FIRST_UNSEEN, 5, cfg.vision.image_size)
    tok = Tokenizer.build([steering.named(o) for _, objs in scenes for o in objs], cfg.text.context_length)
    save_checkpoint(DualEncoder(cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tok)))), tok, tmp_path)
    lines = steering.main(["--checkpoint", str(tmp_path), "--scenes", "5"]).splitlines()
    assert torch.is_grad_enabled()  # it leaves the process as it found it
    assert lines[0].startswith("5 unseen two-object scenes (2 left out: an object covers no patch)")
    rows = {line[:44].strip(): line[44:].split() for line in lines if line[44:].strip()[:1].isdigit()}
    stages = len(cfg.pruning.stages)
    assert len(rows) == 5
    assert all(len(v) == 3 * stages for k, v in rows.items() if k.startswith(("direct", "rolled")))
    for values in rows.values():
        assert all(0.0 <= float(v) <= 1.0 for v in values if v != "/")
    named, _, other = rows["learned"]
    assert named == other  # it never sees the caption: both captions of a scene keep the same patches


# ----------------------------------------------------------------------------- the shipped model (the test)


@pytest.fixture(scope="module")
def shipped() -> tuple[DualEncoder, Tokenizer]:
    return load_checkpoint(SHIPPED)


def _keep_for_each_caption(model, tok, scenes, keep_ratio) -> tuple[Pairs, list[torch.Tensor]]:
    """Each scene once per object, its caption naming that object alone; the last stage's kept positions."""
    pairs = Pairs(model, tok, scenes)
    with torch.inference_mode():
        _, trace = model.encode_image_with_trace(pairs.pixels, PruneSpec("text_guided", keep_ratio, text=pairs.text))
    return pairs, list(trace.stages[-1].kept)


def test_two_captions_that_name_different_objects_keep_different_patches_each_covering_its_own(shipped):
    model, tok = shipped
    image, record, _ = make_scene(0, 100_083, 112)  # a black cross and a white diamond
    pairs, (kept_a, kept_b) = _keep_for_each_caption(model, tok, [(image, record["objects"])], 0.3)
    assert set(kept_a.tolist()) != set(kept_b.tolist())
    assert pairs.share(kept_a, 0) >= 0.8 and pairs.share(kept_b, 1) >= 0.8
    assert pairs.share(kept_a, 0) > pairs.share(kept_b, 0) + 0.5  # the caption moved the kept patches
    assert pairs.share(kept_b, 1) > pairs.share(kept_a, 1) + 0.5


def test_on_unseen_scenes_a_caption_keeps_more_of_the_object_it_names(shipped):
    model, tok = shipped
    pairs, kept = _keep_for_each_caption(model, tok, two_object_scenes(FIRST_UNSEEN, 40), 0.3)
    own, other = pairs.shares(kept)
    assert all(set(kept[i].tolist()) != set(kept[i + 1].tolist()) for i in range(0, len(kept), 2))
    # Measured on the shipped checkpoints (these 40 scenes): 0.966 against 0.125 (`python -m benchmarks.steering`,
    # 80 scenes: 0.967 against 0.142; the learned predictor keeps 0.888 of each object). The previous
    # (trunc_normal) checkpoints: 0.935 against 0.106; before them, trained on the plain direct effects: 0.76
    # against 0.52 on a weaker baseline.
    assert own >= 0.85
    assert own - other >= 0.6
