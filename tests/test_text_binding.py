"""benchmarks.text_binding: minimal swap pairs, a checkpoint's text tower, and fresh towers per initialisation."""

import pytest

from benchmarks import text_binding
from benchmarks.text_binding import HeldOut, swap_words
from vlm_demo.tokenizer import normalize

STAR = {"shape": "star", "color": "green", "size": "small", "position": "top"}
CROSS = {"shape": "cross", "color": "yellow", "size": "large", "position": "top left"}
CAPTION = "An image of a small green star at the top and a big yellow cross at the top left."


@pytest.mark.parametrize(
    "attr, expected",
    [
        ("color", "An image of a small yellow star at the top and a big green cross at the top left."),
        ("shape", "An image of a small green cross at the top and a big yellow star at the top left."),
        ("size", "An image of a big green star at the top and a small yellow cross at the top left."),
        # "at the top" is also inside the cross's "at the top left": only the star's own phrase moves
        ("position", "An image of a small green star at the top left and a big yellow cross at the top."),
    ],
)
def test_swap_words_exchanges_only_the_words_of_one_attribute(attr, expected):
    assert swap_words(CAPTION, [STAR, CROSS], attr) == expected


def test_swap_words_refuses_equal_values_and_phrases_it_cannot_place():
    assert swap_words(CAPTION, [STAR, {**CROSS, "color": "green"}], "color") is None
    assert swap_words("A small green star and a big yellow cross.", [STAR, CROSS], "position") is None


def test_held_out_pairs_are_the_same_words_in_another_order():
    held = HeldOut(60, seed=5)
    assert all(len(s) == 2 for s in held.scenes)
    for kind, pairs in held.pairs.items():
        assert pairs, kind
        for i, negative, fake in pairs:
            assert negative != held.captions[i]
            assert sorted(normalize(negative)) == sorted(normalize(held.captions[i]))
            attr = kind.removeprefix("swap_")
            assert [o[attr] for o in fake] == [o[attr] for o in reversed(held.scenes[i])]


def test_prints_the_code_a_checkpoint_and_fresh_towers(tiny_checkpoints, capsys):
    text_binding.main(["--checkpoint", str(tiny_checkpoints / "baseline"), "--steps", "4", "--batch", "8",
                       "--held-out", "40", "--reports", "2", "--threads", "1"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert ["text", "tower", "step", "s", "layout", "cos", *text_binding.KINDS] in [line.split() for line in lines]

    def row(line: str) -> tuple[tuple[str, str], list[float]] | None:
        try:
            return tuple(line.split()[:2]), [float(v) for v in line.split()[-5:]]
        except ValueError:  # the header, a title line, the hub mixin's "Loading weights" line
            return None

    rows = dict(r for r in map(row, lines) if r is not None)
    code = rows["code", "(exact"]
    assert code[0] == 1.0 and all(0 < c < 0.8 for c in code[1:])  # a swap changes 2 of the 6 code vectors or more
    assert (str(tiny_checkpoints / "baseline"), "-") in rows
    assert {(init, str(step)) for init in ("trunc_normal", "clip") for step in (0, 2, 4)} <= set(rows)
    assert all(-1 <= v <= 1 for row in rows.values() for v in row)
