"""Safe image loading for untrusted uploads.

`load_image` turns whatever a user uploads (a path, raw bytes or a PIL image)
into a plain 8-bit RGB PIL image, or raises a `ValueError` whose message a
person can act on. It is the only place where untrusted image bytes are
decoded, so the rest of the library can assume "RGB, sensibly sized".

Limits (both are keyword arguments of `load_image`):

- ``max_pixels`` (default `DEFAULT_MAX_PIXELS`, 40 million): the decompression-
  bomb limit on width * height. It is checked from the file header, before any
  pixel data is decoded, so a tiny file that claims to be 100,000 x 100,000
  pixels costs nothing. WebP, which decodes through three full-size buffers,
  gets a third of it. Pillow's own global guard (`PIL.Image.MAX_IMAGE_PIXELS`)
  is not relied on and is never changed permanently: when ``max_pixels`` is
  above it, it is raised for the duration of the header read only, under a
  lock, and restored afterwards.
- ``max_side`` (default `DEFAULT_MAX_SIDE`, 1024): images whose longer side is
  larger are downsized right after decoding, keeping the aspect ratio (each
  side stays at least 1 px). JPEGs are decoded at a reduced scale
  (`Image.draft`) when possible, which is much cheaper than a full decode.

Only the formats in `ALLOWED_FORMATS` are opened. This keeps Pillow's rarer
decoders (and EPS, which shells out to Ghostscript) away from untrusted input.
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import warnings
import zlib

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

DEFAULT_MAX_PIXELS: int = 40_000_000  # width * height; ~160 MB as RGBA, checked before decoding
DEFAULT_MAX_SIDE: int = 1024  # longer side after loading; the models use 112-224 px anyway

# Pillow format ids tried by `Image.open`. "JPEG" also opens MPO files (what many
# phone cameras write: a JPEG with extra frames), which report format "MPO".
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

_NOT_AN_IMAGE = "This file is not an image Pillow can read (expected PNG, JPEG, WebP, GIF, BMP or TIFF)."

# What Pillow's decoders raise on malformed data. Fuzzing Pillow shows far more
# than OSError, and a bad upload must never escape as an unexplained traceback.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # Pillow's plugins use it for "not a valid <format> file"
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    RuntimeError,
)

# libwebp decodes into its own canvas, which Pillow copies into a bytes object
# and then into the image: three full-size RGBA buffers where other formats need
# one, so WebP gets a third of the pixel budget (and of the decode time).
_WEBP_COST = 3

# EXIF orientation -> the transpose that displays the image upright (as in
# Pillow's ImageOps.exif_transpose, applied here to the downsized image).
_EXIF_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Serialises the header read: it is the only code that touches process-wide
# state (the warnings filters and, sometimes, Image.MAX_IMAGE_PIXELS), and
# Gradio calls handlers from several threads.
_OPEN_LOCK = threading.Lock()

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
) -> Image.Image:
    """Load an untrusted image as an 8-bit RGB PIL image.

    EXIF orientation is applied, transparency is composited onto white,
    16-bit and float images are rescaled to 0-255, and only the first frame of
    an animation is used. The result is a new image, independent of any file.

    Args:
        source: a file path (str or path-like), the file's raw bytes, or a PIL
            image (its current frame is used; the caller's image is not changed,
            though a lazily opened one gets loaded).
        max_pixels: reject images with more than this many pixels
            (width * height; a third of it for WebP), judged from the header
            before decoding.
        max_side: downsize images whose longer side exceeds this, keeping the
            aspect ratio; each side of the result is at least 1 px.

    Returns:
        A PIL image in mode "RGB" whose longer side is at most `max_side`.

    Raises:
        ValueError: the input is missing, empty, not a supported image,
            truncated or corrupt, or larger than `max_pixels`; or a limit
            argument is not a positive integer. The message is meant for the
            person who uploaded the file.
        TypeError: `source` is of an unsupported type.
    """
    _check_limit("max_pixels", max_pixels)
    _check_limit("max_side", max_side)

    if isinstance(source, Image.Image):
        # The caller owns this image: never close it, and skip `draft`, which
        # would change its size in place.
        _check_pixels(source.size, max_pixels, source.format)
        _decode(source)
        return _finish(source, max_side)

    # Both `with`s matter: Pillow does not close a stream it was handed, and
    # animated images keep reading it after load(). Every step in `_finish`
    # returns a new image, so the result outlives the file.
    with _open_stream(source) as stream, _open_header(stream, max_pixels) as image:
        _check_pixels(image.size, max_pixels, image.format)
        if image.format in ("JPEG", "MPO"):
            target = _fit(image.size, max_side)
            if target != image.size:
                # Lets libjpeg decode at 1/2, 1/4 or 1/8 scale: never smaller
                # than `target`, and far less memory and time than full size.
                image.draft(None, target)
        _decode(image)
        return _finish(image, max_side)


def _check_limit(name: str, value: int) -> None:
    """Reject limits that would make every image fail (or silently pass)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _open_stream(source: object) -> io.BufferedIOBase | io.BytesIO:
    """Turn a path or bytes into a binary stream, with readable errors.

    Args:
        source: a path (str or path-like) or bytes-like object.

    Returns:
        A seekable binary stream positioned at the start.

    Raises:
        ValueError: no input, an empty input, or a path that cannot be read.
        TypeError: anything else.
    """
    if source is None:
        # Gradio passes None when the user pressed submit without an image.
        raise ValueError("No image was given. Please upload an image.")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ValueError("The file is empty.")
        return io.BytesIO(data)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not os.path.exists(path):
            raise ValueError(f"No image file at {path!r}: the path does not exist.")
        if os.path.isdir(path):
            raise ValueError(f"{path!r} is a folder, not an image file.")
        try:
            stream = open(path, "rb")  # noqa: SIM115 - the caller closes it
        except OSError as error:
            raise ValueError(f"Cannot read the image file {path!r}: {error.strerror or error}.") from error
        if os.fstat(stream.fileno()).st_size == 0:
            stream.close()
            raise ValueError("The file is empty.")
        return stream
    raise TypeError(f"load_image expects a path, bytes or a PIL image, got {type(source).__name__}.")


