"""Fuzz the upload surface: image bytes (`vlm_demo.images`) and captions (`Session.check_caption` + tokenizer).

    python -m benchmarks.fuzz_inputs --seconds 300      # the long campaign; exits 1 on any violation

The invariant, for every input: it loads, or it raises `ValueError` with a non-empty message.
Nothing else escapes, no input takes over `MAX_SECONDS` of CPU (wall time is judged more loosely,
`MAX_WALL_SECONDS`, as other jobs on a shared machine stretch it), and none raises the peak
resident set by over `MAX_PEAK_MB`. Inputs run in a `Worker` child process, so a hang or a crash
in a C decoder is caught and reported instead of taking the fuzzer down, and memory is measured
per input.

Inputs: small valid PNG, JPEG, GIF, WebP, TIFF and BMP files written by Pillow (several modes,
animation, EXIF, compressions), then mutated (bit flips, byte sets, inserts, deletes, truncation,
chunks and headers spliced from other files, image sizes patched into the header); random bytes;
genuine decompression bombs (a few kB that decode to ~40 M pixels); and unicode captions (control
characters, RTL, emoji, NUL, huge strings). `tests/test_fuzz.py` runs a short, derandomized
campaign of the same strategies.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import marshal
import math
import os
import platform
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from PIL import Image

from vlm_demo.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, load_image

ROOT = Path(__file__).resolve().parents[1]

MAX_SECONDS = 2.0  # CPU time per input: its cost, whatever else keeps the machine busy
MAX_WALL_SECONDS = 10.0  # wall time per input: a stall that costs no CPU
MAX_PEAK_MB = 500.0  # rise of the peak resident set, per input
HANG_SECONDS = 20.0  # a child still running after this is killed and reported as a hang
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")

# ----------------------------------------------------------------------------- running one input


@dataclasses.dataclass
class Outcome:
    """What one input did."""

    status: str  # "loaded", "rejected" (a ValueError with a message) or "violation"
    seconds: float  # CPU time of the call, all threads
    wall_seconds: float  # wall time of the call
    peak_mb: float  # rise of the peak resident set during the call
    detail: str = ""  # what loaded, the ValueError's message, or what went wrong

    def problem(
        self, max_seconds: float = MAX_SECONDS, max_peak_mb: float = MAX_PEAK_MB, max_wall: float = MAX_WALL_SECONDS
    ) -> str | None:
        """Why this outcome breaks the invariant, or None."""
        if self.status == "violation":
            return self.detail
        what = f"{self.status}: {self.detail[:200]}"
        if self.seconds > max_seconds:
            return f"took {self.seconds:.2f} s of CPU (limit {max_seconds:g} s); {what}"
        if self.wall_seconds > max_wall:
            return f"took {self.wall_seconds:.2f} s (limit {max_wall:g} s); {what}"
        if self.peak_mb > max_peak_mb:
            return f"peak memory rose {self.peak_mb:.0f} MB (limit {max_peak_mb:g} MB); {what}"
        return None


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024
    raise OSError(f"no {key} in /proc/self/status")


def _maxrss_mb() -> float:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, kB on Linux


def _start_peak() -> Callable[[], float]:
    """Start measuring the peak resident set; the returned function gives its rise in MB."""
    try:
        # "5" resets VmHWM (the peak) to the current RSS (Linux >= 4.0), so the peak of
        # this one call is measured even if the process was bigger before.
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_mb("VmRSS")
        return lambda: _status_mb("VmHWM") - base
    except OSError:
        base = _maxrss_mb()  # only sees rises above the process's earlier peak
        return lambda: _maxrss_mb() - base


def run(fn: Callable[[Any], str], arg: Any) -> Outcome:
    """Call `fn(arg)` here and classify what happens."""
    measure = _start_peak()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        status, detail = "loaded", fn(arg)
    except ValueError as error:
        status, detail = ("rejected", str(error)) if str(error).strip() else ("violation", "ValueError, empty message")
    except Exception as error:  # noqa: BLE001 - anything else escaping is what the fuzzer looks for
        status = "violation"
        detail = f"{type(error).__name__} escaped: {error}\n{traceback.format_exc(limit=-4)}"
    return Outcome(status, time.process_time() - cpu, time.perf_counter() - start, measure(), str(detail)[:2000])


class Worker:
    """A child process that runs one target on inputs sent over a pipe.

    A crash (even in a C decoder) or a hang stays in the child: it is reported as a
    violation and the next input gets a fresh child. Inputs travel as `marshal` data
    (bytes, str, None, int, lists), answers as JSON lines.

    Args:
        target: a name in `TARGETS`.
        hang_seconds: how long to wait for an answer before killing the child.
    """

    def __init__(self, target: str, hang_seconds: float = HANG_SECONDS):
        self.target, self.hang_seconds = target, hang_seconds
        self.proc: subprocess.Popen | None = None
        self._pending = b""

    def __call__(self, arg: Any) -> Outcome:
        """Run `arg` through the target in the child and return what happened."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        payload = marshal.dumps(arg)
        try:
            self.proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
            self.proc.stdin.flush()
            answer = self._read_line(self.hang_seconds)
        except BrokenPipeError:
            answer = b""
        if answer is None:
            self.close()
            return Outcome("violation", 0.0, self.hang_seconds, 0.0, f"hang: no answer after {self.hang_seconds:g} s")
        if not answer:
            code = self.proc.wait()
            self.proc = None
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            return Outcome("violation", 0.0, 0.0, 0.0, f"the process died ({how})")
        return Outcome(**json.loads(answer))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def start(self) -> None:
        """Start the child (`__call__` does it when needed); it is ready when this returns."""
        command = [sys.executable, "-m", "benchmarks.fuzz_inputs", "--serve", self.target]
        # glibc otherwise keeps freed blocks of up to 32 MB resident and reuses them, hiding
        # most of an input's memory from the peak; with fixed thresholds it returns them.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        # stderr is dropped: libtiff and libjpeg print a warning for nearly every malformed file.
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT
        )
        self._pending = b""
        if self._read_line(120.0) != b"ready\n":
            self.close()
            raise RuntimeError(f"the fuzz worker did not start; run `{' '.join(command)}` to see why")

    def _read_line(self, timeout: float) -> bytes | None:
        """The next line from the child; b"" if it died, None if it said nothing for `timeout` s."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line + b"\n"


def serve(target: str) -> None:
    """The child's side of `Worker`: answer inputs on stdin until it closes."""
    fn = TARGETS[target]
    if target == "caption":
        caption_session()
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # a stray print must not corrupt the answers
    warnings.simplefilter("ignore")  # Pillow warns on corrupt EXIF and the like; errors are what count
    inputs = sys.stdin.buffer
    answers.write(b"ready\n")
    answers.flush()
    while len(header := inputs.read(8)) == 8:
        arg = marshal.loads(inputs.read(int.from_bytes(header, "little")))
        answers.write(json.dumps(dataclasses.asdict(run(fn, arg))).encode() + b"\n")
        answers.flush()


