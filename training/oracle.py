"""The R@1 ceiling of a synthetic test split: an oracle that reads captions against the ground truth.

A caption can describe more than one test image (two scenes with the same objects in the
same cells), and then no model can tell which of them it was written for. The oracle shows
how much of R@1 that costs: it parses each caption into the objects it states, with the
generator's own vocabularies (`training.synthetic`), and calls an image *consistent* with a
caption when the image's ground-truth objects (``objects.json``) are exactly the objects the
caption states. Every synthetic caption names every object of its scene (by size, colour,
shape and position), and a model can learn that, so consistency is an exact match of the two
multisets of (size, colour, shape, position), not a subset: this is the tightest ceiling
that needs no pixels.

The oracle scores consistent pairs 1 and the rest 0 and breaks ties at random; its R@1 is
the expectation over the tie-breaking, in percent (the unit of `training.metrics.recall_at_k`):

* **text -> image:** a caption whose own image is one of the ``n`` consistent images is a
  hit with probability ``1 / n``; with no consistent image at all every image ties (``1 / N``);
  otherwise it is a miss.
* **image -> text:** an image whose consistent captions number ``m``, ``o`` of them its own,
  is a hit with probability ``o / m``; with none consistent every caption ties (own / all).

Shapes and names: N images, T captions.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from training.synthetic import COLORS, NUMBER_WORDS, POSITION_PHRASES, SHAPE_WORDS, SHAPES, SIZE_WORDS


class Mention(NamedTuple):
    """One object a caption states, in the generator's canonical values."""

    size: str  # a key of `SIZE_WORDS` ("small", "large")
    color: str  # a key of `COLORS`
    shape: str  # one of `SHAPES` (a synonym such as "disc" is mapped back)
    position: str  # a key of `POSITION_PHRASES` ("top left", ...)


class CaptionError(ValueError):
    """A caption the generator's grammar does not produce."""