def _open_header(stream: io.BufferedIOBase | io.BytesIO, max_pixels: int) -> ImageFile.ImageFile:
    """Identify the format and read the header (no pixel data is decoded).

    Pillow runs its own decompression-bomb check inside `Image.open`, driven by
    the global `Image.MAX_IMAGE_PIXELS`: a warning above it, an error above
    twice it. Both are turned into the same `ValueError` as our own check, and
    the global is lifted to `max_pixels` for this call only if it is lower, so
    the argument, not the global, decides.

    Args:
        stream: the file (left open; the caller closes it).
        max_pixels: the caller's pixel limit.

    Returns:
        The lazily opened image.

    Raises:
        ValueError: not a supported image, a corrupt header, or too many pixels.
    """
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            try:
                if saved_limit is not None and saved_limit < max_pixels:
                    Image.MAX_IMAGE_PIXELS = max_pixels
                return Image.open(stream, formats=ALLOWED_FORMATS)
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's message quotes its own global limit, which would confuse
        # the user; keep only the pixel count from it.
        found = re.search(r"\((\d+) pixels\)", str(error))
        detail = f"it has {int(found.group(1)):,} pixels" if found else "it has too many pixels"
        raise ValueError(_too_large_message(max_pixels, detail)) from error
    except UnidentifiedImageError as error:
        raise ValueError(_NOT_AN_IMAGE) from error
    except _DECODE_ERRORS as error:
        raise ValueError(f"The image file is truncated or corrupt: {error}") from error