# ----------------------------------------------------------------------------- targets


def load(data: bytes) -> str:
    """The image target: `load_image` with the app's defaults, and a check of what it returns."""
    image = load_image(data)
    if image.mode != "RGB" or min(image.size) < 1 or max(image.size) > DEFAULT_MAX_SIDE:
        raise AssertionError(f"load_image returned a {image.mode} image of size {image.size}")
    return f"{image.width}x{image.height}"


CAPTION_VOCAB = ["a small red circle at the top left", "a large blue square in the center", "two green stars"]


@cache
def caption_session() -> Any:
    """A real `Session` on tiny random models; only its tokenizer matters to `check_caption`."""
    import torch  # imported here, so that the image worker starts without torch

    from vlm_demo.api import Session
    from vlm_demo.config import get_preset
    from vlm_demo.model import DualEncoder
    from vlm_demo.tokenizer import Tokenizer

    cfg = get_preset("tiny").model
    tokenizer = Tokenizer.build(CAPTION_VOCAB, cfg.text.context_length)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tokenizer)))
    torch.manual_seed(0)
    model = DualEncoder(cfg)
    return Session(model, model, tokenizer)


def caption(text: Any) -> str:
    """The caption target: what `Session.analyze` does to a caption before the model sees it."""
    from vlm_demo.tokenizer import CLS, normalize

    session = caption_session()
    tokenizer = session.tokenizer
    clean, truncated = session.check_caption(text)
    ids = tokenizer.encode_batch([clean])  # (1, L)
    words = len(normalize(clean))
    length = tokenizer.context_length
    if (
        ids.shape != (1, length)
        or int(ids.min()) < 0
        or int(ids.max()) >= len(tokenizer)
        or int(ids[0, 0]) != tokenizer.stoi[CLS]
        or int(ids[0, 1]) == tokenizer.pad_id
        or truncated != (words + 1 > length)
    ):
        raise AssertionError(f"bad encoding {ids.tolist()} (truncated={truncated}, {words} words)")
    return f"{min(words, length - 1)} tokens" + (", truncated" if truncated else "")


