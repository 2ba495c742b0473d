"""Caption datasets: layout detection, loading, and torch datasets for training and evaluation.

Layouts that `load_splits` detects under a root folder:

* **Flickr8k original** (also what `training.synthetic` writes): ``Flickr8k.token.txt``
  (lines ``name#i<TAB>caption``) and ``Flickr_8k.{train,dev,test}Images.txt``, at the root
  or in ``Flickr8k_text/``; images in ``Flicker8k_Dataset/`` (sic) or ``Flickr8k_Dataset/``.
* **Kaggle Flickr8k**: ``captions.txt`` (CSV, header ``image,caption``) and ``Images/``.
* **Generic**: ``captions.csv`` (columns ``image,caption[,split]``) or ``captions.jsonl``
  (objects with ``"image"``, ``"caption"``, optional ``"split"``); image paths are relative
  to the root, or to an ``images/`` or ``Images/`` folder in it.

Without split files or a split column, images are split 75 / 12.5 / 12.5 % by a fixed
hash of their names (``hash_split``). If Flickr split files sit beside a Kaggle or
generic layout, they are used instead, so the real Flickr8k gets its standard split.

Images take the inference path, not a copy of it: `vlm_demo.images.load_image`
(EXIF orientation, alpha onto white, 16-bit) then `vlm_demo.transforms.to_tensor`.

Shapes: B batch, S image side, L context length, N images.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlm_demo.images import load_image
from vlm_demo.tokenizer import Tokenizer
from vlm_demo.transforms import MEAN, STD, Preprocess, as_preprocess, model_view

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
TEXT_DIRS = (".", "Flickr8k_text")
FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
OBJECTS_FILE = "objects.json"
_SPLIT_ALIASES = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev", "test": "test"}
_SKIP_EXAMPLES = 5  # names shown when logging skipped entries


@dataclass
class CaptionDataset:
    """One split: image files and their captions, index-aligned."""

    root: Path  # dataset root folder
    images: list[Path]  # image files, in split order
    captions: list[list[str]]  # captions per image (Flickr8k has 5)
    names: list[str]  # image names as the caption file spells them
    split: str = ""  # "train", "dev" or "test"
    skipped: int = 0  # split entries dropped: image missing on disk, or no captions
    skipped_names: list[str] = field(default_factory=list)  # the dropped names

    def __len__(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------- layout readers


def _find(root: Path, dirs: Sequence[str], name: str) -> Path | None:
    for d in dirs:
        path = root / d / name
        if path.is_file():
            return path
    return None


def _image_dir(root: Path, candidates: Sequence[str]) -> Path | None:
    """First existing candidate folder; descends into a same-named nested folder (a common unzip artefact)."""
    for name in candidates:
        path = root / name
        if path.is_dir():
            nested = path / name
            return nested if nested.is_dir() else path
    return None


def _read_token_file(path: Path) -> dict[str, list[str]]:
    """``name#i<TAB>caption`` lines -> {name: captions}, in file order."""
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            name, hash_, idx = key.rpartition("#")
            if not tab or not hash_ or not name or not idx.strip().isdigit() or not caption.strip():
                raise ValueError(
                    f"{path.name} line {lineno}: expected 'name#i<TAB>caption', got {line[:80]!r}. "
                    f"Fix or remove the line in {path}."
                )
            captions.setdefault(name.strip(), []).append(caption.strip())
    return captions


