"""Overlays: same size out as in, exact kept pixels, pure functions, real traces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_demo import overlay as ov
from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder
from vlm_demo.pruning import PruneSpec, Stage, Trace

SIZES = [(112, 112), (640, 480), (37, 300), (1, 3)]
COLOR = (200, 120, 60)


def _traces(preset: str, specs: dict[str, PruneSpec], batch: int) -> dict[str, Trace]:
    """Real traces from one untrained model of ``preset``, one per spec."""
    torch.manual_seed(0)
    cfg = get_preset(preset).model
    model = DualEncoder(cfg).eval()
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        return {name: model.encode_image_with_trace(pixels, spec)[1] for name, spec in specs.items()}


@pytest.fixture(scope="module")
def tiny_traces() -> dict[str, Trace]:
    specs = {
        "tome": PruneSpec("tome", 0.3),
        "random": PruneSpec("random", 0.3),
        "fused": PruneSpec("cls_attention", 0.3, fuse=True),
        "none": PruneSpec("none"),
    }
    return _traces("tiny", specs, batch=2)


@pytest.fixture(scope="module")
def default_traces() -> dict[str, Trace]:
    return _traces("default", {"tome": PruneSpec("tome", 0.3), "cls_attention": PruneSpec("cls_attention", 0.5)}, 1)


def _hand_trace() -> Trace:
    """A 4x4 grid, one stage: patches 0 and 5 kept, patch 2 scored highest; 0+1 merge into one group."""
    kept = torch.tensor([[0, 5]])
    groups = torch.full((1, 16), -1)
    groups[0, [0, 1]] = 0
    groups[0, 5] = 1
    scores = torch.linspace(0.0, 1.0, 16)[None].clone()
    scores[0, 2] = 5.0
    scores[0, 15] = float("nan")
    stage = Stage(block=1, kept=kept, groups=groups, scores=scores)
    return Trace("learned", 4, stage_blocks=(1,), stages=[stage])


def _uniform(size: tuple[int, int] = (112, 112)) -> Image.Image:
    return Image.new("RGB", size, COLOR)


def _center(img: Image.Image, patch: int, grid: int = 4) -> tuple[int, int, int]:
    x0, y0, x1, y1 = ov.patch_boxes(img.size, grid)[patch]
    return img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))


def _all_overlays(img: Image.Image, trace: Trace) -> list[Image.Image | None]:
    return [
        *(ov.kept_overlay(img, trace, style=s) for s in ov.STYLES),
        ov.stage_strip(img, trace),
        ov.heatmap_overlay(img, trace),
        ov.groups_overlay(img, trace),
    ]


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", SIZES + [(113, 57)])
@pytest.mark.parametrize("grid", [4, 14])
def test_patch_boxes_tile_the_image_exactly(size: tuple[int, int], grid: int) -> None:
    boxes = ov.patch_boxes(size, grid)
    assert len(boxes) == grid * grid
    cover = np.zeros((size[1], size[0]), dtype=int)
    for x0, y0, x1, y1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert boxes[1][0] >= boxes[0][0] and boxes[grid][1] >= boxes[0][1]  # row-major
    assert boxes[-1][2:] == size


def test_patch_boxes_rejects_bad_grid() -> None:
    with pytest.raises(ValueError, match="grid"):
        ov.patch_boxes((10, 10), 0)


# ----------------------------------------------------------------------------- contract: size, purity


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["tome", "random", "fused", "none"])
def test_every_overlay_keeps_the_input_size(tiny_traces: dict[str, Trace], size: tuple[int, int], name: str) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for out in _all_overlays(img, tiny_traces[name]):
        if out is not None:
            assert out.size == size and out.mode == "RGB"


@pytest.mark.parametrize("size", [(112, 112), (640, 480), (37, 300)])
def test_default_grid_overlays_keep_the_input_size(default_traces: dict[str, Trace], size: tuple[int, int]) -> None:
    img = _uniform(size)
    for trace in default_traces.values():
        assert trace.grid == 14
        for out in _all_overlays(img, trace):
            if out is not None:
                assert out.size == size


def test_inputs_are_not_modified(tiny_traces: dict[str, Trace]) -> None:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    before = img.tobytes()
    trace = tiny_traces["random"]
    groups_before = trace.stages[-1].groups.clone()
    outs = _all_overlays(img, trace)
    assert img.tobytes() == before
    assert torch.equal(trace.stages[-1].groups, groups_before)
    assert all(o is not img for o in outs)


def test_non_rgb_inputs_give_rgb(tiny_traces: dict[str, Trace]) -> None:
    for mode in ("L", "RGBA", "P"):
        out = ov.kept_overlay(Image.new(mode, (40, 30)), tiny_traces["tome"])
        assert out.mode == "RGB" and out.size == (40, 30)


# ----------------------------------------------------------------------------- kept_overlay


def test_kept_patches_keep_exact_colours_and_dropped_are_dimmed() -> None:
    img = _uniform()
    out = ov.kept_overlay(img, _hand_trace(), style="dim")
    for p in (0, 5):
        assert _center(out, p) == COLOR
    dropped = np.array(_center(out, 3))
    assert (dropped < np.array(COLOR) * 0.5).all() and dropped.sum() > 0


def test_grey_style_desaturates_dropped_patches() -> None:
    out = ov.kept_overlay(_uniform(), _hand_trace(), style="grey")
    assert _center(out, 0) == COLOR
    r, g, b = _center(out, 3)
    assert r == g == b and r > 100


def test_outline_style_leaves_pixels_and_draws_a_border() -> None:
    img = _uniform()
    out = np.asarray(ov.kept_overlay(img, _hand_trace(), style="outline"))
    orig = np.asarray(img)
    changed = (out != orig).any(-1)
    assert _center(Image.fromarray(out), 3) == COLOR and _center(Image.fromarray(out), 0) == COLOR
    x0, y0, x1, y1 = ov.patch_boxes(img.size, 4)[0]
    assert changed[y0, (x0 + x1) // 2] and changed[(y0 + y1) // 2, x0]  # the kept patch's edge
    assert changed.mean() < 0.15  # only lines


def test_unpruned_trace_keeps_everything(tiny_traces: dict[str, Trace]) -> None:
    img = _uniform()
    out = ov.kept_overlay(img, tiny_traces["none"], style="dim")
    assert all(_center(out, p) == COLOR for p in range(16))


def test_tome_representatives_count_as_kept(tiny_traces: dict[str, Trace]) -> None:
    trace = tiny_traces["tome"]
    out = ov.kept_overlay(_uniform(), trace, sample=1, style="dim")
    kept = set(trace.stages[-1].kept[1].tolist())
    for p in range(16):
        assert (_center(out, p) == COLOR) == (p in kept)


def test_fused_token_is_ignored(tiny_traces: dict[str, Trace]) -> None:
    trace = tiny_traces["fused"]
    assert (trace.stages[-1].kept < 0).any()
    out = ov.kept_overlay(_uniform(), trace, stage=-1)
    kept = {p for p in trace.stages[-1].kept[0].tolist() if p >= 0}
    assert sum(_center(out, p) == COLOR for p in range(16)) == len(kept)


def test_bad_arguments_raise(tiny_traces: dict[str, Trace]) -> None:
    trace, img = tiny_traces["random"], _uniform()
    with pytest.raises(ValueError, match="style"):
        ov.kept_overlay(img, trace, style="neon")
    with pytest.raises(ValueError, match="sample"):
        ov.kept_overlay(img, trace, sample=2)
    with pytest.raises(ValueError, match="stage"):
        ov.kept_overlay(img, trace, stage=2)
    with pytest.raises(ValueError, match="PIL"):
        ov.kept_overlay(np.zeros((8, 8, 3)), trace)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- stage_strip


def test_stage_strip_letterboxes_one_panel_per_stage(tiny_traces: dict[str, Trace]) -> None:
    img = _uniform((300, 300))
    pruned = np.asarray(ov.stage_strip(img, tiny_traces["tome"]))
    assert pruned.shape == (300, 300, 3)
    assert (pruned[0] == 255).all() and (pruned[-1] == 255).all()  # white letterbox above and below
    row = pruned[150]
    dark = (row.sum(-1) < 200).any()  # some panel dims patches
    assert dark
    unpruned = np.asarray(ov.stage_strip(img, tiny_traces["none"]))
    # One panel (the input) fills the width; three panels leave more of the height white.
    assert (unpruned == 255).all(-1).sum() < (pruned == 255).all(-1).sum()


# ----------------------------------------------------------------------------- heatmap_overlay


def test_heatmap_is_none_without_scores(tiny_traces: dict[str, Trace]) -> None:
    img = _uniform()
    assert ov.heatmap_overlay(img, tiny_traces["tome"]) is None
    assert ov.heatmap_overlay(img, tiny_traces["none"]) is None
    assert ov.heatmap_overlay(img, tiny_traces["random"]) is not None


def test_heatmap_colours_follow_scores() -> None:
    out = ov.heatmap_overlay(_uniform(), _hand_trace())
    hot, cold, nan = (np.array(_center(out, p), dtype=int) for p in (2, 0, 15))
    assert hot.sum() > cold.sum() + 150  # inferno: bright yellow high, near black low
    assert nan[0] == nan[1] == nan[2]  # already-gone patches are greyed, no colour


# ----------------------------------------------------------------------------- groups_overlay


def test_groups_share_a_tint_and_differ_between_groups() -> None:
    img = _uniform()
    out = ov.groups_overlay(img, _hand_trace())
    assert _center(out, 0) == _center(out, 1)  # one group
    assert _center(out, 0) != _center(out, 5)
    single = np.abs(np.array(_center(out, 5), dtype=int) - COLOR).sum()
    pair = np.abs(np.array(_center(out, 0), dtype=int) - COLOR).sum()
    assert single < pair  # groups of one are tinted lightly
    assert (np.array(_center(out, 3)) < np.array(COLOR) * 0.5).all()  # dropped: dimmed


def test_groups_overlay_on_real_tome_trace(tiny_traces: dict[str, Trace]) -> None:
    trace = tiny_traces["tome"]
    out = ov.groups_overlay(_uniform(), trace, sample=0, stage=0)
    groups = trace.stages[0].groups[0].tolist()
    by_group: dict[int, set] = {}
    for p, g in enumerate(groups):
        by_group.setdefault(g, set()).add(_center(out, p))
    assert all(len(c) == 1 for c in by_group.values())
    assert len({next(iter(c)) for c in by_group.values()}) == len(by_group)
    assert ov.groups_overlay(_uniform(), tiny_traces["none"]) is None


# ----------------------------------------------------------------------------- legend_text


def test_legend_text(tiny_traces: dict[str, Trace]) -> None:
    assert ov.legend_text(tiny_traces["tome"]) == "tome: 16 -> 9 -> 5 patch tokens"
    assert ov.legend_text(tiny_traces["none"]) == "none: 16 patch tokens (no pruning)"
    assert "\n" not in ov.legend_text(tiny_traces["fused"])
