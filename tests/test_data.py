"""Dataset loaders (three layouts), error messages, and the torch datasets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    TrainDataset,
    collate,
    detect_layout,
    eval_data,
    hash_split,
    load_objects,
    load_splits,
)
from training.synthetic import generate
from vlm_demo.images import load_image
from vlm_demo.tokenizer import Tokenizer
from vlm_demo.transforms import MEAN, STD, Preprocess, to_tensor


def _png(path: Path, colour: tuple[int, int, int] = (200, 40, 40), size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _quadrants(path: Path, size: int = 40) -> None:
    """Top left red, top right green, bottom left blue, bottom right white."""
    im = Image.new("RGB", (size, size))
    h = size // 2
    for (x, y), c in zip([(0, 0), (h, 0), (0, h), (h, h)], [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        im.paste(c, (x, y, x + h, y + h))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


# ----------------------------------------------------------------------------- original Flickr8k layout


def _flickr(root: Path, text_dir: str = ".", image_dir: str = "Flicker8k_Dataset") -> Path:
    names = [f"im{i}.jpg" for i in range(6)]
    for n in names[:5]:  # im5 is listed everywhere but missing on disk
        _png(root / image_dir / n)
    lines = [f"{n}#{k}\tA caption {k} of {n} , with a comma." for n in names for k in range(5)]
    text = root / text_dir
    text.mkdir(parents=True, exist_ok=True)
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr_8k.trainImages.txt").write_text("im0.jpg\nim1.jpg\nim2.jpg\nim5.jpg\n")
    (text / "Flickr_8k.devImages.txt").write_text("im3.jpg\nnocaption.jpg\n")
    (text / "Flickr_8k.testImages.txt").write_text("im4.jpg\n\n")
    return root


def test_flickr_original_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _flickr(tmp_path)
    assert detect_layout(root) == "flickr8k"
    with caplog.at_level(logging.WARNING, logger="training.data"):
        splits = load_splits(root)
    train, dev, test = splits["train"], splits["dev"], splits["test"]
    assert train.names == ["im0.jpg", "im1.jpg", "im2.jpg"] and train.skipped == 1
    assert dev.names == ["im3.jpg"] and dev.skipped == 1 and dev.skipped_names == ["nocaption.jpg"]
    assert test.names == ["im4.jpg"] and test.skipped == 0
    assert train.images[0] == root / "Flicker8k_Dataset" / "im0.jpg"
    assert train.captions[1] == [f"A caption {k} of im1.jpg , with a comma." for k in range(5)]
    # Skipping is never silent: the count and a name are logged.
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped 1 train" in m and "im5.jpg" in m and "missing" in m for m in messages), messages
    assert any("skipped 1 dev" in m and "nocaption.jpg" in m for m in messages), messages


def test_flickr_text_subfolder_and_spelling_variant(tmp_path: Path) -> None:
    root = _flickr(tmp_path, text_dir="Flickr8k_text", image_dir="Flickr8k_Dataset")
    splits = load_splits(root)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [3, 1, 1]
    assert splits["test"].images[0] == root / "Flickr8k_Dataset" / "im4.jpg"


def test_malformed_token_line_names_file_and_line(tmp_path: Path) -> None:
    root = _flickr(tmp_path)
    token = root / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    lines[16] = "im3.jpg a caption without tab"
    token.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"Flickr8k\.token\.txt line 17: expected 'name#i<TAB>caption'"):
        load_splits(root)


def test_missing_split_file_is_named(tmp_path: Path) -> None:
    root = _flickr(tmp_path)
    (root / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(ValueError, match=r"Flickr_8k\.devImages\.txt"):
        load_splits(root)


def test_no_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No dataset found"):
        load_splits(tmp_path)


# ----------------------------------------------------------------------------- Kaggle and generic layouts


def test_kaggle_layout_with_quoted_comma(tmp_path: Path) -> None:
    names = [f"k{i:02d}.jpg" for i in range(16)]
    for n in names:
        _png(tmp_path / "Images" / n)
    rows = ["image,caption"]
    for n in names:
        rows += [f'{n},"A dog, running on grass."', f"{n},A plain caption ."]
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n")
    assert detect_layout(tmp_path) == "kaggle"
    splits = load_splits(tmp_path)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [12, 2, 2]
    all_names = splits["train"].names + splits["dev"].names + splits["test"].names
    assert sorted(all_names) == names
    assert splits["train"].captions[0] == ["A dog, running on grass.", "A plain caption ."]
    # The split depends on the names only, not on the file order.
    assert hash_split(list(reversed(names))) == hash_split(names)
    assert {s: d.names for s, d in splits.items()} == hash_split(names)


def test_kaggle_malformed_row(tmp_path: Path) -> None:
    _png(tmp_path / "Images" / "a.jpg")
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,fine caption\njust-a-name.jpg\n")
    with pytest.raises(ValueError, match=r"captions\.txt line 3"):
        load_splits(tmp_path)


def test_generic_csv_with_split_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for n in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "images" / n)
    (tmp_path / "captions.csv").write_text(
        'image,caption,split\na.png,"red, square",train\na.png,a red square,train\n'
        "b.png,blue,val\nc.png,green,test\ngone.png,missing image,train\n"
    )
    with caplog.at_level(logging.WARNING, logger="training.data"):
        splits = load_splits(tmp_path)
    assert splits["train"].names == ["a.png"] and splits["train"].captions == [["red, square", "a red square"]]
    assert splits["train"].skipped == 1 and "gone.png" in caplog.text
    assert splits["dev"].names == ["b.png"] and splits["test"].names == ["c.png"]
    assert splits["dev"].images == [tmp_path / "images" / "b.png"]


def test_generic_csv_bad_split_value(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("image,caption,split\na.png,ok,train\na.png,ok,holdout\n")
    with pytest.raises(ValueError, match=r"captions\.csv line 3: unknown split"):
        load_splits(tmp_path)


def test_generic_jsonl(tmp_path: Path) -> None:
    lines = []
    for i in range(8):
        _png(tmp_path / f"j{i}.png")
        lines.append(json.dumps({"image": f"j{i}.png", "caption": f"caption {i}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    splits = load_splits(tmp_path)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [6, 1, 1]

    lines.insert(3, '{"image": "j9.png", "caption": ')
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"captions\.jsonl line 4"):
        load_splits(tmp_path)


def test_jsonl_with_split_field(tmp_path: Path) -> None:
    rows = [("x.png", "train"), ("y.png", "dev"), ("z.png", "test")]
    for n, _ in rows:
        _png(tmp_path / "Images" / n)
    text = "".join(json.dumps({"image": n, "caption": f"a {n}", "split": s}) + "\n" for n, s in rows)
    (tmp_path / "captions.jsonl").write_text(text)
    splits = load_splits(tmp_path)
    assert [splits[s].names for s in ("train", "dev", "test")] == [["x.png"], ["y.png"], ["z.png"]]


# ----------------------------------------------------------------------------- synthetic data and objects


def test_synthetic_round_trip(tmp_path: Path) -> None:
    root = generate(tmp_path, num_images=8, seed=1, size=32, workers=1, progress=False)
    splits = load_splits(root)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [6, 1, 1]
    assert all(len(c) == 5 for c in splits["train"].captions)
    objects = load_objects(root)
    assert objects is not None and set(objects["images"]) == {f"synth_{i:06d}.png" for i in range(8)}
    assert load_objects(tmp_path / "Flicker8k_Dataset") is None
    (root / "objects.json").write_text('{"image_size": 32,\n "images": ')
    with pytest.raises(ValueError, match=r"objects\.json line 2"):
        load_objects(root)


# ----------------------------------------------------------------------------- torch datasets


@pytest.fixture()
def quad_split(tmp_path: Path):
    for i in range(4):
        _quadrants(tmp_path / "Images" / f"q{i}.png")
    rows = ["image,caption,split"] + [f"q{i}.png,caption {i} {k},train" for i in range(4) for k in range(5)]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    return load_splits(tmp_path)["train"]


def test_unaugmented_item_matches_inference_transform(quad_split) -> None:
    ds = TrainDataset(quad_split, image_size=32, augment=False, progress=False)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (4, 3, 32, 32)
    for i in range(len(ds)):
        x, caption, index = ds[i]
        with Image.open(quad_split.images[i]) as im:
            expected = to_tensor(im.convert("RGB"), 32)
        assert x.dtype == torch.float32 and index == i and caption in quad_split.captions[i]
        assert torch.allclose(x, expected, atol=1e-6, rtol=0)


def test_train_items_depend_only_on_seed_epoch_index(quad_split) -> None:
    a = TrainDataset(quad_split, image_size=32, seed=7, progress=False)
    b = TrainDataset(quad_split, image_size=32, seed=7, progress=False)
    for ds in (a, b):
        ds.set_epoch(3)
    for i in reversed(range(len(a))):  # access order does not matter
        xa, ca, _ = a[i]
        xb, cb, _ = b[i]
        assert torch.equal(xa, xb) and ca == cb
    first = [a[i] for i in range(len(a))]
    a.set_epoch(4)
    later = [a[i] for i in range(len(a))]
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(first, later))
    # Across epochs, every caption of an image gets used.
    seen = set()
    for epoch in range(40):
        a.set_epoch(epoch)
        seen.add(a[0][1])
    assert seen == set(quad_split.captions[0])


def test_augmentation_is_light_and_never_flips(quad_split) -> None:
    ds = TrainDataset(quad_split, image_size=40, seed=0, progress=False)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    plain = ds.images[0].float() / 255
    changed = 0
    for epoch in range(30):
        ds.set_epoch(epoch)
        x = ds[0][0] * std + mean  # back to [0, 1]
        changed += not torch.allclose(x, plain, atol=1e-4)
        # Quadrant centres keep their colour: no flip, no hue change, shift below 3% + rounding.
        for (r, c), channel in zip([(10, 10), (10, 30), (30, 10)], [0, 1, 2]):
            pixel = x[:, r, c]
            assert pixel.argmax().item() == channel, (epoch, r, c, pixel)
        assert x[:, 30, 30].min() > 0.7  # white stays white
        # Brightness/contrast at most ~10%: the red quadrant's red stays within [0.75, 1].
        assert 0.75 <= x[0, 10, 10].item() <= 1.0
    assert changed > 20


def test_collate_and_eval_data(quad_split) -> None:
    ds = TrainDataset(quad_split, image_size=32, progress=False)
    tok = Tokenizer.build([c for caps in quad_split.captions for c in caps], context_length=8)
    images, ids, idx = collate([ds[2], ds[0]], tok)
    assert images.shape == (2, 3, 32, 32) and ids.shape == (2, 8) and ids.dtype == torch.long
    assert idx.tolist() == [2, 0]

    ed = eval_data(quad_split, 32, progress=False)
    images, captions, owner = ed.images, ed.captions, ed.caption_to_image
    assert ed.names == quad_split.names
    assert images.shape == (4, 3, 32, 32) and len(captions) == 20
    assert owner.tolist() == [i for i in range(4) for _ in range(5)]
    assert captions[7] == quad_split.captions[1][2]
    with Image.open(quad_split.images[1]) as im:
        assert torch.allclose(images[1], to_tensor(im.convert("RGB"), 32), atol=1e-6, rtol=0)
    assert eval_data(quad_split, 32, limit=2, progress=False).images.shape[0] == 2


def _odd_images(folder: Path) -> dict[str, Path]:
    """Images whose naive decoding differs from inference's: EXIF-rotated, RGBA, 16-bit; none square."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, 48 * 24).reshape(24, 48)  # (24, 48): every 8-bit level
    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 90)], axis=-1).astype(np.uint8)  # (24, 48, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(folder / "exif.jpg", exif=exif.tobytes(), quality=95)
    rgba = np.concatenate([rgb, (ramp[..., None] > 100).astype(np.uint8) * 255], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(folder / "alpha.png")
    Image.fromarray((ramp * 257).astype(np.uint16)).save(folder / "deep.png")  # 16-bit greyscale PNG
    return {p.name: p for p in folder.iterdir()}


# The shipped model's square resize, and a CLIP's shortest-edge resize, centre crop and own mean and std.
SPECS = [32, Preprocess(32, shortest_edge=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))]


