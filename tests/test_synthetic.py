"""The synthetic Flickr8k-layout generator: determinism, layout, captions, ground truth."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from training import synthetic
from training.synthetic import COLORS, POSITIONS, SHAPE_WORDS, SHAPES, SIZE_WORDS, generate

N, SIZE = 16, 64


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "a", num_images=N, seed=3, size=SIZE, workers=1, progress=False)


def test_same_seed_gives_identical_bytes_across_worker_counts(dataset: Path, tmp_path: Path) -> None:
    # Two processes: the per-image seeding must make the output independent of scheduling.
    again = generate(tmp_path / "b", num_images=N, seed=3, size=SIZE, workers=2, progress=False)
    a, b = _files(dataset), _files(again)
    assert sorted(a) == sorted(b)
    assert len(a) == N + 5
    for name in a:
        assert a[name] == b[name], name


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    other = generate(tmp_path / "c", num_images=N, seed=4, size=SIZE, workers=1, progress=False)
    a, b = _files(dataset), _files(other)
    assert sorted(a) == sorted(b)  # same names ...
    assert sum(a[n] != b[n] for n in a if n.endswith(".png")) == N  # ... different pictures
    assert a["Flickr8k.token.txt"] != b["Flickr8k.token.txt"]


def test_layout_and_splits(dataset: Path) -> None:
    images = sorted((dataset / "Flicker8k_Dataset").glob("*.png"))
    assert [p.name for p in images] == [f"synth_{i:06d}.png" for i in range(N)]
    with Image.open(images[0]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    splits = {s: (dataset / f"Flickr_8k.{s}Images.txt").read_text().split("\n") for s in ("train", "dev", "test")}
    assert all(lines[-1] == "" for lines in splits.values())  # newline-terminated
    names = {s: lines[:-1] for s, lines in splits.items()}
    assert [len(names[s]) for s in ("train", "dev", "test")] == [12, 2, 2]
    assert sorted(names["train"] + names["dev"] + names["test"]) == [p.name for p in images]
    assert synthetic.split_sizes(8000) == (6000, 1000, 1000)


def test_token_file_format(dataset: Path) -> None:
    lines = (dataset / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 * N
    pattern = re.compile(r"^(synth_\d{6}\.png)#([0-4])\t([A-Z][^\t]*\.)$")
    seen: dict[str, list[int]] = {}
    for line in lines:
        m = pattern.match(line)
        assert m, line
        seen.setdefault(m.group(1), []).append(int(m.group(2)))
    assert len(seen) == N and all(v == [0, 1, 2, 3, 4] for v in seen.values())


def _captions(root: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (root / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, caption = line.split("\t")
        out.setdefault(key.split("#")[0], []).append(caption)
    return out


def test_objects_and_captions(dataset: Path) -> None:
    meta = json.loads((dataset / "objects.json").read_text())
    assert meta["image_size"] == SIZE
    captions = _captions(dataset)
    assert sorted(meta["images"]) == sorted(captions)
    counts = set()
    for name, record in meta["images"].items():
        objects = record["objects"]
        counts.add(len(objects))
        assert 1 <= len(objects) <= 3
        assert len({o["position"] for o in objects}) == len(objects)  # one object per cell
        for o in objects:
            assert o["color"] in COLORS and o["shape"] in SHAPES and o["size"] in ("small", "large")
            assert o["position"] in POSITIONS
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            # The box centre lies in the cell the position word names.
            row, col = divmod(POSITIONS.index(o["position"]), 3)
            assert int((x0 + x1) / 2 * 3 // SIZE) == col and int((y0 + y1) / 2 * 3 // SIZE) == row
        caps = captions[name]
        assert len(caps) == 5 and len(set(caps)) == 5
        for caption in caps:
            words = caption.lower()
            assert len(re.findall(r"[a-z0-9]+", words)) <= synthetic.MAX_CAPTION_WORDS
            for o in objects:
                assert o["color"] in words, (caption, o)
                assert any(w in words for w in SHAPE_WORDS.get(o["shape"], (o["shape"],))), (caption, o)
                assert any(w in words for w in SIZE_WORDS[o["size"]]), (caption, o)
        negative = record["hard_negative"]
        assert negative and negative not in caps
        assert record["hard_negative_kind"].split("_")[0] in ("swap", "change")
    assert len(counts) >= 2  # scenes vary in their number of objects


def test_object_pixels_have_the_named_colour(dataset: Path) -> None:
    meta = json.loads((dataset / "objects.json").read_text())
    checked = 0
    for name, record in meta["images"].items():
        with Image.open(dataset / "Flicker8k_Dataset" / name) as im:
            rgb = im.convert("RGB")
        for o in record["objects"]:
            x0, y0, x1, y1 = o["box"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            others = [p["box"] for p in record["objects"] if p is not o]
            if any(b[0] <= cx < b[2] and b[1] <= cy < b[3] for b in others):
                continue  # the centre may be covered by a neighbour (they overlap a little)
            pixel = rgb.getpixel((cx, cy))
            assert max(abs(p - c) for p, c in zip(pixel, COLORS[o["color"]])) <= 40, (name, o, pixel)
            checked += 1
    assert checked >= N


def test_interrupted_run_does_not_look_complete(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "d"
    generate(root, num_images=4, seed=0, size=SIZE, workers=1, progress=False)
    assert (root / "objects.json").is_file()

    def boom(job):  # noqa: ANN001
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_one", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(root, num_images=4, seed=0, size=SIZE, workers=1, progress=False)
    assert not (root / "objects.json").exists() and not (root / "Flickr8k.token.txt").exists()


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_images"):
        generate("/nonexistent/never", num_images=0)
    with pytest.raises(ValueError, match="size"):
        generate("/nonexistent/never", num_images=4, size=8)
