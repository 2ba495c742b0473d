"""The baseline's auxiliary layout objective (training.layout): targets by hand, and a head that can fit them."""

from __future__ import annotations

import torch

from training.layout import ATTRIBUTES, CELLS, LayoutHead, layout_targets
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


def test_the_head_learns_to_read_a_layout_from_an_embedding():
    torch.manual_seed(0)
    scenes = [[_obj(c, s, z, p)] for c, s, z, p in zip(COLORS, SHAPES, ("small", "large") * 4, POSITIONS)]
    target = layout_targets(scenes, range(len(scenes)))
    emb = torch.nn.functional.normalize(torch.randn(len(scenes), 16), dim=-1)  # one distinct embedding per scene
    head = LayoutHead(16)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = head.loss(emb, target).item()
    for _ in range(300):
        opt.zero_grad()
        loss = head.loss(emb, target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 < first