def _read_split_file(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig") as f:
        return list(dict.fromkeys(line.strip() for line in f if line.strip()))


def _normalise_split(value: str, path: Path, lineno: int) -> str:
    split = _SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise ValueError(
            f"{path.name} line {lineno}: unknown split {value!r}; use one of train, dev (or val), test."
        )
    return split


def _read_csv(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """CSV with header ``image,caption[,split]`` -> ({image: captions}, {image: split})."""
    captions: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        cols = [h.strip().lower() for h in header] if header else []
        if "image" not in cols or "caption" not in cols:
            raise ValueError(f"{path.name} line 1: expected a header 'image,caption[,split]', got {header!r}.")
        i_img, i_cap = cols.index("image"), cols.index("caption")
        i_split = cols.index("split") if "split" in cols else None
        for row in reader:
            lineno = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) > len(cols) and i_cap == len(cols) - 1:
                # An unquoted comma inside the last column, the caption: the Kaggle files have some.
                row = row[:i_cap] + [",".join(row[i_cap:])]
            if len(row) != len(cols):
                raise ValueError(
                    f"{path.name} line {lineno}: expected {len(cols)} fields ({','.join(cols)}), got {len(row)}; "
                    "quote captions that contain commas."
                )
            image, caption = row[i_img].strip(), row[i_cap].strip()
            if not image or not caption:
                raise ValueError(f"{path.name} line {lineno}: empty image name or caption.")
            captions.setdefault(image, []).append(caption)
            if i_split is not None:
                _set_split(splits, image, _normalise_split(row[i_split], path, lineno), path, lineno)
    return captions, splits


def _read_jsonl(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """One JSON object per line with "image", "caption" and optional "split"."""
    captions: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path.name} line {lineno}: invalid JSON ({e.msg}).") from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("image"), str)
                or not isinstance(obj.get("caption"), str)
                or not obj["image"].strip()
                or not obj["caption"].strip()
            ):
                raise ValueError(
                    f"{path.name} line {lineno}: expected an object with non-empty string fields "
                    "\"image\" and \"caption\" (and optionally \"split\")."
                )
            image = obj["image"].strip()
            captions.setdefault(image, []).append(obj["caption"].strip())
            if obj.get("split") is not None:
                _set_split(splits, image, _normalise_split(str(obj["split"]), path, lineno), path, lineno)
    return captions, splits


def _set_split(splits: dict[str, str], image: str, split: str, path: Path, lineno: int) -> None:
    if splits.setdefault(image, split) != split:
        raise ValueError(f"{path.name} line {lineno}: {image!r} is in split {split!r} here but {splits[image]!r} before.")


def hash_split(names: Sequence[str]) -> dict[str, list[str]]:
    """Split names 75 / 12.5 / 12.5 % by a fixed hash, independent of input order.

    Names are ordered by the SHA-1 of the name, then cut at exact counts; each
    split is returned sorted by name.

    Args:
        names: image names (duplicates are ignored).

    Returns:
        {"train": [...], "dev": [...], "test": [...]}.
    """
    unique = sorted(set(names), key=lambda n: (hashlib.sha1(n.encode("utf-8")).hexdigest(), n))
    n_train = round(0.75 * len(unique))
    n_dev = round(0.125 * len(unique))
    parts = (unique[:n_train], unique[n_train : n_train + n_dev], unique[n_train + n_dev :])
    return {split: sorted(part) for split, part in zip(SPLITS, parts)}


def _resolve(image_dirs: Sequence[Path], name: str) -> Path | None:
    for d in image_dirs:
        path = d / name
        if path.is_file():
            return path
    return None


def _build(
    root: Path,
    split: str,
    names: Sequence[str],
    captions: dict[str, list[str]],
    image_dirs: Sequence[Path],
    source: str,
) -> CaptionDataset:
    """Keep the names that have captions and an image on disk; log the rest."""
    images, caps, kept, no_caption, missing = [], [], [], [], []
    for name in names:
        if name not in captions:
            no_caption.append(name)
            continue
        path = _resolve(image_dirs, name)
        if path is None:
            missing.append(name)
            continue
        images.append(path)
        caps.append(captions[name])
        kept.append(name)
    if no_caption:
        logger.warning(
            "%s: skipped %d %s image(s) without captions in %s, e.g. %s",
            root, len(no_caption), split, source, ", ".join(no_caption[:_SKIP_EXAMPLES]),
        )  # fmt: skip
    if missing:
        where = " or ".join(str(d) for d in image_dirs)
        logger.warning(
            "%s: skipped %d %s image(s) listed in %s but missing under %s, e.g. %s",
            root, len(missing), split, source, where, ", ".join(missing[:_SKIP_EXAMPLES]),
        )  # fmt: skip
    return CaptionDataset(
        root=root,
        images=images,
        captions=caps,
        names=kept,
        split=split,
        skipped=len(no_caption) + len(missing),
        skipped_names=no_caption + missing,
    )


