"""Tests for vlm_demo.images.load_image: every fixture is written here with Pillow."""

from __future__ import annotations

import gc
import io
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlm_demo.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, load_image

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Incompressible RGB noise, so that cutting a file in half cuts the pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    """An RGB image whose left half is `left` and right half is `right`."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def png_claiming(size: tuple[int, int], mode: str = "1") -> bytes:
    """A tiny PNG whose IHDR claims `size`: a decompression bomb that is cheap to build.

    Only the header is rewritten (with a valid CRC); the pixel data still
    describes a 1x1 image, so decoding it would fail as truncated. Getting the
    "too large" error therefore proves the limit is checked before decoding.
    """
    data = bytearray(encode(Image.new(mode, (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", *size)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def assert_colour(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 0) -> None:
    assert len(actual) == len(expected), (actual, expected)
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected)), (actual, expected)


def assert_rgb(image: Image.Image) -> None:
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.width >= 1 and image.height >= 1


# ---------------------------------------------------------------- bad inputs


def test_defaults_are_documented_values():
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert DEFAULT_MAX_SIDE == 1024


def test_empty_bytes():
    with pytest.raises(ValueError, match="The file is empty"):
        load_image(b"")


def test_empty_file(tmp_path):
    path = write(tmp_path / "empty.png", b"")
    with pytest.raises(ValueError, match="The file is empty"):
        load_image(path)


def test_missing_path_is_named(tmp_path):
    path = tmp_path / "nope" / "missing.jpg"
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_image(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_image(str(path))


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="folder, not an image"):
        load_image(tmp_path)


def test_none_is_rejected_with_a_message():
    with pytest.raises(ValueError, match="No image was given"):
        load_image(None)  # type: ignore[arg-type]


def test_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="path, bytes or a PIL image"):
        load_image(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"max_side": 0}, {"max_pixels": -1}, {"max_side": 1.5}])
def test_bad_limits(kwargs):
    with pytest.raises(ValueError, match="must be a positive integer"):
        load_image(encode(Image.new("RGB", (2, 2))), **kwargs)


def test_truncated_png(tmp_path):
    data = encode(noise((64, 64)))
    path = write(tmp_path / "cut.png", data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    data = encode(noise((64, 64)), "JPEG", quality=95)
    path = write(tmp_path / "cut.jpg", data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(path)


def test_truncated_file_does_not_depend_on_global_flag(tmp_path):
    data = encode(noise((32, 32)))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


NOT_AN_IMAGE = re.escape("This file is not an image Pillow can read (expected PNG, JPEG, WebP, GIF, BMP or TIFF).")


def test_text_file(tmp_path):
    path = write(tmp_path / "notes.png", b"hello, this is a caption, not a picture\n")
    with pytest.raises(ValueError, match=NOT_AN_IMAGE):
        load_image(path)


def test_random_bytes():
    data = np.random.default_rng(123).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ValueError, match=NOT_AN_IMAGE):
        load_image(data)


def test_formats_outside_the_allow_list_are_not_opened(tmp_path):
    # EPS decoding shells out to Ghostscript: Pillow can identify it, but
    # untrusted uploads must not reach that decoder.
    path = tmp_path / "drawing.eps"
    Image.new("RGB", (8, 8), RED).save(path, "EPS")
    with Image.open(path) as image:
        assert image.format == "EPS"
    with pytest.raises(ValueError, match=NOT_AN_IMAGE):
        load_image(path)


def test_decompression_bomb_default_limit(tmp_path):
    # A genuine 12000x12000 PNG (144 M pixels): ~18 kB on disk, ~144 MB decoded.
    path = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(path, compress_level=9)
    assert path.stat().st_size < 100_000
    with pytest.raises(ValueError, match=r"too large to load safely.*40,000,000 pixels") as info:
        load_image(path)
    assert "144,000,000" in str(info.value)
    assert "89478485" not in str(info.value)  # Pillow's global limit must not leak into the message


@pytest.mark.parametrize(
    "size",
    [
        (7000, 7000),  # 49 M: over our 40 M default, under Pillow's own warning level
        (10000, 10000),  # 100 M: Pillow warns (turned into our error)
        (50000, 50000),  # 2.5 G: Pillow raises DecompressionBombError (turned into our error)
    ],
)
def test_bomb_is_rejected_from_the_header_before_decoding(size):
    with pytest.raises(ValueError, match="too large to load safely"):
        load_image(png_claiming(size))


def test_lower_max_pixels_argument():
    data = encode(Image.new("L", (100, 100), 50))
    with pytest.raises(ValueError, match=r"100x100 = 10,000 pixels.*limit is 9,999 pixels"):
        load_image(data, max_pixels=9_999)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def test_lower_max_pixels_applies_to_pil_images_too():
    with pytest.raises(ValueError, match="too large"):
        load_image(Image.new("RGB", (50, 50)), max_pixels=2_000)


def test_max_pixels_above_pillow_global_is_honoured():
    # 100 M pixels is above Pillow's global guard (~89 M); with max_pixels raised
    # the header must pass, so the failure comes from the (fake) pixel data.
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(png_claiming((10000, 10000)), max_pixels=200_000_000)


def test_pil_global_state_is_never_changed(tmp_path):
    saved_limit, saved_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    data = encode(Image.new("RGB", (4, 4), GREEN))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image(data)
        load_image(data, max_pixels=10**9)
        for bomb, limit in [((10000, 10000), DEFAULT_MAX_PIXELS), ((10000, 10000), 2 * 10**8), ((50000, 50000), 10)]:
            with pytest.raises(ValueError):
                load_image(png_claiming(bomb), max_pixels=limit)
            assert Image.MAX_IMAGE_PIXELS == saved_limit
    assert Image.MAX_IMAGE_PIXELS == saved_limit
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert list(warnings.filters) == saved_filters
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# ---------------------------------------------------------------- odd but valid images


def test_rgba_transparent_region_becomes_white():
    image = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent *red*
    image.paste((0, 0, 255, 255), (10, 0, 15, 10))  # opaque blue
    image.paste((0, 0, 0, 128), (15, 0, 20, 10))  # half-transparent black
    result = load_image(encode(image))
    assert_rgb(result)
    assert_colour(result.getpixel((2, 5)), WHITE)
    assert_colour(result.getpixel((12, 5)), BLUE)
    assert_colour(result.getpixel((17, 5)), (127, 127, 127), tol=1)


def test_la_composites_onto_white():
    image = Image.new("LA", (10, 10), (0, 0))  # transparent black
    image.paste((0, 255), (5, 0, 10, 10))  # opaque black
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode == "LA"
    result = load_image(data)
    assert_colour(result.getpixel((1, 1)), WHITE)
    assert_colour(result.getpixel((8, 1)), BLACK)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0] + list(GREEN) + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 5, 10))  # index 0: black in the palette, but transparent
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and reopened.info.get("transparency") == 0
    result = load_image(path)
    assert_colour(result.getpixel((1, 1)), WHITE)
    assert_colour(result.getpixel((8, 1)), GREEN)


def test_palette_without_transparency():
    image = Image.new("P", (4, 4), 2)
    image.putpalette([0, 0, 0, 0, 0, 0, 10, 20, 30] + [0, 0, 0] * 253)
    assert_colour(load_image(encode(image)).getpixel((0, 0)), (10, 20, 30))


def test_16bit_png_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")  # really a 16-bit file
    result = load_image(data)
    assert result.size == (3, 1)
    assert_colour(result.getpixel((0, 0)), BLACK)
    assert_colour(result.getpixel((1, 0)), (128, 128, 128), tol=1)  # mid-grey, not white
    assert_colour(result.getpixel((2, 0)), WHITE)


def test_32bit_int_image_in_16bit_range():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), "I")
    result = load_image(image)
    assert [result.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_tiff_in_unit_range(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == "F"
    result = load_image(path)
    assert [result.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_tiff_other_range_is_min_max_scaled(tmp_path):
    path = tmp_path / "float_range.tif"
    Image.fromarray(np.array([[-1.0, 1.0, 3.0]], dtype=np.float32), "F").save(path)
    result = load_image(path)
    assert [result.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    with Image.open(path) as reopened:
        assert reopened.mode == "CMYK"
    result = load_image(path)
    assert_rgb(result)
    assert_colour(result.getpixel((8, 8)), RED, tol=8)


def test_ycbcr_image():
    image = Image.new("RGB", (4, 4), (200, 30, 40)).convert("YCbCr")
    assert_colour(load_image(image).getpixel((1, 1)), (200, 30, 40), tol=3)


def test_grayscale_and_bilevel():
    assert_colour(load_image(encode(Image.new("L", (5, 5), 77))).getpixel((2, 2)), (77, 77, 77))
    bilevel = Image.new("1", (6, 2), 0)
    bilevel.paste(1, (3, 0, 6, 2))
    result = load_image(encode(bilevel))
    assert_colour(result.getpixel((0, 0)), BLACK)
    assert_colour(result.getpixel((5, 1)), WHITE)


def test_one_by_three_pixels():
    image = Image.new("RGB", (1, 3), RED)
    image.putpixel((0, 2), BLUE)
    result = load_image(encode(image))
    assert result.size == (1, 3)
    assert_colour(result.getpixel((0, 0)), RED)
    assert_colour(result.getpixel((0, 2)), BLUE)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_thin_image_is_downsized_keeping_aspect(fmt):
    data = encode(Image.new("RGB", (6000, 40), (30, 140, 220)), fmt)
    result = load_image(data)
    assert result.size == (1024, 7)  # 40 * 1024 / 6000 = 6.8
    assert abs(result.width / result.height - 6000 / 40) / (6000 / 40) < 0.05
    assert_colour(result.getpixel((512, 3)), (30, 140, 220), tol=6)


def test_extremely_thin_image_keeps_one_pixel():
    result = load_image(encode(Image.new("L", (40000, 1), 200)))
    assert result.size == (1024, 1)
    assert_colour(result.getpixel((100, 0)), (200, 200, 200))


def test_custom_max_side_and_small_images_untouched():
    data = encode(halves((300, 200), RED, BLUE))
    assert load_image(data, max_side=150).size == (150, 100)
    assert load_image(data).size == (300, 200)  # under the default: not resized


def test_large_jpeg_is_downsized_with_content_intact():
    data = encode(halves((3000, 2000), RED, BLUE), "JPEG", quality=90)
    result = load_image(data)
    assert result.size == (1024, 683)
    assert_colour(result.getpixel((100, 340)), RED, tol=10)
    assert_colour(result.getpixel((900, 340)), BLUE, tol=10)


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [
        (6, RED, BLUE),  # display = stored rotated 90 deg clockwise: left half goes to the top
        (8, BLUE, RED),  # display = stored rotated 90 deg counter-clockwise: left half goes to the bottom
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    path = tmp_path / f"rotated{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    halves((40, 20), RED, BLUE).save(path, quality=95, exif=exif)
    with Image.open(path) as stored:
        assert stored.size == (40, 20)
    result = load_image(path)
    assert result.size == (20, 40)
    assert_colour(result.getpixel((10, 5)), top, tol=12)
    assert_colour(result.getpixel((10, 34)), bottom, tol=12)


def test_animated_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (12, 12), colour) for colour in (RED, GREEN, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as reopened:
        assert reopened.n_frames == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load_image(path)
        gc.collect()
    assert_colour(result.getpixel((6, 6)), RED)
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # the file was closed


# ---------------------------------------------------------------- input kinds


def test_bytes_str_path_and_pil_inputs_agree(tmp_path):
    original = halves((30, 10), GREEN, (10, 20, 30))
    path = tmp_path / "pic.png"
    original.save(path)
    results = [
        load_image(path.read_bytes()),
        load_image(bytearray(path.read_bytes())),
        load_image(str(path)),
        load_image(path),
        load_image(original),
    ]
    for result in results:
        assert_rgb(result)
        assert result.tobytes() == original.tobytes()


def test_pil_input_is_not_modified():
    image = Image.new("RGBA", (2000, 50), (255, 0, 0, 0))
    result = load_image(image)
    assert result is not image
    assert image.mode == "RGBA" and image.size == (2000, 50)
    assert result.size == (1024, 26)
    assert_colour(result.getpixel((0, 0)), WHITE)


def test_result_is_independent_of_the_file(tmp_path):
    path = tmp_path / "gone.png"
    Image.new("RGB", (8, 8), BLUE).save(path)
    result = load_image(path)
    path.unlink()
    assert_colour(result.resize((4, 4)).getpixel((1, 1)), BLUE)


def test_big_jpeg_is_decoded_at_reduced_scale(monkeypatch):
    from PIL import JpegImagePlugin

    decoded_sizes = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    result = load_image(encode(Image.new("RGB", (4096, 3072), GREEN), "JPEG"))
    assert decoded_sizes == [(1024, 768)]  # libjpeg decoded at 1/4 scale, not 4096x3072
    assert result.size == (1024, 768)
