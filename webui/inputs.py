"""What a request may send: the upload guard, keep-ratio parsing, and the page's examples."""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from pathlib import Path
from typing import Any

from vlm_demo.pruning import PLACEMENTS

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # launch(max_file_size=...), and the same cap on images sent inline


def image_source(payload: Any) -> str | bytes:
    """The upload as a path (or bytes), straight from Gradio's payload.

    The events run with ``preprocess=False`` so that Gradio never opens the
    file itself (its preprocessing decodes bombs in full and turns non-images
    into opaque errors); `vlm_demo.images` decodes it safely inside the api.
    Where the path may point is checked by `uploaded_only`. An inline
    ``data:`` image gets the same size cap as an upload.

    Raises:
        ValueError: no image, an inline image over the cap, or anything but an upload.
    """
    if payload is None:
        raise ValueError("Upload an image first (PNG, JPEG, WebP, GIF, BMP or TIFF).")
    if isinstance(payload, dict):
        if payload.get("path"):
            return str(payload["path"])
        url = payload.get("url") or ""
        if url.startswith("data:") and "," in url:
            data = url.split(",", 1)[1]
            if len(data) * 3 // 4 > MAX_UPLOAD_BYTES:
                raise ValueError(f"The image is larger than {MAX_UPLOAD_BYTES // 2**20} MB; upload a smaller one.")
            try:
                return base64.b64decode(data, validate=False)
            except (binascii.Error, ValueError):
                raise ValueError("The image data could not be read; upload the image as a file.") from None
    raise ValueError("The image must be an uploaded file (with gradio_client: handle_file(path)).")


def uploaded_only(source: str | bytes, upload_folder: str) -> str | bytes:
    """`source` if it is bytes or a file under Gradio's upload folder: no request may name another server file.

    Gradio refuses a FileData payload (one with ``meta``) outside its upload
    folder, but with ``preprocess=False`` it hands a bare ``{"path": ...}``
    dict to the event untouched, so without this check a request could make
    the app read any file on the server.

    Raises:
        ValueError: the path resolves outside `upload_folder`.
    """
    if isinstance(source, bytes):
        return source
    folder, path = os.path.realpath(upload_folder), os.path.realpath(source)
    if os.path.commonpath([folder, path]) != folder:
        raise ValueError("The image must be a file uploaded to this app (with gradio_client: handle_file(path)).")
    return path


def parse_keep_ratio(value: Any, num_patches: int) -> float:
    """A keep ratio in (0, 1], rounded to 4 decimals so that slider stops hit the GMACs cache.

    Raises:
        ValueError: not a number in (0, 1] (booleans, NaN and infinities included).
    """
    return _fraction(
        value,
        f"The keep ratio must be a number in (0, 1]: the fraction of the {num_patches} image patches left after "
        "the last stage",
    )


def _fraction(value: Any, what: str) -> float:
    """`value` as a number in (0, 1], rounded to 4 decimals; else a ValueError that says `what` and echoes it."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = math.nan
    if isinstance(value, bool) or not math.isfinite(r) or not 0.0 < r <= 1.0:
        raise ValueError(f"{what} (got {value!r}).")
    return round(r, 4)


def parse_placement(value: Any) -> str:
    """One of the named placements (`vlm_demo.pruning.PLACEMENTS`); None or "" is the first, ``paper``.

    Raises:
        ValueError: anything else.
    """
    if value is None or value == "":
        return PLACEMENTS[0]
    if not isinstance(value, str) or value not in PLACEMENTS:
        raise ValueError(f"The placement must be one of {', '.join(PLACEMENTS)}.")
    return value


def parse_gmacs_ratio(value: Any) -> float:
    """A share of the baseline's GMACs in (0, 1], as the comparison matches every method to it.

    Raises:
        ValueError: not a number in (0, 1].
    """
    return _fraction(value, "The GMACs ratio must be a number in (0, 1]: the share of the full model's compute")


def load_examples(folder: Path, photos_first: bool = False) -> list[list[str]]:
    """[[image path, caption], ...] from ``folder/examples.json``, leaving out missing images; [] if absent.

    With `photos_first`, the real photos (``"photo": true``) come before the synthetic scenes.
    """
    index = folder / "examples.json"
    if not index.is_file():
        return []
    items = [i for i in json.loads(index.read_text()) if (folder / i["image"]).is_file()]
    if photos_first:
        items.sort(key=lambda i: not i.get("photo", False))  # stable: each group keeps its order
    return [[str(folder / i["image"]), i["caption"]] for i in items]