def _flickr_split_files(root: Path) -> dict[str, Path] | None:
    """The three Flickr split files, or None if none exists; raises if only some exist."""
    found = {s: _find(root, TEXT_DIRS, f) for s, f in SPLIT_FILES.items()}
    if all(p is None for p in found.values()):
        return None
    missing = [SPLIT_FILES[s] for s, p in found.items() if p is None]
    if missing:
        raise ValueError(f"{root}: missing split file(s) {', '.join(missing)} (looked in {', '.join(TEXT_DIRS)}).")
    return found  # type: ignore[return-value]


def _splits_from(
    root: Path,
    captions: dict[str, list[str]],
    explicit: dict[str, str],
    source: Path,
) -> dict[str, list[str]]:
    """Split lists: Flickr split files if present, else the split column, else `hash_split`."""
    files = _flickr_split_files(root)
    if files is not None:
        return {s: _read_split_file(p) for s, p in files.items()}
    if explicit:
        unassigned = [n for n in captions if n not in explicit]
        if unassigned:
            raise ValueError(
                f"{source.name}: {len(unassigned)} image(s) have no split (e.g. {unassigned[0]!r}); "
                "give every row a split or none."
            )
        return {s: [n for n in captions if explicit[n] == s] for s in SPLITS}
    return hash_split(list(captions))


