"""Cost accounting: fvcore with every op handled, equal to the closed form, falling with the keep ratio."""

import dataclasses

import pytest
import torch
from conftest import SMALL_CLIP

from vlm_demo import flops, hf_clip, pruning
from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder
from vlm_demo.pruning import PruneSpec

METHODS = pruning.names()

RATIOS = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)


@pytest.mark.parametrize("preset", ["tiny", "default"])
@pytest.mark.parametrize("method", METHODS)
def test_fvcore_matches_closed_form_and_falls_with_keep_ratio(preset, method):
    cfg = get_preset(preset).model
    counted = [flops.gmacs(cfg, method, r) for r in RATIOS]
    for r, g in zip(RATIOS, counted):
        assert g == pytest.approx(flops.closed_form_gmacs(cfg, method, r), rel=0.02), (method, r)
    if not pruning.get(method).prunes:
        assert len(set(counted)) == 1
    elif pruning.get(method).counts == "constant_r":
        # ToMe's whole-token r per block can tie on a 16-patch grid (0.3 and 0.2 both give r = 3).
        assert all(a >= b for a, b in zip(counted, counted[1:])) and counted[0] > counted[-1], counted
    else:
        assert all(a > b for a, b in zip(counted, counted[1:])), counted


@pytest.mark.parametrize("method", METHODS)
def test_every_operator_is_handled(method):
    cfg = get_preset("default").model
    model = DualEncoder(pruning.checkpoint_config(cfg, method))  # dynamicvit: its own checkpoint's predictors
    text = torch.nn.functional.normalize(torch.ones(1, cfg.embed_dim), dim=-1)
    spec = PruneSpec(method, 0.3, text=text if method == "text_guided" else None, fuse=method == "cls_attention")
    fca = flops.analysis(model, spec)
    assert dict(fca.unsupported_ops()) == {}
    ops = fca.by_operator()
    assert ops["scaled_dot_product_attention"] > 0  # fvcore alone would count 0 here


def test_attention_is_counted_exactly():
    cfg = get_preset("default").model
    v = cfg.vision
    fca = flops.analysis(DualEncoder(cfg), PruneSpec())
    n = 1 + v.num_patches
    assert fca.by_operator()["scaled_dot_product_attention"] == v.depth * 2 * n * n * v.width


def test_batch_scales_linearly_and_fusion_adds_a_token():
    cfg = get_preset("tiny").model
    assert flops.gmacs(cfg, "tome", 0.5, batch=4) == pytest.approx(4 * flops.gmacs(cfg, "tome", 0.5))
    fused = flops.gmacs(cfg, "cls_attention", 0.5)  # EViT fuses by default
    assert fused > flops.gmacs(cfg, "cls_attention", 0.5, fuse=False)
    assert fused == pytest.approx(flops.closed_form_gmacs(cfg, "cls_attention", 0.5), rel=0.02)


def test_results_are_cached_in_process_and_on_disk(tmp_path, monkeypatch):
    cfg = get_preset("tiny").model
    monkeypatch.setenv("VLM_DEMO_CACHE", str(tmp_path))
    disk = flops._DiskCache()
    monkeypatch.setattr(flops, "_DISK", disk)
    first = flops.gmacs(cfg, "random", 0.45)
    assert disk.path.parent == tmp_path and disk.path.is_file()
    hits = flops._cached_gmacs.cache_info().hits
    assert flops.gmacs(cfg, "random", 0.45) == first
    assert flops._cached_gmacs.cache_info().hits == hits  # answered from the cache, no new trace
    # Another process (a fresh cache object on the same folder) reads the count instead of tracing again.
    monkeypatch.setattr(flops, "_DISK", flops._DiskCache())
    calls = flops._cached_gmacs.cache_info().misses
    flops._cached_gmacs.cache_clear()
    assert flops.gmacs(cfg, "random", 0.45) == first
    assert flops._cached_gmacs.cache_info().misses == 0 and calls >= 1
    # The text tower's settings are not part of the image encoder's count.
    other_text = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=999))
    assert flops.gmacs(other_text, "random", 0.45) == first and flops._cached_gmacs.cache_info().misses == 0


def test_unknown_method():
    with pytest.raises(ValueError, match="Unknown pruning method"):
        flops.gmacs(get_preset("tiny").model, "magic", 0.5)


@pytest.mark.parametrize("config", ["tiny", "small_clip"])
def test_text_tower_fvcore_matches_closed_form_with_every_op_handled(config):
    cfg = get_preset("tiny").model if config == "tiny" else hf_clip.model_config(SMALL_CLIP)
    fca = flops.text_analysis(DualEncoder(cfg))
    assert dict(fca.unsupported_ops()) == {}
    t = cfg.text
    assert fca.by_operator()["scaled_dot_product_attention"] == t.depth * 2 * t.context_length**2 * t.width
    assert fca.total() / 1e9 == pytest.approx(flops.closed_form_text_gmacs(cfg), rel=0.02)
    assert flops.text_gmacs(cfg, batch=3) == pytest.approx(3 * flops.closed_form_text_gmacs(cfg), rel=0.02)


def test_a_conv_stem_costs_its_hand_worked_macs():
    cfg = get_preset("tiny").model  # 32 px, 8-pixel patches, width 32: 16 patches
    stemmed = cfg.replace(vision=dataclasses.replace(cfg.vision, stem=(4, 8)))
    # 3x3 stride-2 layers: 16x16 outputs of 3 -> 4 channels, 8x8 of 4 -> 8; then 2x2 patches of 8 channels
    # projected to the 32-wide tokens, beside the patch embedding
    extra = 16 * 16 * 3 * 9 * 4 + 8 * 8 * 4 * 9 * 8 + 16 * 32 * 8 * 2 * 2
    for count in (flops.gmacs, flops.closed_form_gmacs):
        assert round((count(stemmed) - count(cfg)) * 1e9) == extra, count


def test_vit_b_16_image_tower_matches_closed_form():
    cfg = hf_clip.model_config(hf_clip.CLIP_SHAPES["vit-b-16"].config)
    assert (cfg.vision.num_patches, cfg.vision.width, cfg.vision.depth) == (196, 768, 12)
    fca = flops.analysis(DualEncoder(cfg), PruneSpec())
    assert dict(fca.unsupported_ops()) == {}
    assert fca.total() / 1e9 == pytest.approx(flops.closed_form_gmacs(cfg), rel=0.02)


@pytest.mark.parametrize("query_mlp", [True, False])
def test_text_guided_counts_its_caption_side_as_built(query_mlp):
    # The caption MLP (current checkpoints) or the one linear map (older ones): fvcore and the closed form agree.
    cfg = get_preset("tiny").model
    cfg = cfg.replace(pruning=dataclasses.replace(cfg.pruning, query_mlp=query_mlp))
    for r in (0.7, 0.3):
        assert flops.gmacs(cfg, "text_guided", r) == pytest.approx(flops.closed_form_gmacs(cfg, "text_guided", r),
                                                                    rel=1e-9, abs=1e-12)  # fmt: skip
    h = cfg.pruning.predictor_hidden
    with_mlp = dataclasses.replace(cfg.pruning, query_mlp=True)
    without = dataclasses.replace(cfg.pruning, query_mlp=False)
    extra = flops.closed_form_gmacs(cfg.replace(pruning=with_mlp), "text_guided", 0.3) - flops.closed_form_gmacs(
        cfg.replace(pruning=without), "text_guided", 0.3)
    assert extra == pytest.approx(len(cfg.pruning.stages) * h * h / 1e9)
