"""The inference entry point `vlm_demo.api`, on tiny checkpoints saved the real way."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_demo import api, flops, pruning


@pytest.fixture(scope="module")
def session(tiny_checkpoints):
    return api.load(tiny_checkpoints)


@pytest.fixture()
def image():
    return Image.new("RGB", (64, 48), (200, 30, 30))


def test_load_a_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="python -m training.train"):
        api.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="no baseline"):
        api.load(tmp_path)


def test_learned_uses_the_pruned_checkpoint(session):
    assert session.model_for("learned") is session.pruned
    assert session.model_for("text_guided") is session.pruned  # its caption-conditioned predictors live there
    for m in ("none", "cls_attention", "tome", "random"):
        assert session.model_for(m) is session.baseline


def test_embeddings_are_normalised(session, image):
    img = session.embed_images([image, image], method="tome", keep_ratio=0.5)
    txt = session.embed_texts(["a red circle", "a blue square", "unseen words"])
    assert img.shape == (2, 32) and txt.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, rtol=1e-5)
    with pytest.raises(ValueError, match="caption"):
        session.embed_images([image], method="text_guided")


def test_full_keep_embeds_like_the_baseline(session, image):
    base = session.embed_images([image])
    for m in ("cls_attention", "tome", "random"):
        np.testing.assert_array_equal(session.embed_images([image], method=m, keep_ratio=1.0), base)


@pytest.mark.parametrize("method", ["learned", "cls_attention", "text_guided", "tome", "random"])
def test_analyze_contract(session, image, method):
    a = session.analyze(image, "a red circle", method=method, keep_ratio=0.3, latency_repeats=2)
    d = a.to_dict()
    assert d["method"] == method and d["keep_ratio"] == 0.3
    for side in ("baseline", "pruned"):
        assert {"score", "tokens", "gmacs", "latency_ms", "tokens_per_stage"} <= set(d[side])
        assert -1 <= d[side]["score"] <= 1 and d[side]["latency_ms"] > 0
    assert d["pruned"]["gmacs"] < d["baseline"]["gmacs"]
    # Tiny preset, 16 patches, keep 0.3, each method at its paper placement (worked by hand):
    # learned and the others before blocks 1, 2 (round(16 * 0.3 ** 0.5) = 9, then 5), learned and text_guided
    # adding their background token; EViT inside blocks 1, 2, 3 (11, 7, 5, each plus a fused token); ToMe in
    # all 4 blocks, r = round((16 - 5) / 4) = 3 merges each.
    expected = {"learned": [16, 10, 6], "text_guided": [16, 10, 6], "cls_attention": [16, 12, 8, 6],
                "tome": [16, 13, 10, 7, 4]}  # fmt: skip
    assert d["pruned"]["tokens_per_stage"] == expected.get(method, [16, 9, 5])
    assert d["baseline"]["tokens_per_stage"] == [16] * len(d["pruned"]["tokens_per_stage"])
    assert d["pruned"]["tokens"] == d["pruned"]["tokens_per_stage"][-1]
    assert d["score_delta"] == pytest.approx(d["pruned"]["score"] - d["baseline"]["score"], abs=1e-5)
    for name, im in a.overlays.items():
        assert im.size == image.size, name
    assert ("groups" in a.overlays) == (method == "tome")
    assert ("heatmap" in a.overlays) == (method != "tome")
    assert len(d["baseline"]["top_captions"]) == 3


@pytest.mark.parametrize("method", ["cls_attention", "tome", "random"])
def test_training_free_methods_at_full_keep_score_like_the_baseline(session, image, method):
    d = session.analyze(image, "a red circle", method=method, keep_ratio=1.0, latency_repeats=1).to_dict()
    assert d["pruned"]["score"] == d["baseline"]["score"]
    assert d["pruned"]["gmacs"] == d["baseline"]["gmacs"]


@pytest.mark.parametrize(
    "caption, message",
    [("", "Enter a caption"), ("   \n", "Enter a caption"), ("x" * 10_001, "under 10,000"), ("🙂🙂", "no words")],
)
def test_bad_captions(session, image, caption, message):
    with pytest.raises(ValueError, match=message):
        session.analyze(image, caption, latency_repeats=1)


def test_odd_but_valid_captions(session, image):
    a = session.analyze(image, "<script>alert(1)</script> a red 🙂 circle " * 20, latency_repeats=1)
    assert a.caption_truncated
    assert np.isfinite(a.pruned.score)


def test_bad_inputs(session, image):
    with pytest.raises(ValueError):
        session.analyze(b"not an image", "a red circle")
    with pytest.raises(ValueError, match="Unknown pruning method"):
        session.analyze(image, "a red circle", method="magic")
    with pytest.raises(ValueError, match="keep_ratio"):
        session.analyze(image, "a red circle", keep_ratio=0)
    with pytest.raises(ValueError, match="style"):
        session.analyze(image, "a red circle", style="neon")


def test_compare_every_method(session, image):
    rows = session.compare(image, "a red circle", keep_ratio=0.5)
    assert [r.method for r in rows] == ["learned", "cls_attention", "text_guided", "tome", "dynamicvit", "random"]
    assert all(r.overlay.size == image.size for r in rows)
    # keep 0.5: round(16 * 0.5) = 8; learned, EViT and text_guided add a fused token; ToMe's r = 2 merges in each
    # of 4 blocks; DynamicViT drops the rest outright.
    assert [r.tokens_per_stage[-1] for r in rows] == [9, 9, 9, 8, 8, 8]
    assert "overlay" not in rows[0].to_dict()


def test_compare_at_matched_gmacs(session, image):
    rows = session.compare(image, "a red circle", gmacs_ratio=0.6)
    base = flops.gmacs(session.cfg, "none")
    for r in rows:
        assert r.keep_ratio == flops.keep_ratio_for(session.cfg, r.method, 0.6)
        assert r.gmacs == flops.gmacs(session.cfg, r.method, r.keep_ratio) and r.gmacs_ratio == r.gmacs / base
        # No keep ratio on the 0.01 grid comes closer to the target than the one chosen.
        best = min(abs(flops.closed_form_gmacs(session.cfg, r.method, k / 100) / base - 0.6) for k in range(1, 101))
        assert abs(r.gmacs_ratio - 0.6) == pytest.approx(best, abs=1e-9)
    assert len({r.keep_ratio for r in rows}) > 1  # one cost, different nominal keep ratios
    with pytest.raises(ValueError, match="gmacs_ratio"):
        session.compare(image, "a red circle", gmacs_ratio=1.5)


def test_placement_reaches_analyze_sweep_compare_and_latency(session, image):
    depth, shared = session.cfg.vision.depth, session.cfg.pruning.stages
    paper = pruning.resolve_stages("cls_attention", depth, shared, "paper")
    assert paper != shared  # EViT's own blocks differ from the predictors' on this model
    for placement, blocks in (("paper", paper), ("shared", shared)):
        a = session.analyze(image, "a red circle", "cls_attention", 0.5, latency_repeats=1, placement=placement)
        assert [st.block for st in a.trace.stages] == list(blocks) and a.to_dict()["placement"] == placement
        assert a.pruned.gmacs == flops.gmacs(session.cfg, "cls_attention", 0.5, placement=placement)
        assert len(a.pruned.tokens_per_stage) == len(blocks) + 1
        stop = session.sweep(image, "a red circle", "cls_attention", stops=(0.5,), placement=placement).stops[0]
        assert stop.tokens_per_stage == a.pruned.tokens_per_stage and stop.gmacs == a.pruned.gmacs
        (row,) = session.compare(image, "a red circle", 0.5, methods=("cls_attention",), placement=placement)
        assert row.tokens_per_stage == a.pruned.tokens_per_stage
    assert session.latency("cls_attention", 0.5, placement="shared") is not session.latency("cls_attention", 0.5)
    assert session.analyze(image, "a red circle", "tome", 0.5, latency_repeats=1).placement == "paper"  # the config's
    with pytest.raises(ValueError, match="placement"):
        session.analyze(image, "a red circle", "tome", 0.5, placement="everywhere")


def test_batch32_latency_is_optional(session, image):
    d = session.analyze(image, "a red circle", method="random", keep_ratio=0.5, latency_repeats=1, batch32=True)
    assert set(d.to_dict()["latency_bs32_ms"]) == {"baseline", "pruned"}


@pytest.mark.parametrize("method", ["learned", "tome"])
def test_sweep_equals_analyze_at_its_stops(session, image, method):
    sweep = session.sweep(image, "a red circle", method, stops=(0.2, 0.52, 1.0))
    assert [s.keep_ratio for s in sweep.stops] == [0.2, 0.52, 1.0]
    for stop in sweep.stops:
        a = session.analyze(image, "a red circle", method=method, keep_ratio=stop.keep_ratio, latency_repeats=1)
        assert stop.score == a.pruned.score and stop.gmacs == a.pruned.gmacs
        assert stop.tokens == a.pruned.tokens and stop.tokens_per_stage == a.pruned.tokens_per_stage
        assert stop.kept == a.trace.stages[-1].kept[0].tolist() if a.trace.stages else stop.tokens == 16
        assert sweep.baseline_score == a.baseline.score and sweep.baseline_gmacs == a.baseline.gmacs
    d = sweep.to_dict()
    assert d["method"] == method and len(d["stops"]) == 3 and "trace" not in d["stops"][0]
    assert d["stops"][-1]["kept"] == list(range(16))  # keep ratio 1 keeps every patch


def test_latency_is_measured_once_per_setting_within_its_budget(session, image):
    timing = session.latency("tome", 0.5)
    assert session.latency("tome", 0.5) is timing  # cached: the slider's stops are measured once each
    assert session.latency("tome", 0.25) is not timing
    assert api.LATENCY_BS1.min_repeats <= timing["pruned"].repeats <= api.LATENCY_BS1.repeats
    d = session.analyze(image, "a red circle", method="tome", keep_ratio=0.5).to_dict()
    assert d["pruned"]["latency_ms"] == round(timing["pruned"].median_ms, 4)
    assert d["pruned"]["latency_repeats"] == timing["pruned"].repeats
    assert session.latency("none", 0.3) is session.latency("none", 1.0)  # the baseline has one cost


def test_standing_reads_the_caption_against_the_bank(session, image):
    z = torch.from_numpy(session.embed_images([image])[0])
    sims = torch.from_numpy(session.embed_texts(session.caption_bank)) @ z
    best, worst = float(sims.max()), float(sims.min())
    assert session.standing(z, best + 1e-3)[0] == 1  # above every bank caption
    assert session.standing(z, worst - 1e-3)[0] == len(sims) + 1  # below all of them
    rank, p = session.standing(z, float(sims[0]))
    scale = float(session.baseline.logit_scale.detach().exp())
    assert p == pytest.approx(float(torch.cat([sims[:1], sims]).mul(scale).softmax(0)[0]), rel=1e-5)
    d = session.analyze(image, "a red circle", method="random", latency_repeats=1).to_dict()
    assert 1 <= d["pruned"]["bank_rank"] <= len(sims) + 1 and 0 < d["pruned"]["bank_probability"] < 1
