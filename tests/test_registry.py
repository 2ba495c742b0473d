"""The method registry: one entry describes a method, and the model, flops and api follow it."""

import dataclasses

import pytest
import torch
from PIL import Image

from vlm_demo import api, flops, pruning
from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder
from vlm_demo.pruning import MethodInfo, PruneSpec, Signals, StageShape


def _stripes(x: torch.Tensor, k: int, sig: Signals) -> pruning.Reduction:
    """A toy method: keep the k patches with the largest CLS attention, ranked in reverse position order."""
    attn = sig.cls_attn
    assert attn is not None  # the registry entry asked for it, so the model must have computed it
    n = attn.shape[1]
    scores = torch.arange(n, dtype=attn.dtype).expand_as(attn)  # the last patches win
    return pruning.topk_keep(x, scores, k)


@pytest.fixture()
def toy():
    info = pruning.register(
        MethodInfo(
            "toy_last", _stripes, "Toy", "Keeps the last patches.", "-",
            signals=("cls_attn",), scoring_macs=lambda s: 7 * s.n_in,
        )  # fmt: skip
    )
    yield info
    del pruning.REGISTRY[info.name]


def test_a_registered_method_runs_through_model_flops_and_api(toy, tiny_checkpoints):
    cfg = get_preset("tiny").model
    model = DualEncoder(cfg).eval()
    with torch.inference_mode():
        _, trace = model.encode_image_with_trace(torch.randn(2, 3, 32, 32), PruneSpec("toy_last", 0.25))
    P = cfg.vision.num_patches
    final = trace.stages[-1].kept
    assert final.tolist() == [list(range(P - final.shape[1], P))] * 2  # the last patches survived
    assert trace.tokens_per_stage() == [P] + [t - 1 for i, t in enumerate(flops.tokens_per_block(cfg, "toy_last", 0.25))
                                             if i in cfg.pruning.stages]  # fmt: skip
    # flops counts the toy's declared scoring cost on top of the blocks, and fvcore agrees with the closed form.
    toy_gmacs = flops.closed_form_gmacs(cfg, "toy_last", 0.25)
    random_gmacs = flops.closed_form_gmacs(cfg, "random", 0.25)
    n_in = [P] + [k for k in pruning.keep_counts(P, 0.25, len(cfg.pruning.stages))][:-1]
    assert toy_gmacs - random_gmacs == pytest.approx(sum(7 * n for n in n_in) / 1e9)
    assert flops.gmacs(cfg, "toy_last", 0.25) == pytest.approx(toy_gmacs, rel=0.02)
    # The api serves it like any other method, from the baseline weights.
    session = api.load(tiny_checkpoints)
    assert session.model_for("toy_last") is session.baseline
    a = session.analyze(Image.new("RGB", (40, 40), "red"), "a red circle", method="toy_last", keep_ratio=0.25,
                        latency_repeats=1)  # fmt: skip
    assert a.pruned.tokens == final.shape[1]
    assert "toy_last" in pruning.names(prunes_only=True, image_only=True)


def test_registry_describes_every_method():
    for name in pruning.names():
        info = pruning.get(name)
        assert info.name == name and info.label and info.summary and info.paper
    assert pruning.names(prunes_only=True) == tuple(m for m in pruning.names() if m != pruning.BASELINE)
    assert [m for m in pruning.names() if pruning.get(m).needs_caption] == ["text_guided"]
    assert [m for m in pruning.names() if pruning.get(m).needs_predictor] == ["learned", "text_guided", "dynamicvit"]
    assert {m: pruning.get(m).checkpoint for m in pruning.names() if pruning.get(m).needs_predictor} == {
        "learned": "pruned", "text_guided": "pruned", "dynamicvit": "dynamicvit"}  # fmt: skip
    assert pruning.get("dynamicvit").predictor_kind == "lg" and pruning.get("learned").predictor_kind == "mlp"
    assert pruning.get("tome").reduction == "merge"


def test_bad_entries_and_names_are_refused():
    with pytest.raises(ValueError, match="unknown signal"):
        MethodInfo("x", _stripes, "X", "x", "-", signals=("telepathy",))
    with pytest.raises(ValueError, match="bad reduction"):
        MethodInfo("x", _stripes, "X", "x", "-", reduction="melt")
    with pytest.raises(ValueError, match="unknown checkpoint"):
        MethodInfo("x", _stripes, "X", "x", "-", checkpoint="elsewhere")
    with pytest.raises(ValueError, match="Unknown pruning method 'magic'"):
        pruning.get("magic")


@pytest.mark.parametrize("method", pruning.names())
@pytest.mark.parametrize("placement", ["paper", "shared"])
@pytest.mark.parametrize("fuse", [False, True])
def test_token_schedule_matches_the_model(method, placement, fuse):
    cfg = get_preset("default").model
    model = DualEncoder(pruning.checkpoint_config(cfg, method)).eval()  # dynamicvit: its own checkpoint's
    text = torch.nn.functional.normalize(torch.randn(1, cfg.embed_dim), dim=-1)
    spec = PruneSpec(method, 0.3, text=text, fuse=fuse, stages=placement)
    with torch.inference_mode():
        tokens, trace = model.visual.forward_features(torch.randn(1, 3, 112, 112), spec)
    assert flops.block_tokens(cfg, method, 0.3, fuse, placement)[-1][1] == tokens.shape[1]
    assert flops.tokens_per_stage(cfg, method, 0.3, fuse, placement) == trace.tokens_per_stage()


def test_stage_shape_costs():
    shape = StageShape(n_in=8, n_out=3, width=4, heads=2, embed_dim=5, predictor_hidden=2)
    # ToMe from 8 to 3: a round of 4x4 similarities (8 -> 4), then 2x2 (4 -> 3 takes one merge); d = 2.
    assert pruning.get("tome").scoring_macs(shape) == (4 * 4 + 2 * 2) * 2
    assert pruning.get("cls_attention").scoring_macs(shape) == 9 * 4
    assert pruning.get("none").scoring_macs(shape) == 0
    # DynamicViT's PredictorLG on width 4: norm 5 * 4, layers 4x4, 4x2, 2x1, 1x2, per token.
    assert pruning.get("dynamicvit").scoring_macs(shape) == 8 * (20 + 16 + 8 + 2 + 2)
    # text_guided: the learned predictor's per-token cost, plus the match's norm and linear, plus the caption's MLP
    # (5 -> 2 -> 2), or in older checkpoints its one linear map.
    learned = 8 * (5 * 4 + 4 * 2 + 2 * 2 * 2 + 2)
    assert pruning.get("learned").scoring_macs(shape) == learned
    assert pruning.get("text_guided").scoring_macs(shape) == learned + 8 * (5 * 4 + 4 * 2) + 5 * 2 + 2 * 2
    linear = dataclasses.replace(shape, query_mlp=False)
    assert pruning.get("text_guided").scoring_macs(linear) == learned + 8 * (5 * 4 + 4 * 2) + 5 * 2
