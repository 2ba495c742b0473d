"""A short, reproducible fuzz of the upload surface; the long run is `python -m benchmarks.fuzz_inputs --seconds 300`.

Every input must load or raise ValueError with a message, within 2 s of CPU and 500 MB of peak
memory (see `benchmarks.fuzz_inputs`). Examples are derandomized and no hypothesis database is written.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from benchmarks import fuzz_inputs as fz
from vlm_demo.images import DEFAULT_MAX_PIXELS, load_image

QUICK = settings(
    derandomize=True,
    database=None,
    deadline=2000,  # ms; the 2 s budget is also checked on the time measured inside the worker
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def load() -> Iterator[fz.Worker]:
    worker = fz.Worker("load")
    worker.start()  # outside the examples' deadline
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def caption() -> Iterator[fz.Worker]:
    worker = fz.Worker("caption")
    worker.start()  # imports torch and builds a tiny model: seconds, outside the examples' deadline
    yield worker
    worker.close()


def assert_holds(outcome: fz.Outcome) -> None:
    assert outcome.problem() is None, outcome.problem()
    assert outcome.status in ("loaded", "rejected") and outcome.detail.strip(), outcome


# ----------------------------------------------------------------------------- the harness itself


def test_harness_reports_escapes_crashes_and_hangs():
    probe = fz.Worker("probe", hang_seconds=0.5)
    try:
        expected = {
            "raise": "KeyError escaped: 'boom'",
            "empty": "ValueError, empty message",
            "crash": "the process died (signal SIGSEGV)",
            "sleep": "hang: no answer after 0.5 s",
        }
        for command, message in expected.items():
            outcome = probe([command, 5])
            assert outcome.status == "violation" and outcome.problem().startswith(message), (command, outcome)
        assert probe(["ok"]).problem() is None  # a fresh child after the crash and the hang
    finally:
        probe.close()


def test_harness_measures_time_and_memory_per_input():
    probe = fz.Worker("probe")
    try:
        busy = probe(["spin", 0.3])
        assert busy.problem() is None and busy.problem(max_seconds=0.2).startswith("took 0.3"), busy
        stalled = probe(["sleep", 0.3])
        assert stalled.seconds < 0.1 and stalled.problem(max_wall=0.2).startswith("took 0.3"), stalled
        probe(["hold", 96])  # the next input's peak must not include this one's
        big = probe(["hold", 64])
        assert 60 < big.peak_mb < 90, big
        assert big.problem(max_peak_mb=32).startswith("peak memory rose")
    finally:
        probe.close()


def test_seed_files_cover_every_format_and_all_load(load):
    seeds = fz.seed_files()
    assert set(seeds) == set(fz.FORMATS)
    for fmt, files in seeds.items():
        assert len(files) >= 3, fmt
        for data in files:
            outcome = load(data)
            assert outcome.status == "loaded" and outcome.problem() is None, (fmt, outcome)


def test_claim_size_rewrites_every_header():
    for fmt, files in fz.seed_files().items():
        with Image.open(io.BytesIO(fz.claim_size(files[0], 7000, 6000))) as image:
            assert image.size == (7000, 6000), fmt


# ----------------------------------------------------------------------------- fuzzing


@settings(QUICK, max_examples=400)
@given(case=fz.mutated_images())
def test_mutated_images_load_or_raise_value_error(load, case):
    assert_holds(load(case[1]))


@settings(QUICK, max_examples=100)
@given(case=fz.claimed_sizes())
def test_fake_bombs_load_or_raise_value_error(load, case):
    assert_holds(load(case[1]))


@settings(QUICK, max_examples=100)
@given(case=fz.RANDOM_BYTES)
def test_random_bytes_load_or_raise_value_error(load, case):
    assert_holds(load(case[1]))


@settings(QUICK, max_examples=200)
@given(case=fz.CAPTIONS)
def test_captions_pass_or_raise_value_error(caption, case):
    assert_holds(caption(case[1]))


# ----------------------------------------------------------------------------- regressions found by fuzzing


def test_transparent_40_megapixel_png_stays_within_budget(load):
    # Found by the bomb generator: this 170 kB PNG took 0.9 GB and 4 s, converted at full size 5 times.
    side = math.isqrt(DEFAULT_MAX_PIXELS)
    data = fz.encode(Image.new("RGBA", (side, side), (255, 0, 0, 0)), "PNG", compress_level=9)
    assert len(data) < 200_000
    outcome = load(data)
    assert_holds(outcome)
    assert outcome.status == "loaded" and outcome.detail == "1024x1024"


def test_webp_gets_a_third_of_the_pixel_budget(load):
    # A 1.6 kB WebP at the full budget took 1.2 GB: libwebp's canvas, a bytes copy and the image.
    side, third = math.isqrt(DEFAULT_MAX_PIXELS), math.isqrt(DEFAULT_MAX_PIXELS // 3)
    refused = load(fz.encode(Image.new("RGBA", (side, side), (1, 2, 3, 4)), "WEBP", lossless=True))
    assert refused.status == "rejected" and refused.seconds < 0.2 and refused.peak_mb < 50, refused
    assert "the limit is 13,333,333 pixels for WebP" in refused.detail and "smaller image" in refused.detail
    loaded = load(fz.encode(Image.new("RGB", (third, third), (9, 9, 9)), "WEBP", lossless=True))
    assert_holds(loaded)
    assert loaded.status == "loaded"


def test_big_images_shrunk_before_conversion_keep_orientation_alpha_and_depth():
    # The fix shrinks before converting and orients last: the result must not change.
    image = Image.new("RGBA", (3000, 1000), (255, 0, 0, 255))
    image.paste((0, 0, 255, 0), (1500, 0, 3000, 1000))  # right half: transparent blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half goes to the top
    result = load_image(fz.encode(image, "PNG", exif=exif))
    assert result.size == (341, 1024)
    assert result.getpixel((170, 100)) == (255, 0, 0) and result.getpixel((170, 900)) == (255, 255, 255)
    dark = Image.new("I;16", (3000, 1000), 200)  # 200 / 65535 of white, not 200 / 255
    assert load_image(fz.encode(dark, "PNG")).getpixel((500, 150)) == (1, 1, 1)
