"""Pillow + torch preprocessing (no torchvision: its wheels here fail to load against the CPU torch).

Images are resized to a square, not cropped, so that the patch grid covers the
whole picture and the overlays line up with what the user uploaded.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# CLIP's normalisation constants.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize an RGB image to `image_size` square and normalise it.

    Args:
        image: an RGB PIL image (use `vlm_demo.images.load_image` for untrusted input).
        image_size: output side in pixels.

    Returns:
        A float32 tensor of shape (3, image_size, image_size).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    array = (array - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def to_batch(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """Stack `to_tensor` over a list: (B, 3, image_size, image_size)."""
    return torch.stack([to_tensor(im, image_size) for im in images])