def probe(command: list[Any]) -> str:
    """The harness's self-test target: ["raise"], ["empty"], ["crash"], ["sleep", s], ["spin", s] or ["hold", MB]."""
    if command[0] == "raise":
        raise KeyError("boom")
    if command[0] == "empty":
        raise ValueError("  ")
    if command[0] == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if command[0] == "sleep":
        time.sleep(command[1])
    if command[0] == "spin":
        end = time.process_time() + command[1]
        while time.process_time() < end:
            pass
    if command[0] == "hold":
        return str(len(b"x" * (command[1] * 2**20)))  # written, so resident
    return "ok"


TARGETS: dict[str, Callable[[Any], str]] = {"load": load, "caption": caption, "probe": probe}


# ----------------------------------------------------------------------------- seed images


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@cache
def seed_files() -> dict[str, tuple[bytes, ...]]:
    """Small valid files of every format, in the modes and options uploads come in."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:16, 0:24]
    pixels = np.stack([x * 10, y * 15, (x + y) * 6], -1) + rng.integers(0, 40, (16, 24, 3))
    rgb = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray((x * 10 + 10).astype(np.uint8)))
    frames = [rgb, rgb.rotate(90), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    i16 = Image.fromarray((x * 2500 + y * 100).astype(np.uint16))
    floats = Image.fromarray((x / 23.0).astype(np.float32), "F")
    many = {"save_all": True, "append_images": frames[1:]}
    return {
        "PNG": (
            encode(rgb, "PNG"), encode(rgba, "PNG"), encode(rgb.convert("L"), "PNG"),
            encode(rgba.convert("LA"), "PNG"), encode(rgb.convert("P"), "PNG"),
            encode(rgb.convert("P"), "PNG", transparency=0), encode(rgb.convert("1"), "PNG"),
            encode(i16, "PNG"), encode(rgb, "PNG", exif=exif), encode(rgb, "PNG", **many),
        ),
        "JPEG": (
            encode(rgb, "JPEG", quality=85), encode(rgb.convert("L"), "JPEG"), encode(rgb.convert("CMYK"), "JPEG"),
            encode(rgb, "JPEG", progressive=True), encode(rgb, "JPEG", exif=exif),
            encode(rgb, "JPEG", subsampling=0),
        ),
        "GIF": (encode(rgb, "GIF"), encode(rgb, "GIF", transparency=0), encode(rgb, "GIF", **many, duration=40)),
        "WEBP": (
            encode(rgb, "WEBP", quality=80), encode(rgba, "WEBP", lossless=True), encode(rgb, "WEBP", exif=exif),
            encode(rgb, "WEBP", **many, duration=40),
        ),
        "TIFF": (
            encode(rgb, "TIFF"), encode(rgba, "TIFF", compression="tiff_lzw"),
            encode(rgb, "TIFF", compression="tiff_deflate"), encode(rgb, "TIFF", compression="packbits"),
            encode(rgb, "TIFF", compression="jpeg"), encode(rgb.convert("1"), "TIFF", compression="group4"),
            encode(rgb.convert("CMYK"), "TIFF"), encode(floats, "TIFF"), encode(i16, "TIFF"),
            encode(rgb, "TIFF", **many), encode(rgb, "TIFF", exif=exif),
        ),
        "BMP": (encode(rgb, "BMP"), encode(rgb.convert("P"), "BMP"), encode(rgb.convert("1"), "BMP")),
    }  # fmt: skip


# ----------------------------------------------------------------------------- claimed sizes


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """`data` with `width` x `height` written into its image header (a fake bomb when large).

    Values are clipped to what the field can hold; a header this does not recognise
    (or cannot parse after other mutations) is left as it is.
    """
    out = bytearray(data)
    try:
        if out.startswith(b"\x89PNG") and out[12:16] == b"IHDR":
            out[16:24] = struct.pack(">II", width % 2**31, height % 2**31)
            out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))  # a valid CRC: the header is believed
        elif out.startswith(b"GIF8"):
            _claim_gif(out, width % 2**16, height % 2**16)
        elif out.startswith(b"BM") and struct.unpack_from("<I", out, 14)[0] >= 40:
            struct.pack_into("<ii", out, 18, width % 2**31, height % 2**31)
        elif out.startswith(b"\xff\xd8"):
            for i in range(2, len(out) - 9):
                if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2, 0xC3):  # SOFn: height, then width
                    struct.pack_into(">HH", out, i + 5, height % 2**16, width % 2**16)
        elif out[:4] in (b"II*\x00", b"MM\x00*"):
            _claim_tiff(out, width, height)
        elif out.startswith(b"RIFF") and out[8:12] == b"WEBP":
            _claim_webp(out, width, height)
    except (struct.error, IndexError, ValueError):
        return bytes(data)
    return bytes(out)


def _claim_gif(out: bytearray, width: int, height: int) -> None:
    struct.pack_into("<HH", out, 6, width, height)  # the logical screen
    pos = 13 + (3 << ((out[10] & 7) + 1) if out[10] & 0x80 else 0)  # skip the global colour table
    while pos < len(out):
        if out[pos] == 0x2C:  # the first image descriptor: left, top, width, height
            struct.pack_into("<HH", out, pos + 5, width, height)
            return
        if out[pos] != 0x21:
            return
        pos += 2  # an extension: introducer and label, then sub-blocks up to a zero length
        while pos < len(out) and out[pos]:
            pos += out[pos] + 1
        pos += 1


def _claim_tiff(out: bytearray, width: int, height: int) -> None:
    order = "<" if out[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "I", out, 4)[0]
    for k in range(struct.unpack_from(order + "H", out, ifd)[0]):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack_from(order + "HH", out, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG
            value = width if tag == 256 else height
            if kind == 3:
                struct.pack_into(order + "H", out, entry + 8, value % 2**16)
            elif kind == 4:
                struct.pack_into(order + "I", out, entry + 8, value % 2**32)


def _claim_webp(out: bytearray, width: int, height: int) -> None:
    w, h = (max(1, width) - 1), (max(1, height) - 1)
    if (i := out.find(b"VP8X")) >= 0:  # extended: the canvas, 24 bits each
        out[i + 12 : i + 18] = (w % 2**24).to_bytes(3, "little") + (h % 2**24).to_bytes(3, "little")
    if (i := out.find(b"VP8L")) >= 0:  # lossless: 14 bits each after the signature byte
        bits = struct.unpack_from("<I", out, i + 9)[0] & ~(2**28 - 1)
        struct.pack_into("<I", out, i + 9, bits | (w % 2**14) | ((h % 2**14) << 14))
    if (i := out.find(b"\x9d\x01\x2a")) >= 0:  # lossy key frame start code, then 14-bit sizes
        struct.pack_into("<HH", out, i + 3, (w + 1) % 2**14, (h + 1) % 2**14)


# ----------------------------------------------------------------------------- strategies

# An offset in a file: near the start, where the headers are, or anywhere (a fraction of the length).
_POS = st.one_of(st.integers(0, 96), st.floats(0, 1, exclude_max=True))
_SEED = st.tuples(st.sampled_from(FORMATS), st.integers(0, 63))  # another seed file, to splice from
SIZES = st.one_of(
    st.sampled_from([0, 1, 2, 1023, 1024, 2**14, 2**15, 2**16 - 1, 2**16, 6324, 6325, 100_000, 2**31 - 1]),
    st.integers(0, 70_000),
)
_OPS = st.one_of(
    st.tuples(st.just("flip"), _POS, st.integers(0, 7)),
    st.tuples(st.just("set"), _POS, st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]) | st.integers(0, 255)),
    st.tuples(st.just("insert"), _POS, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _POS, st.integers(1, 64)),
    st.tuples(st.just("truncate"), _POS),
    st.tuples(st.just("splice"), _POS, _SEED, _POS, st.integers(1, 256)),
    st.tuples(st.just("header"), _SEED, st.integers(1, 64)),
    st.tuples(st.just("size"), SIZES, SIZES),
)


def _at(data: bytes | bytearray, pos: int | float) -> int:
    return min(pos, len(data)) if isinstance(pos, int) else int(pos * len(data))


def _seed(ref: tuple[str, int]) -> bytes:
    files = seed_files()[ref[0]]
    return files[ref[1] % len(files)]


def mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    """Apply the mutations drawn from `_OPS`, in order."""
    out = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "flip" and out:
            out[min(_at(out, op[1]), len(out) - 1)] ^= 1 << op[2]
        elif kind == "set" and out:
            out[min(_at(out, op[1]), len(out) - 1)] = op[2]
        elif kind == "insert":
            i = _at(out, op[1])
            out[i:i] = op[2]
        elif kind == "delete":
            i = _at(out, op[1])
            del out[i : i + op[2]]
        elif kind == "truncate":
            del out[_at(out, op[1]) :]
        elif kind == "splice":  # overwrite a chunk with a chunk of another file
            other = _seed(op[2])
            i, j = _at(out, op[1]), _at(other, op[3])
            out[i : i + op[4]] = other[j : j + op[4]]
        elif kind == "header":  # another format's header on this file's body
            other = _seed(op[1])
            out[: op[2]] = other[: op[2]]
        elif kind == "size":
            out = bytearray(claim_size(bytes(out), op[1], op[2]))
    return bytes(out)


@st.composite
def mutated_images(draw: st.DrawFn, formats: tuple[str, ...] = FORMATS) -> tuple[str, bytes]:
    """(format of the seed, a seed file after 0-6 mutations)."""
    fmt = draw(st.sampled_from(formats))
    data = draw(st.sampled_from(seed_files()[fmt]))
    return fmt, mutate(data, draw(st.lists(_OPS, max_size=6)))


@st.composite
def claimed_sizes(draw: st.DrawFn) -> tuple[str, bytes]:
    """(format, a valid seed file whose header claims another size): fake bombs and degenerate sizes."""
    fmt = draw(st.sampled_from(FORMATS))
    return fmt, claim_size(draw(st.sampled_from(seed_files()[fmt])), draw(SIZES), draw(SIZES))


_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00",
          b"MM\x00*", b"BM"]  # fmt: skip
RANDOM_BYTES = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from(_MAGIC), st.binary(max_size=2048)),
).map(lambda data: ("random", data))

_RTL = st.characters(min_codepoint=0x0590, max_codepoint=0x08FF) | st.sampled_from("\u200f\u202b\u202e\u2067\u061c")
_EMOJI = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF) | st.sampled_from("\u200d\ufe0f\U0001f3fb")
_CONTROL = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"])  # NUL, escapes, bidi marks, odd spaces
_WORDS = st.sampled_from(" ".join(CAPTION_VOCAB).split() + ["unseen", "Ünïcödé", "ǅ", "İ", "ß", "K"])


def _mixed(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Runs of `chars` between known words."""
    return st.lists(st.text(chars, max_size=6) | _WORDS, max_size=30).map(" ".join)