def detect_layout(root: str | os.PathLike) -> str:
    """Name the layout under `root`: "flickr8k", "kaggle", "csv" or "jsonl".

    Raises:
        ValueError: if no known layout is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"Dataset root {root} is not a folder.")
    if _find(root, TEXT_DIRS, TOKEN_FILE) is not None:
        return "flickr8k"
    if (root / "captions.txt").is_file():
        return "kaggle"
    if (root / "captions.csv").is_file():
        return "csv"
    if (root / "captions.jsonl").is_file():
        return "jsonl"
    raise ValueError(
        f"No dataset found in {root}: expected {TOKEN_FILE} (+ {FLICKR_IMAGE_DIRS[0]}/ and split files), "
        "captions.txt + Images/ (Kaggle Flickr8k), captions.csv or captions.jsonl. "
        "Generate synthetic data with `python -m training.synthetic --out DIR`."
    )


def load_splits(root: str | os.PathLike) -> dict[str, CaptionDataset]:
    """Load the train, dev and test splits of the dataset under `root`.

    Args:
        root: dataset folder in one of the layouts in the module docstring.

    Returns:
        {"train": ..., "dev": ..., "test": ...}. Entries whose image is missing on disk, or
        that have no captions, are skipped, logged and counted in ``skipped``.

    Raises:
        ValueError: for an unknown layout, a missing file, or a malformed line (the message
            names the file and line).
    """
    root = Path(root)
    layout = detect_layout(root)
    if layout == "flickr8k":
        token = _find(root, TEXT_DIRS, TOKEN_FILE)
        assert token is not None
        image_dir = _image_dir(root, FLICKR_IMAGE_DIRS)
        if image_dir is None:
            raise ValueError(f"{root}: found {TOKEN_FILE} but no image folder ({' or '.join(FLICKR_IMAGE_DIRS)}).")
        captions = _read_token_file(token)
        files = _flickr_split_files(root)
        if files is None:
            raise ValueError(f"{root}: found {TOKEN_FILE} but no split files ({', '.join(SPLIT_FILES.values())}).")
        lists = {s: _read_split_file(p) for s, p in files.items()}
        image_dirs, source = [image_dir], token
    else:
        if layout == "kaggle":
            source = root / "captions.txt"
            image_dir = _image_dir(root, ("Images", "images"))
            if image_dir is None:
                raise ValueError(f"{root}: found captions.txt but no Images/ folder.")
            image_dirs = [image_dir]
            captions, explicit = _read_csv(source)
        else:
            source = root / f"captions.{layout}"
            image_dirs = [root] + [root / d for d in ("images", "Images") if (root / d).is_dir()]
            captions, explicit = _read_csv(source) if layout == "csv" else _read_jsonl(source)
        lists = _splits_from(root, captions, explicit, source)
    in_splits = {n for names in lists.values() for n in names}
    unused = [n for n in captions if n not in in_splits]
    if unused:
        logger.info("%s: %d captioned image(s) are in no split and are not used.", root, len(unused))
    return {s: _build(root, s, lists[s], captions, image_dirs, source.name) for s in SPLITS}


def load_objects(root: str | os.PathLike) -> dict[str, Any] | None:
    """The synthetic ground truth (``objects.json``) under `root`, or None if there is none.

    Raises:
        ValueError: if the file is not valid JSON or lacks the "images" mapping.
    """
    path = Path(root) / OBJECTS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name} line {e.lineno}: invalid JSON ({e.msg}); regenerate {path}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise ValueError(f"{path}: expected {{'image_size': ..., 'images': {{name: ...}}}}; regenerate it.")
    return data


# ----------------------------------------------------------------------------- tensors


def load_image_uint8(path: str | os.PathLike, spec: int | Preprocess) -> torch.Tensor:
    """An image file as inference sees it, stored compactly as uint8 pixels.

    Decoding is `vlm_demo.images.load_image` (EXIF orientation, alpha onto white,
    16-bit and palette modes) and resizing (and a CLIP's centre crop) is
    `vlm_demo.transforms.model_view`, what `to_tensor` runs before it normalises: the
    library's path, not a copy. `normalize` of the result with the same `spec` equals
    `to_tensor` bit for bit (tests/test_data.py holds both to this).

    Args:
        path: the image file.
        spec: the preprocessing, or a side in pixels for the shipped model's square resize.

    Returns:
        uint8 tensor (3, S, S).
    """
    try:
        image = load_image(path)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    pixels = np.asarray(model_view(image.convert("RGB"), as_preprocess(spec)), dtype=np.uint8)  # (S, S, 3)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def load_images_uint8(
    paths: Sequence[Path], spec: int | Preprocess, progress: bool = True, desc: str = "loading images"
) -> torch.Tensor:
    """Decode and resize every image once: uint8 (N, 3, S, S).

    Threads overlap the decoding (Pillow releases the GIL); order is preserved.
    """
    side = as_preprocess(spec).image_size
    out = torch.empty((len(paths), 3, side, side), dtype=torch.uint8)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda p: load_image_uint8(p, spec), paths)
        for i, t in enumerate(tqdm(results, total=len(paths), desc=desc, unit="img", disable=not progress)):
            out[i] = t
    return out


def normalize(images: torch.Tensor, spec: Preprocess | None = None) -> torch.Tensor:
    """uint8 or [0, 1] float images (..., 3, S, S) -> float32 normalised with `spec`'s mean and std.

    Same maths, in the same order, as `vlm_demo.transforms.to_tensor`: x / 255, - mean, / std.
    None is CLIP's MEAN/STD, which the shipped model uses.
    """
    mean, std = (MEAN, STD) if spec is None else (spec.mean, spec.std)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (mean, std))
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (x - mean) / std


class TrainDataset(torch.utils.data.Dataset):
    """Preloaded images with one caption sampled per item and light augmentation.

    Randomness depends only on (seed, epoch, index), so an epoch is reproducible
    whatever the DataLoader order, the number of workers or DDP ranks: call
    `set_epoch` before each epoch (with non-persistent DataLoader workers, which
    copy the dataset at the start of every epoch).

    Augmentation never flips (captions say left/right/top/bottom) and never changes
    hue (captions name colours): a translation of up to `max_shift` of the side
    (reflection padding, then crop) and brightness/contrast jitter of +/- `jitter`.

    Args:
        split: the split to serve.
        image_size: side S of the square images (the shipped model's square resize), or the
            backbone's `Preprocess` (a CLIP's centre crop, mean and std).
        augment: apply the augmentation; without it, item i is what inference feeds the model
            (`to_tensor` of `vlm_demo.images.load_image`).
        seed: base seed of caption choice and augmentation.
        max_shift: largest translation, as a fraction of the side.
        jitter: largest relative change of brightness and of contrast.
        progress: show a progress bar while preloading.
    """

    def __init__(
        self,
        split: CaptionDataset,
        image_size: int | Preprocess,
        augment: bool = True,
        seed: int = 0,
        max_shift: float = 0.03,
        jitter: float = 0.1,
        progress: bool = True,
    ):
        if len(split) == 0:
            raise ValueError(f"The {split.split or 'given'} split of {split.root} has no images.")
        self.split = split
        self.preprocess = as_preprocess(image_size)
        self.image_size = self.preprocess.image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.shift = int(round(max_shift * self.image_size))
        self.jitter = jitter
        self.captions = split.captions
        desc = f"loading {split.split or 'images'}"
        self.images = load_images_uint8(split.images, self.preprocess, progress, desc=desc)  # (N, 3, S, S)

    def __len__(self) -> int:
        return len(self.captions)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose captions and augmentations items draw."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        """(normalised float32 image (3, S, S), one caption, index)."""
        rng = self._rng(index)
        caps = self.captions[index]
        caption = caps[int(rng.integers(len(caps)))]
        image = self.images[index]
        if not self.augment:
            return normalize(image, self.preprocess), caption, index
        x = image.float() / 255.0  # (3, S, S)
        if self.shift > 0:
            s = self.shift
            dx, dy = (int(v) for v in rng.integers(-s, s + 1, size=2))
            x = F.pad(x[None], (s, s, s, s), mode="reflect")[0]  # (3, S + 2s, S + 2s)
            x = x[:, s + dy : s + dy + self.image_size, s + dx : s + dx + self.image_size]
        brightness, contrast = rng.uniform(1 - self.jitter, 1 + self.jitter, size=2)
        x = x * float(brightness)
        grey = x.mean()  # contrast about the mean intensity: scales all channels alike, so no hue shift
        x = ((x - grey) * float(contrast) + grey).clamp_(0.0, 1.0)
        return normalize(x, self.preprocess), caption, index


def collate(
    batch: Sequence[tuple[torch.Tensor, str, int]], tokenizer: Tokenizer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a batch of `TrainDataset` items.

    Use as ``DataLoader(..., collate_fn=functools.partial(collate, tokenizer=tok))``.

    Returns:
        (images (B, 3, S, S), token ids (B, L), indices (B,) int64).
    """
    images = torch.stack([b[0] for b in batch])
    ids = tokenizer.encode_batch([b[1] for b in batch])
    indices = torch.tensor([b[2] for b in batch], dtype=torch.long)
    return images, ids, indices


def make_collate(tokenizer: Tokenizer) -> Callable[[Sequence[tuple[torch.Tensor, str, int]]], Any]:
    """A picklable `collate` bound to `tokenizer` (for DataLoader workers)."""
    return functools.partial(collate, tokenizer=tokenizer)


@dataclass
class EvalData:
    """Tensors for the retrieval protocol (every caption of every image)."""

    images: torch.Tensor  # (N, 3, S, S) float32, normalised
    captions: list[str]  # all captions, image by image
    caption_to_image: torch.Tensor  # (sum of captions,) int64: index of each caption's image
    names: list[str]  # image names, index-aligned with images


def eval_data(
    split: CaptionDataset, image_size: int | Preprocess, limit: int | None = None, progress: bool = True
) -> EvalData:
    """Images and flattened captions for image<->text retrieval.

    Args:
        split: the split to evaluate (the Flickr8k protocol: test, 1,000 images x 5 captions).
        image_size: side S (the shipped model's square resize), or the backbone's `Preprocess`.
        limit: keep only the first `limit` images (None: all).
        progress: show a progress bar while loading.

    Returns:
        The `EvalData`: normalised images, every caption image by image, each caption's image, the names.
    """
    n = len(split) if limit is None else min(limit, len(split))
    raw = load_images_uint8(split.images[:n], image_size, progress, desc=f"loading {split.split or 'images'}")
    captions = [c for caps in split.captions[:n] for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(split.captions[:n]) for _ in caps], dtype=torch.long)
    spec = as_preprocess(image_size)
    return EvalData(images=normalize(raw, spec), captions=captions, caption_to_image=owner, names=list(split.names[:n]))

