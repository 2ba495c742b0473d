"""Pillow + torch preprocessing (no torchvision: its wheels here fail to load against the CPU torch).

The one preprocessing implementation of the library, set by a small `Preprocess` config:

- the shipped model resizes the whole image to a square, not cropping it, so that
  the patch grid covers the whole picture and the overlays line up with what the
  user uploaded;
- a HuggingFace CLIP resizes the shorter side and centre-crops the square, pixel
  for pixel as transformers' ``CLIPImageProcessor`` does without torchvision (its
  PIL backend, ``CLIPImageProcessorPil``). `crop_box` and `visible_region` say
  which part of the image the model saw, for overlays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# CLIP's normalisation constants.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right and bottom exclusive


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's square input."""

    image_size: int  # side of the square the model sees (a CLIP's crop_size)
    shortest_edge: int | None = None  # None: resize the whole image to the square (the shipped model); else
    # resize it so that its shorter side has this many pixels, keeping the aspect, and centre-crop the square
    resample: int = Image.Resampling.BICUBIC  # Pillow filter of the resize
    mean: tuple[float, ...] = MEAN  # per-channel mean of pixels scaled to [0, 1]
    std: tuple[float, ...] = STD  # per-channel standard deviation

    def __post_init__(self) -> None:
        if self.shortest_edge is not None and self.shortest_edge < self.image_size:
            # transformers would pad the crop with black; no CLIP is configured so.
            raise ValueError(
                f"A centre crop of {self.image_size} px does not fit in a shorter side of {self.shortest_edge} px; "
                "set shortest_edge to at least the crop size."
            )


def as_preprocess(spec: int | Preprocess) -> Preprocess:
    """`spec` itself, or for a side in pixels the shipped model's square resize to it."""
    return spec if isinstance(spec, Preprocess) else Preprocess(spec)


def _geometry(size: tuple[int, int], spec: Preprocess) -> tuple[tuple[int, int], Box]:
    """The resized (width, height) of an image of `size`, and the crop box in the resized image."""
    side = spec.image_size
    if spec.shortest_edge is None:
        return (side, side), (0, 0, side, side)
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    # transformers' get_resize_output_image_size: int() truncates the longer side.
    new_long = int(spec.shortest_edge * long / short)
    resized = (spec.shortest_edge, new_long) if width <= height else (new_long, spec.shortest_edge)
    left, top = (resized[0] - side) // 2, (resized[1] - side) // 2
    return resized, (left, top, left + side, top + side)


def crop_box(size: tuple[int, int], spec: Preprocess) -> tuple[float, float, float, float]:
    """The part of an image that the model sees, in that image's own pixels.

    Args:
        size: (width, height) of the image as given to `to_tensor`.
        spec: the preprocessing.

    Returns:
        (left, top, right, bottom); the whole image when nothing is cropped.
    """
    (rw, rh), (left, top, right, bottom) = _geometry(size, spec)
    sx, sy = size[0] / rw, size[1] / rh
    return left * sx, top * sy, right * sx, bottom * sy


def visible_region(image: Image.Image, spec: Preprocess) -> Image.Image:
    """The part of `image` that the model sees, at the image's resolution (the image itself if uncropped)."""
    box = tuple(round(v) for v in crop_box(image.size, spec))
    return image if box == (0, 0, *image.size) else image.crop(box)


def model_view(image: Image.Image, spec: Preprocess) -> Image.Image:
    """Resize and crop an RGB image to the (image_size, image_size) square the model sees."""
    resized, box = _geometry(image.size, spec)
    if image.size != resized:
        image = image.resize(resized, spec.resample)
    return image if box == (0, 0, *resized) else image.crop(box)


def to_tensor(image: Image.Image, spec: int | Preprocess) -> torch.Tensor:
    """Resize (and crop) an RGB image to the model's square and normalise it.

    Args:
        image: an RGB PIL image (use `vlm_demo.images.load_image` for untrusted input).
        spec: the preprocessing, or an output side in pixels for the shipped square resize.

    Returns:
        A float32 tensor of shape (3, S, S), S the square's side.
    """
    spec = as_preprocess(spec)
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(model_view(image, spec), dtype=np.float32) / 255.0  # (S, S, 3)
    array = (array - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def to_batch(images: list[Image.Image], spec: int | Preprocess) -> torch.Tensor:
    """Stack `to_tensor` over a list: (B, 3, S, S)."""
    return torch.stack([to_tensor(im, spec) for im in images])