CAPTIONS = st.one_of(
    st.text(),  # any code point but lone surrogates
    st.text(_CONTROL),
    _mixed(_RTL),
    _mixed(_EMOJI),
    _mixed(_CONTROL),
    st.builds(lambda part, n: part * n, st.text(min_size=1, max_size=12), st.integers(500, 400_000)),  # huge
    st.builds(lambda part, n: part * n, st.sampled_from(["a", " a", "\x00a"]), st.integers(9_990, 10_010)),  # the limit
    st.text(st.characters(categories=["Cs"]), max_size=8),  # lone surrogates, as JSON can carry them
    st.sampled_from(["", " ", "\x00", "\u3000\u00a0\u2028", "\ufeff", "\u202e"]),
    st.one_of(st.none(), st.integers(), st.binary(max_size=16), st.lists(st.text(max_size=4), max_size=2)),
).map(lambda text: ("captions", text))


# ----------------------------------------------------------------------------- genuine bombs


def genuine_bombs() -> list[tuple[str, Callable[[], bytes]]]:
    """Small files that really decode to about `DEFAULT_MAX_PIXELS` pixels (made on demand: ~1-2 s each).

    WebP appears twice: at the full budget (refused) and just under its third (loads).
    """
    side, third = math.isqrt(DEFAULT_MAX_PIXELS), math.isqrt(DEFAULT_MAX_PIXELS // 3)

    def make(mode: str, colour: Any, fmt: str, size: int = side, **params: Any) -> Callable[[], bytes]:
        return lambda: encode(Image.new(mode, (size, size), colour), fmt, **params)

    return [
        ("RGBA PNG", make("RGBA", (255, 0, 0, 0), "PNG", compress_level=9)),  # found by this fuzzer: 0.9 GB, 4 s
        ("LA PNG", make("LA", (3, 0), "PNG", compress_level=9)),
        ("P+tRNS PNG", make("P", 0, "PNG", transparency=0, compress_level=9)),
        ("RGB+tRNS PNG", make("RGB", (1, 2, 3), "PNG", transparency=(1, 2, 3), compress_level=9)),
        ("16-bit PNG", make("I;16", 300, "PNG", compress_level=9)),
        ("GIF", make("P", 1, "GIF")),
        ("float TIFF", make("F", 0.5, "TIFF", compression="tiff_deflate")),
        ("RGBA TIFF", make("RGBA", (1, 2, 3, 4), "TIFF", compression="tiff_deflate")),
        ("RGB JPEG", make("RGB", (1, 2, 3), "JPEG")),
        ("WebP (full budget)", make("RGBA", (1, 2, 3, 4), "WEBP", lossless=True)),
        ("WebP (a third)", make("RGBA", (1, 2, 3, 4), "WEBP", size=third, lossless=True)),
    ]


# ----------------------------------------------------------------------------- the long campaign


@dataclasses.dataclass
class Tally:
    """Counts for one row of the summary."""

    tried: int = 0
    loaded: int = 0
    rejected: int = 0
    violations: int = 0
    cpu: float = 0.0  # the most CPU seconds one input took
    wall: float = 0.0  # the most wall seconds one input took
    peak_mb: float = 0.0  # the largest peak memory rise of one input

    HEADER = (
        f"{'target':<24}{'tried':>7}{'loaded':>8}{'rejected':>9}{'max cpu s':>10}{'max wall s':>11}"
        f"{'peak MB':>8}{'violations':>11}"
    )

    def row(self, name: str) -> str:
        return (
            f"{name:<24}{self.tried:>7}{self.loaded:>8}{self.rejected:>9}{self.cpu:>10.3f}{self.wall:>11.3f}"
            f"{self.peak_mb:>8.1f}{self.violations:>11}"
        )

    def add(self, other: Tally) -> None:
        """Fold another row into this one (counts add up, maxima stay maxima)."""
        for name in ("tried", "loaded", "rejected", "violations"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cpu = max(self.cpu, other.cpu)
        self.wall = max(self.wall, other.wall)
        self.peak_mb = max(self.peak_mb, other.peak_mb)


class Campaign:
    """Runs inputs through `Worker`s, keeps a `Tally` per row and saves every violating input."""

    def __init__(self, save_dir: Path):
        self.rows: dict[str, Tally] = {}
        self.save_dir = save_dir
        self.failures: list[str] = []
        self.workers = {target: Worker(target) for target in ("load", "caption")}

    def check(self, row: str, target: str, arg: Any) -> Outcome:
        outcome = self.workers[target](arg)
        tally = self.rows.setdefault(row, Tally())
        tally.tried += 1
        tally.cpu, tally.wall = max(tally.cpu, outcome.seconds), max(tally.wall, outcome.wall_seconds)
        tally.peak_mb = max(tally.peak_mb, outcome.peak_mb)
        problem = outcome.problem()
        if problem is not None:
            tally.violations += 1
            self.save_dir.mkdir(parents=True, exist_ok=True)
            path = self.save_dir / f"{re.sub(r'[^A-Za-z0-9]+', '_', row)}-{tally.violations}"
            if isinstance(arg, bytes):
                path.with_suffix(".bin").write_bytes(arg)
            else:
                path.with_suffix(".txt").write_text(ascii(arg))
            self.failures.append(f"{row}: {problem.strip()} (input saved to {path})")
        elif outcome.status == "loaded":
            tally.loaded += 1
        else:
            tally.rejected += 1
        return outcome

    def table(self) -> str:
        rule, total = "-" * len(Tally.HEADER), Tally()
        lines = [Tally.HEADER, rule]
        for name, tally in sorted(self.rows.items()):
            lines.append(tally.row(name))
            total.add(tally)
        return "\n".join([*lines, rule, total.row("all")])

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


def _hypothesis_round(strategy: st.SearchStrategy, body: Callable[[Any], None], examples: int, seed: int) -> None:
    """Draw `examples` inputs from `strategy` and pass each to `body` (no shrinking: `body` records, never fails)."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(case: Any) -> None:
        body(case)

    draw()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300.0, help="how long to fuzz (default 300)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first round")
    p.add_argument("--save", type=Path, default=Path(".cache/fuzz-failures"), help="where violating inputs go")
    p.add_argument("--serve", choices=sorted(TARGETS), help=argparse.SUPPRESS)  # the Worker's child
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0

    campaign = Campaign(args.save)
    start = time.monotonic()
    end = start + args.seconds
    plan: list[tuple[st.SearchStrategy, Callable[[Any], Any], int]] = [
        (mutated_images(), lambda case: campaign.check(f"{case[0]} mutated", "load", case[1]), 1500),
        (claimed_sizes(), lambda case: campaign.check(f"{case[0]} fake size", "load", case[1]), 300),
        (RANDOM_BYTES, lambda case: campaign.check("random bytes", "load", case[1]), 300),
        (CAPTIONS, lambda case: campaign.check("captions", "caption", case[1]), 600),
    ]
    bombs, round_ = genuine_bombs(), 0
    try:
        while time.monotonic() < end:
            for strategy, body, examples in plan:
                if time.monotonic() < end:
                    _hypothesis_round(strategy, body, examples, args.seed + round_)
            if round_ < len(bombs) and time.monotonic() < end:  # one genuine bomb a round, each once
                name, make = bombs[round_]
                campaign.check(f"bomb: {name}", "load", make())
            round_ += 1
    finally:
        campaign.close()

    total = sum(t.tried for t in campaign.rows.values())
    print(f"# benchmarks.fuzz_inputs  {time.monotonic() - start:.0f} s  seed={args.seed}  {total:,} inputs  "
          f"Pillow {PIL.__version__}  Python {platform.python_version()}  {platform.machine()}")  # fmt: skip
    print(f"# invariant: loads, or ValueError with a message; per input <= {MAX_SECONDS:g} s of CPU, "
          f"<= {MAX_WALL_SECONDS:g} s wall, <= {MAX_PEAK_MB:g} MB peak memory rise")  # fmt: skip
    print(campaign.table())
    for failure in campaign.failures:
        print(f"VIOLATION {failure}")
    print(f"# {len(campaign.failures)} violation(s)")
    return 1 if campaign.failures else 0


if __name__ == "__main__":
    sys.exit(main())