def _inverse(table: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """word -> canonical value; every word must name one value only (the generator's promise)."""
    out: dict[str, str] = {}
    for value, words in table.items():
        for word in words:
            if out.setdefault(word, value) != value:
                raise AssertionError(f"{word!r} names both {out[word]!r} and {value!r}")
    return out


_SIZE = _inverse(SIZE_WORDS)
_COLOR = {c: c for c in COLORS}
_SHAPE = _inverse({s: SHAPE_WORDS.get(s, (s,)) for s in SHAPES})
_POSITION = _inverse(POSITION_PHRASES)


def _alt(words: Iterable[str]) -> str:
    """A regex alternation, longest first, so "at the top left" wins over "at the top"."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


# A noun phrase is "a <size> <colour> <shape>"; a mention is a noun phrase and its position phrase,
# "<np> <position>" in every template but one, "<position> is <np>" in that one.
_NP = rf"a (?P<size{{i}}>{_alt(_SIZE)}) (?P<color{{i}}>{_alt(_COLOR)}) (?P<shape{{i}}>{_alt(_SHAPE)})"
_POS = rf"(?P<pos{{i}}>{_alt(_POSITION)})"
_MENTION = re.compile(
    rf"\b(?:{_NP.format(i=0)} {_POS.format(i=0)}|{_POS.format(i=1)} is {_NP.format(i=1)})(?=[,;.]|\s|$)"
)
# Words that state an attribute. Left over outside every mention, they mean a mention was missed.
# Position phrases are "<preposition> the <words>": the words after "the" are the attribute.
_ATTRIBUTE_WORDS = (
    set(_SIZE) | set(_COLOR) | {w for s in _SHAPE for w in s.split()}
    | {w for p in _POSITION for w in p.split()[2:]}
)  # fmt: skip
_COUNT = re.compile(rf"^(?P<n>{_alt(NUMBER_WORDS.values())}) shapes?:")
_NUMBERS = {word: n for n, word in NUMBER_WORDS.items()}


def parse_caption(caption: str) -> list[Mention]:
    """The objects a synthetic caption states.

    Args:
        caption: a caption as `training.synthetic` writes it (any case, final full stop optional).

    Returns:
        One `Mention` per object, in the caption's order.

    Raises:
        CaptionError: the caption states no object, an attribute word stands outside every
            object's phrase, or a stated count ("two shapes: ...") disagrees with the objects.
    """
    text = " ".join(caption.lower().split())
    mentions, rest, last = [], [], 0
    for m in _MENTION.finditer(text):
        i = 0 if m.group("size0") else 1
        mentions.append(
            Mention(
                _SIZE[m.group(f"size{i}")], m.group(f"color{i}"), _SHAPE[m.group(f"shape{i}")],
                _POSITION[m.group(f"pos{i}")],
            )
        )  # fmt: skip
        rest.append(text[last : m.start()])
        last = m.end()
    rest.append(text[last:])
    if not mentions:
        raise CaptionError(f"no object in {caption!r}")
    stray = sorted(set(re.findall(r"[a-z]+", " ".join(rest))) & _ATTRIBUTE_WORDS)
    if stray:
        raise CaptionError(f"{caption!r}: {', '.join(stray)} outside every object's phrase")
    count = _COUNT.match(text)
    if count and _NUMBERS[count.group("n")] != len(mentions):
        raise CaptionError(f"{caption!r} says {count.group('n')} but names {len(mentions)} objects")
    return mentions


def scene(objects: Iterable[Mapping[str, Any]]) -> Counter[Mention]:
    """The multiset of an image's ground-truth objects (``objects.json``'s ``"objects"``)."""
    return Counter(Mention(o["size"], o["color"], o["shape"], o["position"]) for o in objects)


def consistent(caption: str | Sequence[Mention], objects: Iterable[Mapping[str, Any]]) -> bool:
    """Whether `objects` are exactly the objects `caption` states (a string is parsed first)."""
    mentions = parse_caption(caption) if isinstance(caption, str) else caption
    return Counter(mentions) == scene(objects)


def ceiling(
    captions: Sequence[str], caption_to_image: Sequence[int], objects: Sequence[Iterable[Mapping[str, Any]]]
) -> dict[str, float]:
    """The oracle's expected R@1, in percent, both ways and their mean.

    Args:
        captions: the T test captions.
        caption_to_image: (T,) the index of each caption's image.
        objects: per image (N of them), its ground-truth objects.

    Returns:
        ``{"r1_t2i", "r1_i2t", "mean_r1"}``, percent; see the module docstring.

    Raises:
        CaptionError: a caption does not parse.
        ValueError: for no images or captions, or an owner out of range.
    """
    owner = [int(i) for i in caption_to_image]
    n_images, n_captions = len(objects), len(captions)
    if n_images == 0 or n_captions == 0 or len(owner) != n_captions:
        raise ValueError(f"ceiling needs images and one owner per caption; got {n_images} images, "
                         f"{n_captions} captions, {len(owner)} owners.")  # fmt: skip
    if min(owner) < 0 or max(owner) >= n_images:
        raise ValueError(f"caption_to_image must index images 0..{n_images - 1}.")
    # Consistency is equality of multisets, so group the images by scene: a caption is
    # consistent with exactly the images whose scene equals its own.
    key = lambda c: tuple(sorted(c.elements()))  # noqa: E731
    image_key = [key(scene(o)) for o in objects]
    caption_key = [key(Counter(parse_caption(c))) for c in captions]
    images_with = Counter(image_key)  # scene -> images
    captions_with = Counter(caption_key)  # scene -> captions
    own_total = Counter(owner)  # image -> its captions
    own_consistent = Counter(i for i, k in zip(owner, caption_key) if k == image_key[i])

    t2i = 0.0
    for i, k in zip(owner, caption_key):
        n = images_with[k]
        t2i += 1 / n if k == image_key[i] else (1 / n_images if n == 0 else 0.0)
    i2t, images_with_captions = 0.0, 0
    for i, k in enumerate(image_key):
        if own_total[i] == 0:
            continue  # like recall_at_k: image -> text averages over images that own a caption
        images_with_captions += 1
        m = captions_with[k]
        i2t += own_consistent[i] / m if m else own_total[i] / n_captions
    r1_t2i = 100.0 * t2i / n_captions
    r1_i2t = 100.0 * i2t / images_with_captions
    return {"r1_t2i": r1_t2i, "r1_i2t": r1_i2t, "mean_r1": (r1_t2i + r1_i2t) / 2}


def ground_truth_ceiling(
    captions: Sequence[str], caption_to_image: Sequence[int], names: Sequence[str], records: Mapping[str, Any]
) -> dict[str, float] | None:
    """`ceiling` of a test split from ``objects.json``'s ``"images"`` records; None if an image has none."""
    found = [records.get(n) for n in names]
    if not found or any(not isinstance(r, Mapping) or "objects" not in r for r in found):
        return None
    return ceiling(captions, caption_to_image, [r["objects"] for r in found])