@pytest.mark.parametrize("spec", SPECS, ids=["square", "clip_crop"])
def test_training_tensors_equal_inference_tensors_for_odd_images(tmp_path: Path, spec) -> None:
    images = _odd_images(tmp_path / "Images")
    assert Image.open(images["deep.png"]).mode.startswith("I")  # really 16-bit
    rows = ["image,caption,split"] + [f"{name},a caption,train" for name in images for _ in range(2)]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    split = load_splits(tmp_path)["train"]
    ds = TrainDataset(split, image_size=spec, augment=False, progress=False)
    evaluated = eval_data(split, spec, progress=False).images
    for i, path in enumerate(split.images):
        expected = to_tensor(load_image(path), spec)  # what vlm_demo.api feeds the model
        assert torch.equal(ds[i][0], expected), path.name
        assert torch.equal(evaluated[i], expected), path.name
        with Image.open(path) as im:
            naive = to_tensor(im.convert("RGB"), spec)
        assert not torch.equal(naive, expected), f"{path.name} would pass without the inference path"


def test_an_unreadable_image_names_its_file(tmp_path: Path) -> None:
    (tmp_path / "Images").mkdir()
    (tmp_path / "Images" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "captions.csv").write_text("image,caption,split\nbad.png,a caption,train\n")
    with pytest.raises(ValueError, match="bad.png"):
        TrainDataset(load_splits(tmp_path)["train"], image_size=32, progress=False)
