"""The baseline's auxiliary layout objective (training.layout): targets and codes by hand; a tower can fit them."""

from __future__ import annotations

import torch

from training.layout import ATTRIBUTES, CELLS, LayoutCode, layout_targets
from training.synthetic import COLORS, POSITIONS, SHAPES


def _obj(color: str, shape: str, size: str, position: str) -> dict:
    return {"color": color, "shape": shape, "size": size, "position": position, "box": [0, 0, 1, 1]}


def test_targets_put_each_objects_attributes_in_its_cell_and_zero_elsewhere():
    scenes = [[_obj("red", "circle", "small", "top left"), _obj("blue", "star", "large", "bottom right")],
              [_obj("white", "heart", "large", "center")]]  # fmt: skip
    t = layout_targets(scenes, [1, 0])
    assert t is not None and t.shape == (2, len(ATTRIBUTES), CELLS)
    center, top_left, bottom_right = (POSITIONS.index(p) for p in ("center", "top left", "bottom right"))
    assert t[0, :, center].tolist() == [1 + list(COLORS).index("white"), 1 + SHAPES.index("heart"), 2]
    assert t[1, :, top_left].tolist() == [1 + list(COLORS).index("red"), 1 + SHAPES.index("circle"), 1]
    assert t[1, :, bottom_right].tolist() == [1 + list(COLORS).index("blue"), 1 + SHAPES.index("star"), 2]
    assert int((t[0] > 0).sum()) == 3 and int((t[1] > 0).sum()) == 6  # every other cell is "empty"
    assert layout_targets([*scenes, None], [0, 2]) is None  # a row without ground truth: no targets


def test_a_scenes_code_is_the_normalised_sum_of_its_objects_cell_attribute_vectors():
    code = LayoutCode(16)
    scenes = [[_obj("red", "circle", "small", "top left")], [_obj("red", "circle", "small", "bottom right")]]
    t = layout_targets(scenes, [0, 1])
    codes = code.codes(t)
    cell = POSITIONS.index("top left")
    by_hand = code.color[cell, 1 + list(COLORS).index("red")] + code.shape[cell, 1 + SHAPES.index("circle")]
    by_hand = torch.nn.functional.normalize(by_hand + code.size[cell, 1], dim=-1)
    torch.testing.assert_close(codes[0], by_hand)
    assert torch.allclose(codes.norm(dim=-1), torch.ones(2))
    assert float(codes[0] @ codes[1]) < 0.9  # the same object elsewhere: another code
    torch.testing.assert_close(code.loss(codes, t), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(code.loss(-codes, t), torch.tensor(2.0))
    assert torch.equal(LayoutCode(16).color, code.color)  # fixed: every run pulls towards the same codes
    assert not code.state_dict()  # so nothing to save in a resume state


def test_swapping_colours_between_two_objects_moves_the_code_by_a_third_of_their_vectors():
    code = LayoutCode(128)
    a = [_obj("red", "circle", "small", "top left"), _obj("blue", "star", "large", "bottom right")]
    b = [_obj("blue", "circle", "small", "top left"), _obj("red", "star", "large", "bottom right")]
    codes = code.codes(layout_targets([a, b], [0, 1]))
    # 4 of 6 vectors shared: the cosine is about 4/6 (random vectors in 128 dims are nearly orthogonal)
    assert 0.5 < float(codes[0] @ codes[1]) < 0.8


def test_a_tower_can_fit_the_codes():
    torch.manual_seed(0)
    scenes = [[_obj(c, s, z, p)] for c, s, z, p in zip(COLORS, SHAPES, ("small", "large") * 4, POSITIONS)]
    target = layout_targets(scenes, range(len(scenes)))
    code = LayoutCode(16)
    features = torch.eye(len(scenes))  # one distinct input per scene
    tower = torch.nn.Linear(len(scenes), 16)
    opt = torch.optim.Adam(tower.parameters(), lr=0.05)
    first = code.loss(tower(features), target).item()
    for _ in range(200):
        opt.zero_grad()
        loss = code.loss(tower(features), target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 < first