def _check_pixels(size: tuple[int, int], max_pixels: int, fmt: str | None = None) -> None:
    """Raise the user-facing bomb error if `size` has more pixels than `fmt` may decode."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"The image has no pixels (size {width}x{height}).")
    limit, kind = max_pixels, ""
    if fmt == "WEBP":
        limit, kind = max(1, max_pixels // _WEBP_COST), " for WebP, which takes three times the memory to decode"
    if width * height > limit:
        raise ValueError(_too_large_message(limit, f"it is {width}x{height} = {width * height:,} pixels", kind))


def _too_large_message(max_pixels: int, detail: str, kind: str = "") -> str:
    return (
        f"The image is too large to load safely ({detail}; the limit is {max_pixels:,} pixels{kind}). "
        "Please upload a smaller image."
    )


def _decode(image: Image.Image) -> None:
    """Decode the pixel data, turning decoder failures into a readable ValueError.

    This relies on `ImageFile.LOAD_TRUNCATED_IMAGES` being off (Pillow's
    default; this module never turns it on), so a cut-off file fails here
    instead of loading with a grey band.
    """
    try:
        image.load()
    except _DECODE_ERRORS as error:
        raise ValueError(f"The image file is truncated or corrupt: {error}") from error


def _finish(image: Image.Image, max_side: int) -> Image.Image:
    """Downsize, convert to RGB and orient a decoded image (always returns a new image).

    Shrinking comes first and orienting last, on the small image: converting and
    orienting at full size made up to five full-size copies (0.9 GB and 4 s for
    a 40 M-pixel RGBA PNG of 170 kB).
    """
    transpose = _orientation(image)
    rgb = _to_rgb(_shrink(image, max_side))
    target = _fit(rgb.size, max_side)
    if target != rgb.size:
        # reducing_gap box-filters by an integer factor first: much faster on
        # big images, and indistinguishable at these output sizes.
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb if transpose is None else rgb.transpose(transpose)


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The transpose that the image's EXIF orientation asks for, if any."""
    try:
        return _EXIF_TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation))
    except _DECODE_ERRORS:
        # Broken EXIF should not cost the user their upload: the pixels are
        # fine, only the orientation hint is lost.
        return None


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """Box-average a big image down by an integer factor, in (nearly) its own mode.

    The result's longer side stays at least `max_side`, so the LANCZOS resize in
    `_finish` still sets the final size. Returns `image` itself when it is less
    than twice `max_side`.
    """
    factor = max(image.size) // max_side
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        # `reduce` refuses 16-bit modes; a BOX resize is the same average.
        size = (max(1, image.width // factor), max(1, image.height // factor))
        return image.resize(size, Image.Resampling.BOX, reducing_gap=None)
    if _has_alpha(image) and image.mode not in ("RGBA", "RGBa", "LA", "La"):
        # A transparent palette index or colour key would not survive averaging:
        # make it a real alpha channel first (`reduce` premultiplies it).
        image = image.convert("RGBA")
    elif image.mode in ("1", "P"):
        # Average levels and colours, not bits or palette indices.
        image = image.convert("L" if image.mode == "1" else "RGB")
    try:
        return image.reduce(factor)
    except ValueError:
        return image  # a mode `reduce` does not know: `_finish` converts it at full size


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or image.info.get("transparency") is not None


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Size with the longer side capped at `max_side`, aspect kept, each side >= 1."""
    width, height = size
    longer = max(width, height)
    if longer <= max_side:
        return size
    scale = max_side / longer
    # max(1, ...) matters for very thin images: 40000x2 scales to 1024x0.05.
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Args:
        image: a decoded image in any mode.

    Returns:
        A new "RGB" image.

    Raises:
        ValueError: a mode Pillow cannot convert to RGB.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(image), mode="L").convert("RGB")
    if mode == "La":
        # Premultiplied luminance + alpha: Pillow has no direct La -> RGBA path.
        image, mode = image.convert("LA"), "LA"
    try:
        if _has_alpha(image):
            # Transparent pixels often hold arbitrary (frequently black) colour;
            # white is what viewers and browsers show, so the model sees that too.
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        # Covers P, CMYK, YCbCr, L, 1, RGBX, HSV, LAB and RGB (convert copies).
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"The image uses a colour mode ({mode}) that cannot be converted to RGB.") from error


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float single-channel image to uint8.

    `convert("L")` would clip: a mid-grey 16-bit value of 32768 becomes 255.
    So values are scaled by the bit depth when it is known, and otherwise by
    the range the data actually uses.

    Args:
        image: an image in mode "I;16*", "I" or "F".

    Returns:
        A (H, W) uint8 array.
    """
    values = np.asarray(image).astype(np.float32)  # (H, W)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0  # 65535 -> 255
    else:
        finite = values[np.isfinite(values)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 0.0
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0  # the usual [0, 1] float convention
        elif image.mode == "I" and low >= 0 and high <= 255:
            scaled = values  # 8-bit data in a 32-bit container, e.g. convert("I")
        elif image.mode == "I" and low >= 0 and high <= 65535:
            scaled = values / 257.0  # older Pillow opened 16-bit PNGs as "I"
        elif high > low:
            scaled = (values - low) * (255.0 / (high - low))
        else:
            scaled = values  # constant image outside [0, 1]: keep it, clipped below
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
